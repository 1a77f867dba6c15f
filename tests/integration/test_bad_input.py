"""Bad input gets a failure status or an abort, a log line naming the peer, and leaves nothing."""

from __future__ import annotations

import contextlib
import errno
import io
import logging
import os
import socket
import struct
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian
from pynetdicom import _config
from pynetdicom.dimse_messages import C_STORE_RQ
from pynetdicom.dimse_primitives import C_STORE

from tests.conftest import RunningNode, incoming_emptied, incoming_files, wait_for
from tests.dicomgen import make_instance, uid
from tests.hostile import part10
from tests.scu import associate, statuses, store


def dcm_files(root: Path) -> list[Path]:
    return [p for p in root.rglob("*.dcm") if ".incoming" not in p.parts]


def echo_ok(node: RunningNode) -> bool:
    assoc = associate(node.port, calling="AFTER")
    assert assoc.is_established
    status = assoc.send_c_echo()
    assoc.release()
    return int(status.Status) == 0




def raw_exchange(port: int, payload: bytes, *, close_write: bool = False) -> bytes:
    """Send raw bytes; return the node's answer once it closes or has sent an A-ABORT PDU."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        # The node may close first (it refuses some PDUs on their header alone); then sending
        # breaks the pipe and shutting down finds the socket already disconnected (ENOTCONN).
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            s.sendall(payload)
            if close_write:
                try:
                    s.shutdown(socket.SHUT_WR)
                except OSError as exc:
                    if exc.errno != errno.ENOTCONN:
                        raise
        received = b""
        with contextlib.suppress(ConnectionResetError):
            while chunk := s.recv(4096):
                received += chunk
                if received[:1] == b"\x07" and len(received) >= 10:
                    break  # A-ABORT; the node closes after its ARTIM timer
        return received


def test_garbage_bytes_are_refused_and_node_keeps_serving(
        node: RunningNode, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING)
    answer = raw_exchange(node.port, os.urandom(2048))
    # Either an A-ABORT PDU (type 0x07) or a plain close: never an association.
    assert answer == b"" or answer[0] == 0x07
    assert echo_ok(node)
    assert wait_for(lambda: "127.0.0.1" in caplog.text)


def test_truncated_and_oversized_pdus(node: RunningNode) -> None:
    # An A-ASSOCIATE-RQ header that announces 4096 bytes but carries 10, then the peer stops.
    answer = raw_exchange(node.port, struct.pack(">BBL", 0x01, 0, 4096) + b"\x00" * 10,
                          close_write=True)
    assert answer == b"" or answer[0] == 0x07
    # A PDU that claims to be 4 GB long.
    answer = raw_exchange(node.port, struct.pack(">BBL", 0x04, 0, 0xFFFFFFFF) + b"\x00" * 64,
                          close_write=True)
    assert answer == b"" or answer[0] == 0x07
    assert echo_ok(node)
    assert dcm_files(node.storage) == []


@contextlib.contextmanager
def chunked_send() -> Iterator[None]:
    """Make pynetdicom send a file's bytes as they are, without parsing them."""
    _config.STORE_SEND_CHUNKED_DATASET = True
    try:
        yield
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = False


def raw_file(path: Path, dataset_bytes: bytes, sop_uid: str, sop_class: str = CTImageStorage
             ) -> Path:
    """A Part-10 file whose meta is valid and whose dataset is whatever bytes we like."""
    path.write_bytes(part10(dataset_bytes, ExplicitVRLittleEndian, sop_uid, sop_class))
    return path


def encoded(ds: Dataset) -> bytes:
    """The dataset in Explicit VR Little Endian, without preamble or file meta."""
    buffer = DicomBytesIO()
    buffer.is_little_endian = True
    buffer.is_implicit_VR = False
    write_dataset(buffer, ds)
    return buffer.getvalue()


