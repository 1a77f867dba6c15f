"""Hand-crafted (and deliberately broken) Part-10 files and PDUs for the hostile-input tests."""

from __future__ import annotations

import contextlib
import functools
import io
import socket
import struct
import zlib
from pathlib import Path

from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.filebase import DicomBytesIO
from pydicom.filereader import read_dataset
from pydicom.filewriter import write_dataset, write_file_meta_info
from pydicom.sequence import Sequence
from pydicom.uid import (
    CTImageStorage,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEGBaseline8Bit,
)
from pynetdicom import PYNETDICOM_IMPLEMENTATION_UID
from pynetdicom.dimse_messages import C_ECHO_RQ, C_STORE_RQ
from pynetdicom.dimse_primitives import C_ECHO, C_STORE
from pynetdicom.pdu import A_ASSOCIATE_RQ, P_DATA_TF
from pynetdicom.pdu_primitives import (
    A_ASSOCIATE,
    ImplementationClassUIDNotification,
    MaximumLengthNotification,
)
from pynetdicom.presentation import build_context

from node.storage.structure import bytes_reader, read_meta
from tests.dicomgen import make_instance

SYNTAX_OF = {  # (implicit VR, little endian) -> transfer syntax
    (False, True): ExplicitVRLittleEndian,
    (True, True): ImplicitVRLittleEndian,
    (False, False): ExplicitVRBigEndian,
}


def encode(ds: Dataset, *, implicit: bool = False, little: bool = True) -> bytes:
    """The dataset alone (no preamble, no file meta) in the given encoding."""
    buffer = DicomBytesIO()
    buffer.is_little_endian = little
    buffer.is_implicit_VR = implicit
    write_dataset(buffer, ds)
    return buffer.getvalue()


