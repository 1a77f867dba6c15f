"""The direct C-STORE receiver's encoders and decoders agree byte for byte with pynetdicom's."""

from __future__ import annotations

import io
import itertools
import os
import stat
import struct
from pathlib import Path

import pytest
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_file_meta_info
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom.dimse_messages import C_ECHO_RQ, C_FIND_RSP, C_STORE_RQ, C_STORE_RSP
from pynetdicom.dimse_primitives import C_ECHO, C_FIND, C_STORE
from pynetdicom.dsutils import create_file_meta, encode
from pynetdicom.pdu import P_DATA_TF

from node.implementation import IMPLEMENTATION_CLASS_UID, implementation_version_name
from node.internals import direct_store
from node.internals.direct_answers import find_response
from node.internals.direct_store import (
    ProtocolError,
    StoreRequest,
    command_elements,
    file_meta,
    pdv_items,
    store_request,
    store_response,
)

SOP_INSTANCE = "1.2.826.0.1.3680043.8.498.12345"  # odd length: padded
SOP_INSTANCE_EVEN = "1.2.826.0.1.3680043.8.498.1234"


def pynetdicom_pdus(message: object, context_id: int) -> list[bytes]:
    out = []
    for primitive in message.encode_msg(context_id, 16382):  # type: ignore[attr-defined]
        pdu = P_DATA_TF()
        pdu.from_primitive(primitive)
        out.append(bytes(pdu.encode()))
    return out


def pynetdicom_response(context_id: int, message_id: int, sop_instance: str, status: int,
                        comment: str | None) -> bytes:
    rsp = C_STORE()
    rsp.MessageIDBeingRespondedTo = message_id
    rsp.AffectedSOPClassUID = CTImageStorage
    rsp.AffectedSOPInstanceUID = sop_instance
    rsp.Status = status
    if comment is not None:
        rsp.ErrorComment = comment
    message = C_STORE_RSP()
    message.primitive_to_message(rsp)
    (pdu,) = pynetdicom_pdus(message, context_id)
    return pdu


@pytest.mark.parametrize(("sop_instance", "status", "comment"), [
    (SOP_INSTANCE, 0x0000, None),
    (SOP_INSTANCE_EVEN, 0x0000, None),
    (SOP_INSTANCE, 0xA700, "storage write failed: No space left on device"),  # even length
    (SOP_INSTANCE_EVEN, 0x0111, "duplicate rejected"),  # odd length: space padded
])
def test_store_response_is_what_pynetdicom_sends(sop_instance: str, status: int,
                                                 comment: str | None) -> None:
    request = StoreRequest(context_id=5, message_id=4711, sop_class=CTImageStorage,
                           sop_instance=sop_instance)
    assert store_response(request, status, comment or "") == pynetdicom_response(
        5, 4711, sop_instance, status, comment)


def test_a_long_comment_is_cut_to_the_64_characters_of_lo() -> None:
    request = StoreRequest(1, 1, CTImageStorage, SOP_INSTANCE)
    assert store_response(request, 0x0110, "x" * 100) == pynetdicom_response(
        1, 1, SOP_INSTANCE, 0x0110, "x" * 64)