def test_dataset_that_does_not_parse_gets_failure(node: RunningNode, tmp_path: Path) -> None:
    bad = raw_file(tmp_path / "bad.dcm", b"\x08\x00\x18\x00UI\xff\xff" + os.urandom(300), uid())
    with chunked_send():
        [rsp] = store(node.port, [bad])
    assert 0xC000 <= int(rsp.Status) <= 0xCFFF
    assert dcm_files(node.storage) == []
    assert wait_for(lambda: incoming_files(node.storage) == [])
    assert echo_ok(node)


@pytest.mark.parametrize("keyword", ["StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"])
@pytest.mark.parametrize("hostile", [
    "../../../../tmp/evil", "1.2.3/../../x", "1.2.3\\4", "1." + "2" * 70, "", "../x", "1.2/3",
    "1.2\x003", "1." + "2" * 63, ".", "..", "1.2 3", "1.2.\xe9", "1.2\n3"], ids=repr)
def test_hostile_uids_are_refused_and_nothing_is_written(
        node: RunningNode, tmp_path: Path, keyword: str, hostile: str) -> None:
    ds = make_instance()
    sop_uid = ds.SOPInstanceUID
    setattr(ds, keyword, hostile)
    path = raw_file(tmp_path / "hostile.dcm", encoded(ds), sop_uid)
    before = {p for p in tmp_path.rglob("*")}
    with chunked_send():
        [rsp] = store(node.port, [path])
    assert int(rsp.Status) == 0xC001, rsp
    assert keyword in rsp.ErrorComment
    assert dcm_files(node.storage) == []
    created = {p for p in tmp_path.rglob("*")} - before
    assert all(p.is_relative_to(node.storage) or p.suffix in (".db", ".db-wal", ".db-shm")
               or p.name.startswith("node") for p in created), created
    assert not Path("/tmp/evil").exists()
    assert incoming_emptied(node.storage)


def test_dataset_disagreeing_with_the_request_is_refused(node: RunningNode, tmp_path: Path
                                                         ) -> None:
    ds = make_instance()
    other_instance = raw_file(tmp_path / "a.dcm", encoded(ds), uid())
    from pydicom.uid import MRImageStorage
    other_class = raw_file(tmp_path / "b.dcm", encoded(ds), ds.SOPInstanceUID, MRImageStorage)
    with chunked_send():
        responses = store(node.port, [other_instance, other_class])
    assert statuses(responses) == [0xC002, 0xA900]
    assert dcm_files(node.storage) == []


def partial_store(node: RunningNode, how: str) -> None:
    """Start a 2 MB C-STORE, send half of its PDUs, then abort or drop the connection."""
    ds = make_instance(size=1024)
    assoc = associate(node.port, calling="HALFWAY")
    assert assoc.is_established
    context = next(cx for cx in assoc.accepted_contexts
                   if cx.abstract_syntax == CTImageStorage)
    req = C_STORE()
    req.MessageID = 1
    req.AffectedSOPClassUID = CTImageStorage
    req.AffectedSOPInstanceUID = ds.SOPInstanceUID
    req.Priority = 2
    req.DataSet = io.BytesIO(encoded(ds))
    message = C_STORE_RQ()
    message.primitive_to_message(req)
    pdus = list(message.encode_msg(context.context_id, 16_000))
    for pdu in pdus[: len(pdus) // 2]:
        assoc.dul.send_pdu(pdu)
    time.sleep(0.5)  # let the node write the first half to its temporary file
    assert incoming_files(node.storage), "the node should be receiving into a temporary file"
    if how == "abort":
        assoc.abort()
    else:
        assoc.dul.socket.socket.shutdown(socket.SHUT_RDWR)  # type: ignore[union-attr]
        assoc.kill()


@pytest.mark.parametrize("how", ["abort", "drop"])
def test_peer_that_stops_mid_transfer_leaves_nothing(
        node: RunningNode, how: str, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING)
    partial_store(node, how)
    assert wait_for(lambda: incoming_files(node.storage) == [])
    assert dcm_files(node.storage) == []
    assert "HALFWAY@127.0.0.1" in caplog.text or "127.0.0.1" in caplog.text
    assert echo_ok(node)
    assert statuses(store(node.port, [make_instance()])) == [0]
