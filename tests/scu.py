"""A pynetdicom SCU for tests: send files and report each C-STORE status."""

from __future__ import annotations

import ssl
from collections.abc import Iterable
from pathlib import Path

from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, StoragePresentationContexts
from pynetdicom.association import Association
from pynetdicom.sop_class import Verification

from node.internals.tuning import CONNECTION_HANDLERS


def associate(port: int, called: str = "PACSNODE", calling: str = "TESTSCU",
              contexts: Iterable[str] | None = None,
              syntaxes: list[str] | None = None,
              tls_args: tuple[ssl.SSLContext, str] | None = None) -> Association:
    ae = AE(ae_title=calling)
    ae.acse_timeout = 10
    ae.dimse_timeout = 20
    ae.network_timeout = 20
    # The node accepts the requestor's first syntax; the test data is Explicit VR Little Endian.
    syntaxes = syntaxes or [ExplicitVRLittleEndian, ImplicitVRLittleEndian]
    for cx in contexts or [*(c.abstract_syntax for c in StoragePresentationContexts[:100]),
                           Verification]:
        ae.add_requested_context(cx, syntaxes)  # type: ignore[arg-type]
    return ae.associate("127.0.0.1", port, ae_title=called, evt_handlers=CONNECTION_HANDLERS,
                        tls_args=tls_args)


def store(port: int, items: Iterable[Path | Dataset], called: str = "PACSNODE",
          calling: str = "TESTSCU", syntaxes: list[str] | None = None) -> list[Dataset]:
    """Send each item on one association; returns the response of each (Status, ErrorComment)."""
    assoc = associate(port, called, calling, syntaxes=syntaxes)
    assert assoc.is_established, f"association {calling}->{called} not established"
    try:
        out = []
        for item in items:
            # A path goes to pynetdicom as it is, so a chunked send passes its bytes unparsed.
            out.append(assoc.send_c_store(item))
        return out
    finally:
        assoc.release()


def statuses(responses: list[Dataset]) -> list[int]:
    return [int(r.Status) for r in responses]


def identifier(level: str, keys: dict[str, object]) -> Dataset:
    """A query/retrieve identifier at `level` with the given keys."""
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 192"  # a value in any script goes as it is
    ds.QueryRetrieveLevel = level
    for keyword, value in keys.items():
        setattr(ds, keyword, value)
    return ds


def send_files(port: int, paths: Iterable[Path], called: str = "PACSNODE",
               calling: str = "TESTSCU") -> dict[Path, Dataset]:
    """Send files as their own bytes, each in a context of its own SOP class and transfer
    syntax (as a modality holding them would); returns each file's response."""
    paths = list(paths)
    ae = AE(ae_title=calling)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 20
    pairs = sorted({(str(meta.MediaStorageSOPClassUID), str(meta.TransferSyntaxUID))
                    for meta in (dcmread_meta(p) for p in paths)})
    assert len(pairs) <= 128, "more SOP class and syntax pairs than one association holds"
    for sop_class, syntax in pairs:
        ae.add_requested_context(sop_class, syntax)
    assoc = ae.associate("127.0.0.1", port, ae_title=called, evt_handlers=CONNECTION_HANDLERS)
    assert assoc.is_established, f"association {calling}->{called} not established"
    try:
        return {path: assoc.send_c_store(path) for path in paths}
    finally:
        assoc.release()


def dcmread_meta(path: Path) -> Dataset:
    """A Part-10 file's meta information."""
    from pydicom.filereader import read_file_meta_info

    return read_file_meta_info(path)
