"""The AE of an association the node requests from the command line (echo, query): its
calling AE title, the node's identity and the node's [dicom] timeouts and PDU size."""

from __future__ import annotations

from pynetdicom import AE

from node.config import Settings
from node.implementation import identify


def requestor(settings: Settings, calling_ae: str) -> AE:
    d = settings.dicom
    ae = identify(AE(ae_title=calling_ae))
    ae.acse_timeout = d.acse_timeout
    ae.dimse_timeout = d.dimse_timeout
    ae.network_timeout = d.network_timeout
    ae.connection_timeout = d.connection_timeout
    ae.maximum_pdu_size = d.max_pdu_size
    return ae