def part10(body: bytes, transfer_syntax: str, sop_uid: str,
           sop_class: str = CTImageStorage) -> bytes:
    """Preamble and file meta as pynetdicom writes them, then `body` as it is."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = transfer_syntax
    buffer = io.BytesIO()
    buffer.write(b"\x00" * 128 + b"DICM")
    write_file_meta_info(buffer, meta, enforce_standard=True)
    return buffer.getvalue() + body


def dataset_bytes(file: Path | bytes) -> bytes:
    """A Part-10 file's bytes after its file meta (the meta of a stored file is the node's)."""
    data = file.read_bytes() if isinstance(file, Path) else file
    return data[read_meta(bytes_reader(data)).dataset_start:]


def instance_file(ds: Dataset | None = None, *, implicit: bool = False, little: bool = True,
                  transfer_syntax: str | None = None) -> bytes:
    """A well-formed file; `transfer_syntax` overrides what the meta claims (to make it lie)."""
    ds = ds if ds is not None else make_instance()
    syntax = transfer_syntax or SYNTAX_OF[(implicit, little)]
    return part10(encode(ds, implicit=implicit, little=little), syntax, ds.SOPInstanceUID)


def encapsulated_file(frames: int = 3) -> bytes:
    """JPEG Baseline syntax with encapsulated pixel data (fragments are not real JPEG: only the
    framing matters here)."""
    ds = make_instance(size=8)
    ds.PixelData = encapsulate([bytes([i]) * 100 for i in range(frames)])
    ds["PixelData"].VR = "OB"
    ds["PixelData"].is_undefined_length = True
    return part10(encode(ds), JPEGBaseline8Bit, ds.SOPInstanceUID)


def with_sequences(*, implicit: bool = False, depth: int = 2) -> bytes:
    """Undefined-length sequences (nested `depth` deep) before and after the pixel data."""
    ds = make_instance(size=8)
    ds.ReferencedImageSequence = _nested(depth)
    ds["ReferencedImageSequence"].is_undefined_length = True
    # Digital Signatures Sequence: a standard element that sorts after Pixel Data.
    ds.add_new(0xFFFAFFFA, "SQ", _nested(depth))
    ds[0xFFFAFFFA].is_undefined_length = True
    return part10(encode(ds, implicit=implicit), SYNTAX_OF[(implicit, True)],
                  ds.SOPInstanceUID)


def _nested(depth: int) -> Sequence:
    item = Dataset()
    item.ReferencedSOPClassUID = CTImageStorage
    item.ReferencedSOPInstanceUID = "1.2.3.4"
    item.is_undefined_length_sequence_item = True
    if depth > 1:
        item.ReferencedImageSequence = _nested(depth - 1)
        item["ReferencedImageSequence"].is_undefined_length = True
    return Sequence([item])


def deflated_file(ds: Dataset | None = None) -> bytes:
    ds = ds if ds is not None else make_instance(size=8)
    compressor = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    body = compressor.compress(encode(ds)) + compressor.flush()
    return part10(body, DeflatedExplicitVRLittleEndian, ds.SOPInstanceUID)


@functools.cache
def deflate_bomb(inflated: int) -> bytes:
    """A deflated "dataset" of `inflated` zero bytes (about 1/1000 of that on the wire)."""
    compressor = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    chunk = b"\x00" * (1 << 20)
    body = b"".join(compressor.compress(chunk) for _ in range(inflated >> 20))
    return part10(body + compressor.flush(), DeflatedExplicitVRLittleEndian, "1.2.3.4")


def element_offset(data: bytes, tag: int, *, little: bool = True, start: int = 132) -> int:
    """Offset of the first element with `tag` at or after `start` (the byte pattern of the tag;
    good enough for the test data, where no value happens to contain it)."""
    pattern = struct.pack("<HH" if little else ">HH", tag >> 16, tag & 0xFFFF)
    offset = data.find(pattern, start)
    assert offset >= 0, f"tag {tag:08X} not found"
    return offset


def set_length(data: bytes, tag: int, length: int, *, implicit: bool = False,
               little: bool = True) -> bytes:
    """`data` with the length field of the first `tag` element replaced (4-byte fields only:
    implicit VR, or explicit VR of OB/OW/SQ/UN/UT/... )."""
    offset = element_offset(data, tag, little=little)
    at = offset + 4 if implicit else offset + 8
    if not implicit:
        assert data[offset + 6:offset + 8] == b"\x00\x00", "not a 4-byte-length VR"
    return data[:at] + struct.pack("<L" if little else ">L", length) + data[at + 4:]


# --- raw PDUs ------------------------------------------------------------------------------

A_ABORT = 0x07


def associate_rq(called: str = "PACSNODE", calling: str = "RAWPEER", max_pdu: int = 16382,
                 abstract_syntaxes: tuple[str, ...] = ("1.2.840.10008.1.1",)) -> bytes:
    """An A-ASSOCIATE-RQ proposing each abstract syntax (context ids 1, 3, ...) in Explicit
    VR Little Endian."""
    primitive = A_ASSOCIATE()
    primitive.application_context_name = "1.2.840.10008.3.1.1.1"
    primitive.calling_ae_title = calling
    primitive.called_ae_title = called
    contexts = []
    for i, abstract in enumerate(abstract_syntaxes):
        cx = build_context(abstract, ExplicitVRLittleEndian)
        cx.context_id = 2 * i + 1
        contexts.append(cx)
    primitive.presentation_context_definition_list = contexts
    maximum = MaximumLengthNotification()
    maximum.maximum_length_received = max_pdu
    implementation = ImplementationClassUIDNotification()
    implementation.implementation_class_uid = PYNETDICOM_IMPLEMENTATION_UID
    primitive.user_information = [maximum, implementation]
    pdu = A_ASSOCIATE_RQ()
    pdu.from_primitive(primitive)
    return bytes(pdu.encode())


def p_data_pdus(message: object, context_id: int = 1, max_pdu: int = 16382) -> list[bytes]:
    """The P-DATA-TF PDUs carrying a DIMSE message (e.g. a C_ECHO_RQ)."""
    pdus = []
    for primitive in message.encode_msg(context_id, max_pdu):  # type: ignore[attr-defined]
        pdu = P_DATA_TF()
        pdu.from_primitive(primitive)
        pdus.append(bytes(pdu.encode()))
    return pdus


def echo_request(message_id: int = 1) -> bytes:
    request = C_ECHO()
    request.MessageID = message_id
    request.AffectedSOPClassUID = "1.2.840.10008.1.1"
    message = C_ECHO_RQ()
    message.primitive_to_message(request)
    return b"".join(p_data_pdus(message))


def store_request(dataset: bytes, sop_class: str, sop_instance: str, context_id: int,
                  message_id: int = 1, max_pdu: int = 16382) -> bytes:
    """A C-STORE-RQ carrying `dataset` (bytes as they are) on `context_id`."""
    request = C_STORE()
    request.MessageID = message_id
    request.AffectedSOPClassUID = sop_class
    request.AffectedSOPInstanceUID = sop_instance
    request.Priority = 2
    request.DataSet = io.BytesIO(dataset)
    message = C_STORE_RQ()
    message.primitive_to_message(request)
    return b"".join(p_data_pdus(message, context_id, max_pdu))


def pdu_header(pdu_type: int, length: int) -> bytes:
    return struct.pack(">BBL", pdu_type, 0, length)


class RawPeer:
    """A requestor on a plain socket: it sends whatever bytes a test wants."""

    def __init__(self, port: int, timeout: float = 10.0) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)

    def __enter__(self) -> RawPeer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()

    def associate(self, rq: bytes | None = None) -> bytes:
        """Send an A-ASSOCIATE-RQ and return the answer PDU (an A-ASSOCIATE-AC: type 0x02)."""
        self.send(rq or associate_rq())
        return self.read_pdu()

    def send(self, data: bytes) -> int:
        """Send as much of `data` as the node takes; returns the bytes sent before it stopped
        reading (broken pipe, reset, or nothing taken for the socket's timeout)."""
        sent = 0
        view = memoryview(data)
        try:
            while sent < len(data):
                sent += self.sock.send(view[sent:sent + (1 << 16)])
        except OSError:
            pass
        return sent

    def read_pdu(self) -> bytes:
        header = self._read_exactly(6)
        if len(header) < 6:
            return header
        return header + self._read_exactly(struct.unpack(">L", header[2:])[0])

    def answer(self) -> tuple[bytes, bool]:
        """What the node sends until it closes the connection, and whether it closed it (False:
        the socket's timeout passed first)."""
        received = b""
        try:
            while chunk := self.sock.recv(65536):
                received += chunk
        except TimeoutError:
            return received, False
        except OSError:
            pass  # reset: closed as well
        return received, True

    def _read_exactly(self, count: int) -> bytes:
        data = b""
        with contextlib.suppress(OSError):
            while len(data) < count and (chunk := self.sock.recv(count - len(data))):
                data += chunk
        return data


def is_abort(answer: bytes) -> bool:
    return answer[:1] == bytes([A_ABORT]) and len(answer) >= 10


def pdus(stream: bytes) -> tuple[list[bytes], bytes]:
    """Split a byte stream into whole PDUs; returns them and the incomplete rest."""
    out, pos = [], 0
    while len(stream) - pos >= 6:
        end = pos + 6 + struct.unpack_from(">L", stream, pos + 2)[0]
        if end > len(stream):
            break
        out.append(stream[pos:end])
        pos = end
    return out, stream[pos:]


def command_sets(stream: bytes) -> list[Dataset]:
    """The DIMSE command sets (e.g. C-STORE-RSP) carried by the P-DATA-TF PDUs of `stream`."""
    commands, fragments = [], b""
    for pdu in pdus(stream)[0]:
        if pdu[0] != 0x04:
            continue
        pos = 6
        while pos + 6 <= len(pdu):
            length = struct.unpack_from(">L", pdu, pos)[0]
            control, data = pdu[pos + 5], pdu[pos + 6:pos + 4 + length]
            pos += 4 + length
            if control & 0x01:  # a command fragment
                fragments += data
                if control & 0x02:  # the last one
                    commands.append(read_dataset(io.BytesIO(fragments), True, True))
                    fragments = b""
    return commands


def set_vr(data: bytes, tag: int, vr: bytes) -> bytes:
    """`data` (Explicit VR Little Endian) with the VR of the first `tag` element replaced."""
    offset = element_offset(data, tag)
    return data[:offset + 4] + vr + data[offset + 6:]


def p_data(context_id: int, control: int, data: bytes) -> bytes:
    """One P-DATA-TF PDU with one PDV item (control: 0x03 last command fragment, 0x02 last
    dataset fragment, ...)."""
    item = struct.pack(">LBB", len(data) + 2, context_id, control) + data
    return pdu_header(0x04, len(item)) + item


def command(**elements: object) -> bytes:
    """A command set (Implicit VR Little Endian) with the given keywords, nothing else."""
    ds = Dataset()
    for keyword, value in elements.items():
        setattr(ds, keyword, value)
    return encode(ds, implicit=True)


def with_context_id(rq: bytes, context_id: int) -> bytes:
    """An A-ASSOCIATE-RQ with its first presentation context's ID replaced."""
    pos = 74  # PDU header and the fixed fields
    while pos + 4 <= len(rq):
        item_type, length = rq[pos], struct.unpack_from(">H", rq, pos + 2)[0]
        if item_type == 0x20:
            return rq[:pos + 4] + bytes([context_id]) + rq[pos + 5:]
        pos += 4 + length
    raise ValueError("no presentation context item")
