"""Process-wide pynetdicom and pydicom settings, and an AE's supported contexts set from a list
built once (node/internals/README.md)."""

from __future__ import annotations

import functools
from collections.abc import Iterable

from pydicom import config as pydicom_config
from pydicom.uid import UID
from pynetdicom import AE, _config, dimse_messages, dsutils
from pynetdicom.presentation import PresentationContext

from node.implementation import IMPLEMENTATION_CLASS_UID, implementation_version_name


def configure_pynetdicom() -> None:
    """Process-wide pynetdicom settings the C-STORE hot path relies on."""
    # Datasets are streamed to a temporary file as they arrive; we fsync and link it into place
    # instead of decoding and re-encoding it.
    _config.STORE_RECV_CHUNKED_DATASET = True
    # And a stored file given to send_c_store by its path (forwarding) is sent from its bytes.
    _config.STORE_SEND_CHUNKED_DATASET = True
    # The standard handlers log every PDU under a lock shared by the whole AE.
    _config.LOG_HANDLER_LEVEL = "none"
    _config.LOG_REQUEST_IDENTIFIERS = False
    _config.LOG_RESPONSE_IDENTIFIERS = False
    # pydicom checks every value set or read against its VR (regexes, UID parsing): for each
    # C-STORE pynetdicom builds a file meta header and a response, ~0.5 ms of CPU per instance
    # (measured: 5.8 -> 5.3 ms/img). What the node accepts is checked by its own rules instead
    # (storage/structure.py, paths.is_valid_uid); coercion rules validate with mode 2 anyway.
    pydicom_config.settings.reading_validation_mode = pydicom_config.IGNORE
    pydicom_config.settings.writing_validation_mode = pydicom_config.IGNORE
    # A C-STORE the direct receiver leaves to pynetdicom is written to its file behind a file
    # meta header that names pynetdicom (a default argument, not the AE's implementation UID):
    # the stored file names pacsnode, as the direct receiver's do, at no cost per store.
    dimse_messages.create_file_meta = functools.partial(
        dsutils.create_file_meta, implementation_uid=UID(IMPLEMENTATION_CLASS_UID),
        implementation_version=implementation_version_name())


def use_supported_contexts(ae: AE, contexts: Iterable[PresentationContext]) -> None:
    """Make `contexts` the AE's supported contexts as they are, without add_supported_context
    checking each transfer syntax again (see scp/server.py's supported_contexts): pynetdicom's
    own dict by abstract syntax."""
    ae._supported_contexts = {cx.abstract_syntax: cx for cx in contexts
                              if cx.abstract_syntax is not None}  # (each has one)