@pytest.mark.parametrize("syntax", [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
@pytest.mark.parametrize("sop_instance", [SOP_INSTANCE, SOP_INSTANCE_EVEN])
def test_file_meta_is_what_pynetdicom_writes(syntax: str, sop_instance: str) -> None:
    expected = DicomBytesIO()
    expected.write(b"\0" * 128 + b"DICM")
    write_file_meta_info(expected, create_file_meta(
        sop_class_uid=CTImageStorage, sop_instance_uid=sop_instance, transfer_syntax=syntax,
        implementation_uid=IMPLEMENTATION_CLASS_UID,
        implementation_version=implementation_version_name()))
    assert file_meta(CTImageStorage, sop_instance, syntax) == expected.getvalue()


def store_rq_pdu(context_id: int = 3, message_id: int = 7) -> bytes:
    request = C_STORE()
    request.MessageID = message_id
    request.AffectedSOPClassUID = CTImageStorage
    request.AffectedSOPInstanceUID = SOP_INSTANCE
    request.Priority = 2
    request.DataSet = io.BytesIO(b"\x08\x00\x16\x00UI\x00\x00")
    message = C_STORE_RQ()
    message.primitive_to_message(request)
    return b"".join(pynetdicom_pdus(message, context_id))


def test_a_c_store_rq_from_pynetdicom_is_recognised() -> None:
    pdus = store_rq_pdu()
    command_pdu_length = struct.unpack_from(">L", pdus, 2)[0]
    items = list(pdv_items(pdus[6:6 + command_pdu_length]))
    assert [(cx, control) for cx, control, _ in items] == [(3, 0x03)]
    request = store_request(3, command_elements(items[0][2]))
    assert request == StoreRequest(3, 7, CTImageStorage, SOP_INSTANCE)


def test_other_messages_are_left_to_pynetdicom() -> None:
    echo = C_ECHO()
    echo.MessageID = 1
    echo.AffectedSOPClassUID = "1.2.840.10008.1.1"
    message = C_ECHO_RQ()
    message.primitive_to_message(echo)
    (pdu,) = pynetdicom_pdus(message, 1)
    ((_, _, command),) = pdv_items(pdu[6:])
    assert store_request(1, command_elements(command)) is None


def test_a_c_store_rq_missing_its_instance_uid_is_left_to_pynetdicom() -> None:
    elements = {0x0100: b"\x01\x00", 0x0110: b"\x01\x00", 0x0800: b"\x00\x00",
                0x0002: CTImageStorage.encode() + b"\0"}
    assert store_request(1, elements) is None
    elements[0x1000] = SOP_INSTANCE.encode() + b"\0"
    assert store_request(1, elements) == StoreRequest(1, 1, CTImageStorage, SOP_INSTANCE)


@pytest.mark.parametrize("body", [
    b"",  # no item
    b"\x00\x00\x00",  # truncated item header
    struct.pack(">LBB", 10, 1, 3) + b"abc",  # item longer than the PDU
    struct.pack(">LBB", 1, 1, 3),  # item too short for its own header
])
def test_malformed_pdv_items_are_protocol_errors(body: bytes) -> None:
    with pytest.raises(ProtocolError):
        list(pdv_items(body))


def test_a_command_element_outside_group_0000_is_a_protocol_error() -> None:
    with pytest.raises(ProtocolError):
        command_elements(struct.pack("<HHL", 0x0008, 0x0016, 2) + b"1\0")
    with pytest.raises(ProtocolError):
        command_elements(struct.pack("<HHL", 0x0000, 0x0100, 20) + b"\x01\x00")


@pytest.mark.parametrize("implicit", [True, False])
def test_find_response_is_what_pynetdicom_sends(implicit: bool) -> None:
    identifier = Dataset()
    identifier.QueryRetrieveLevel = "STUDY"
    identifier.StudyInstanceUID = SOP_INSTANCE
    encoded = encode(identifier, implicit, True)
    rsp = C_FIND()
    rsp.MessageIDBeingRespondedTo = 42
    rsp.AffectedSOPClassUID = "1.2.840.10008.5.1.4.1.2.2.1"
    rsp.Status = 0xFF00
    rsp.Identifier = io.BytesIO(encoded)
    message = C_FIND_RSP()
    message.primitive_to_message(rsp)
    expected = b"".join(pynetdicom_pdus(message, 7))
    assert find_response(7, 42, "1.2.840.10008.5.1.4.1.2.2.1", 0xFF00, encoded) == expected


def test_a_temporary_file_left_under_the_next_name_is_never_reused(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Names are the process ID and a count: one left by an earlier process of the same ID
    is skipped, not truncated (it may be what the start-up check restores from)."""
    monkeypatch.setattr(direct_store, "_file_numbers", itertools.count(7))
    left = tmp_path / f"tmp{os.getpid()}-7.dcm"
    left.write_bytes(b"kept")
    receiver = direct_store.DirectStore(None, lambda *_: (0, "", None), tmp_path,
                                        None)  # type: ignore[arg-type]
    fd, path = receiver._new_file()
    direct_store.write_all(fd, [b"new"])
    os.close(fd)
    assert path == tmp_path / f"tmp{os.getpid()}-8.dcm"
    assert left.read_bytes() == b"kept" and path.read_bytes() == b"new"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
