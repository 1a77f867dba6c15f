"""The AE of an association the node requests from the command line (echo, query): its
calling AE title, the node's identity, and the node's [dicom] timeouts and PDU size unless the
device has its own (docs/how-to/devices.md: 0 means the node's value)."""

from __future__ import annotations

from dataclasses import dataclass

from pynetdicom import AE

from node.config import Settings
from node.implementation import identify


@dataclass(frozen=True)
class Own:
    """A device's own association settings; 0: the node's."""

    acse_timeout: float = 0.0
    dimse_timeout: float = 0.0
    network_timeout: float = 0.0
    max_pdu_size: int = 0


def requestor(settings: Settings, calling_ae: str, own: Own | None = None) -> AE:
    d = settings.dicom
    own = own or Own()
    ae = identify(AE(ae_title=calling_ae))
    ae.acse_timeout = own.acse_timeout or d.acse_timeout
    ae.dimse_timeout = own.dimse_timeout or d.dimse_timeout
    ae.network_timeout = own.network_timeout or d.network_timeout
    ae.connection_timeout = d.connection_timeout
    ae.maximum_pdu_size = own.max_pdu_size or d.max_pdu_size
    return ae
