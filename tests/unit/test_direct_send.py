"""What a retrieve or the forwarder writes to the socket itself agrees byte for byte with what
pynetdicom sends; a stored file's meta and data set are found as pydicom finds them; the
choice between sending as stored and decoding."""

from __future__ import annotations

import glob
import io
import struct
from pathlib import Path

import pydicom
import pytest
from pydicom.filereader import _read_file_meta_info, read_preamble
from pydicom.uid import (
    JPEG2000,
    CTImageStorage,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    RLELossless,
)
from pynetdicom.dimse_messages import C_GET_RSP, C_MOVE_RSP, C_STORE_RQ
from pynetdicom.dimse_primitives import C_GET, C_MOVE, C_STORE
from pynetdicom.sop_class import (
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
)

from node.internals.direct_answers import C_GET_RSP as GET_RSP
from node.internals.direct_answers import C_MOVE_RSP as MOVE_RSP
from node.internals.direct_answers import retrieve_response
from node.internals.direct_send import (
    Unreadable,
    file_meta,
    pdv_header,
    store_command,
    store_response,
)
from node.internals.direct_store import command_elements
from node.scu.contexts import as_stored, decodable
from tests.unit.test_direct_store import pynetdicom_pdus

SOP_INSTANCE = "1.2.826.0.1.3680043.8.498.12345"  # odd length: padded
DATA = Path(pydicom.data.__file__).parent
MR = "1.2.840.10008.5.1.4.1.1.4"


@pytest.mark.parametrize("originator", [None, ("MOVESCU", 7), ("ODD", 65535)])
@pytest.mark.parametrize("sop_instance", [SOP_INSTANCE, SOP_INSTANCE[:-1]])
def test_store_request_is_what_pynetdicom_sends(originator: tuple[str, int] | None,
                                                sop_instance: str) -> None:
    request = C_STORE()
    request.MessageID = 513
    request.Priority = 0
    request.AffectedSOPClassUID = CTImageStorage
    request.AffectedSOPInstanceUID = sop_instance
    request.DataSet = io.BytesIO(b"\x08\x00\x16\x00")  # (a data set follows)
    if originator is not None:
        request.MoveOriginatorApplicationEntityTitle = originator[0]
        request.MoveOriginatorMessageID = originator[1]
    message = C_STORE_RQ()
    message.primitive_to_message(request)
    assert store_command(3, 513, CTImageStorage, sop_instance, originator) == \
        pynetdicom_pdus(message, 3)[0]


@pytest.mark.parametrize(("primitive", "message", "command"), [
    (C_GET, C_GET_RSP, GET_RSP), (C_MOVE, C_MOVE_RSP, MOVE_RSP)])
def test_pending_retrieve_response_is_what_pynetdicom_sends(
        primitive: type, message: type, command: int) -> None:
    sop_class = (StudyRootQueryRetrieveInformationModelGet if primitive is C_GET
                 else StudyRootQueryRetrieveInformationModelMove)
    rsp = primitive()
    rsp.MessageIDBeingRespondedTo = 9
    rsp.AffectedSOPClassUID = sop_class
    rsp.Status = 0xFF00
    rsp.NumberOfRemainingSuboperations = 299
    rsp.NumberOfCompletedSuboperations = 1
    rsp.NumberOfFailedSuboperations = 0
    rsp.NumberOfWarningSuboperations = 0
    encoded = message()
    encoded.primitive_to_message(rsp)
    assert retrieve_response(5, command, 9, sop_class, 0xFF00, 299, 1, 0, 0) == \
        pynetdicom_pdus(encoded, 5)[0]


def test_a_data_fragment_header_frames_one_pdv() -> None:
    assert pdv_header(7, False, 16372) == struct.pack(">BBLLBB", 4, 0, 16378, 16374, 7, 0)
    assert pdv_header(7, True, 0)[-1] == 0x02  # the last fragment


def response_command(status: int, message_id: int, comment: bytes = b"") -> bytes:
    elements = {0x0100: struct.pack("<H", 0x8001), 0x0120: struct.pack("<H", message_id),
                0x0900: struct.pack("<H", status)}
    if comment:
        elements[0x0902] = comment
    return b"".join(struct.pack("<HHL", 0, e, len(v)) + v for e, v in sorted(elements.items()))


def test_a_store_response_is_read_and_others_are_not_taken_for_it() -> None:
    answer = store_response(command_elements(response_command(0xA700, 4, b"disk full ")), 4)
    assert answer is not None and (answer.status, answer.comment) == (0xA700, "disk full")
    assert store_response(command_elements(response_command(0, 3)), 4) is None  # another's
    cancel = {0x0100: struct.pack("<H", 0x0FFF), 0x0120: struct.pack("<H", 4)}
    assert store_response(cancel, 4) is None


def part10_files() -> list[Path]:
    """pydicom's test and character set files that pydicom reads as Part-10 files."""
    found = []
    for name in sorted(glob.glob(str(DATA / "*_files" / "**" / "*.dcm"), recursive=True)):
        with open(name, "rb") as f:
            if f.read(132)[128:] == b"DICM":
                found.append(Path(name))
    return found


@pytest.mark.parametrize("path", part10_files(), ids=lambda p: p.name)
def test_the_data_set_starts_where_pydicom_finds_it(path: Path) -> None:
    with path.open("rb") as f:
        read_preamble(f, False)
        try:
            meta = _read_file_meta_info(f)
        except Exception:
            pytest.skip("pydicom cannot read its meta either")
        start = f.tell()
    head = path.read_bytes()[:1 << 20]
    try:
        found = file_meta(head)
    except Unreadable:
        # Only a meta the standard does not allow (such a file is decoded by pydicom).
        required = ("MediaStorageSOPClassUID", "MediaStorageSOPInstanceUID",
                    "TransferSyntaxUID")
        assert not all(meta.get(keyword) for keyword in required)
        return
    assert found.data_set_offset == start
    assert found.transfer_syntax == meta.TransferSyntaxUID
    assert found.sop_instance == meta.get("MediaStorageSOPInstanceUID", found.sop_instance)


@pytest.mark.parametrize("head", [b"", b"\0" * 200, b"\0" * 128 + b"DICM" + b"\x02\x00\x10",
                                  b"\0" * 128 + b"DICM" + struct.pack("<HH2sH", 2, 0x10,
                                                                       b"UI", 60) + b"1.2"])
def test_what_is_not_a_whole_part10_header_is_unreadable(head: bytes) -> None:
    with pytest.raises(Unreadable):
        file_meta(head)


def test_an_instance_goes_as_stored_on_a_context_of_its_syntax_else_decoded() -> None:
    accepted = [(1, CTImageStorage, JPEG2000), (3, CTImageStorage, ExplicitVRLittleEndian),
                (5, MR, RLELossless)]
    assert as_stored(accepted, CTImageStorage, JPEG2000) == 1
    assert as_stored(accepted, CTImageStorage, ExplicitVRLittleEndian) == 3
    assert as_stored(accepted, CTImageStorage, ImplicitVRLittleEndian) is None
    assert decodable(accepted, CTImageStorage)  # converted to explicit VR by pynetdicom
    assert as_stored(accepted, MR, ExplicitVRLittleEndian) is None
    assert not decodable(accepted, MR)  # RLE only: nowhere to put it decoded
