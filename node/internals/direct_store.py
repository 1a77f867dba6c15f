"""C-STORE requests received straight off the wire, without pynetdicom's DIMSE layer.

For every C-STORE pynetdicom builds a P-DATA-TF PDU object and a P-DATA primitive, runs its
state machine, decodes the command set into a pydicom Dataset, writes the file meta with
pydicom, hands the message to the association's reactor thread, builds a response primitive,
encodes it with pydicom into a new PDU and hands it back to the DUL thread to send. That is
about half of the CPU a small image costs (docs/performance/journal.md), and two thread hand-offs
of latency per image.

`DirectStore` does the same job on the DUL thread: it reads the PDV items of each P-DATA-TF
itself, decodes the few command elements a C-STORE-RQ has, streams the data set into a
temporary file behind a file meta header it encodes itself (as pynetdicom's chunked receive
does), calls the node's store function and sends the C-STORE-RSP it encodes itself. It claims a
message only when pynetdicom would have served it the same way: a C-STORE-RQ whose whole
command set is in the PDU's first PDV, on an accepted context of the request's SOP class, on
an established association in state Sta6 with no other message half-received. Everything else
(other services, a fragmented command set, role or extended negotiation oddities) goes to
pynetdicom unchanged. In Sta6 a P-DATA-TF never changes the association's state (action DT-2),
so bypassing the state machine for it is invisible to the rest of pynetdicom.

A data PDV that breaks the protocol (a command PDV or another context in the middle of the data
set, anything after the last fragment) aborts the association, as pynetdicom does for a PDU it
cannot use. A data set that cannot be written (a full disk) is read to its end and answered
with the store's failure status (0xA700); the association goes on.
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import logging
import os
import struct
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from node import dicomtrace, sop_classes
from node.implementation import IMPLEMENTATION_CLASS_UID, implementation_version_name
from node.storage import files
from node.storage.dirsync import DirectorySyncs

log = logging.getLogger(__name__)

C_STORE_RQ = 0x0001
C_STORE_RSP = 0x8001
NO_DATA_SET = 0x0101
P_DATA_TF = 0x04
# A large data set's pages are sent to disk as it arrives, this many bytes at a time, so the
# final fsync has little left to wait for and dirty pages never pile up in memory.
WRITEBACK_EVERY = 8 << 20
# The next store's temporary file is made in advance (DirectStore._spare); one older than this
# is not used, since the storage monitor sweeps temporary files idle for longer than the
# network timeout plus a second, and one about to be swept must not receive a store.
SPARE_MAX_AGE = 1.0
# The node's response PDU is about 200 bytes plus a 64-character comment; a peer that can
# receive less than this gets pynetdicom's fragmenting encoder instead.
_MIN_PEER_PDU = 1024

# Command set elements (group 0000), element number -> keyword.
_AFFECTED_SOP_CLASS = 0x0002
_COMMAND_FIELD = 0x0100
_MESSAGE_ID = 0x0110
_DATA_SET_TYPE = 0x0800
_AFFECTED_SOP_INSTANCE = 0x1000


class ProtocolError(Exception):
    """A P-DATA-TF that no valid DICOM exchange produces."""


@dataclass(frozen=True)
class StoreRequest:
    context_id: int
    message_id: int
    sop_class: str
    sop_instance: str


# The node's store: (association, request, the received file (still open) or the error that
# stopped its writing) -> (status, comment, what to complete after answering: None when the
# received file may simply be removed).
Persist = Callable[[Any, StoreRequest, files.ReceivedFile | OSError],
                   tuple[int, str, files.DeferredSync | None]]
# Temporary file names: this process's ID and a count, for os.open(O_EXCL); tempfile.mkstemp's
# random names cost a quarter of the creation's CPU.
_file_numbers = itertools.count()


def pdv_items(body: bytes | bytearray | memoryview) -> Iterator[tuple[int, int, memoryview]]:
    """(presentation context ID, message control header, fragment) of each PDV item of a
    P-DATA-TF's body (the PDU without its 6-byte header)."""
    view = memoryview(body)
    offset, end = 0, len(view)
    if end == 0:
        raise ProtocolError("P-DATA-TF without a PDV item")
    while offset < end:
        if end - offset < 6:
            raise ProtocolError("truncated PDV item header")
        (length,) = struct.unpack_from(">L", view, offset)
        if length < 2 or offset + 4 + length > end:
            raise ProtocolError(f"PDV item length {length} does not fit the PDU")
        yield view[offset + 4], view[offset + 5], view[offset + 6:offset + 4 + length]
        offset += 4 + length


def command_elements(data: bytes | bytearray | memoryview) -> dict[int, bytes]:
    """A command set (Implicit VR Little Endian, group 0000) as element number -> value."""
    view = memoryview(data)
    elements: dict[int, bytes] = {}
    offset, end = 0, len(view)
    while offset < end:
        if end - offset < 8:
            raise ProtocolError("truncated command set element")
        group, element, length = struct.unpack_from("<HHL", view, offset)
        offset += 8
        if group != 0x0000 or offset + length > end:
            raise ProtocolError(f"invalid command set element ({group:04X},{element:04X})")
        elements[element] = bytes(view[offset:offset + length])
        offset += length
    return elements


def store_request(context_id: int, elements: dict[int, bytes]) -> StoreRequest | None:
    """The C-STORE-RQ these command elements make, or None for any other message (or one
    missing what a C-STORE-RQ needs: pynetdicom then answers it as it would)."""
    try:
        (command,) = struct.unpack("<H", elements[_COMMAND_FIELD])
        (message_id,) = struct.unpack("<H", elements[_MESSAGE_ID])
        (data_set,) = struct.unpack("<H", elements[_DATA_SET_TYPE])
        sop_class = _text(elements[_AFFECTED_SOP_CLASS])
        sop_instance = _text(elements[_AFFECTED_SOP_INSTANCE])
    except (KeyError, struct.error, UnicodeDecodeError):
        return None
    if command != C_STORE_RQ or data_set == NO_DATA_SET or not sop_class or not sop_instance:
        return None
    return StoreRequest(context_id, message_id, sop_class, sop_instance)


def _text(value: bytes) -> str:
    return value.decode("ascii").rstrip("\0 ")


def _padded(value: str, pad: bytes, encoding: str = "ascii") -> bytes:
    raw = value.encode(encoding, errors="replace")
    return raw + pad if len(raw) % 2 else raw


def implicit_element(element: int, value: bytes) -> bytes:
    """A command set element (group 0000, Implicit VR Little Endian)."""
    return struct.pack("<HHL", 0x0000, element, len(value)) + value


def store_response(request: StoreRequest, status: int, comment: str = "") -> bytes:
    """The whole P-DATA-TF PDU answering `request`, as pynetdicom encodes a C-STORE-RSP."""
    elements = [
        implicit_element(_AFFECTED_SOP_CLASS, _padded(request.sop_class, b"\0")),
        implicit_element(_COMMAND_FIELD, struct.pack("<H", C_STORE_RSP)),
        implicit_element(0x0120, struct.pack("<H", request.message_id)),  # Message ID responded to
        implicit_element(_DATA_SET_TYPE, struct.pack("<H", NO_DATA_SET)),
        implicit_element(0x0900, struct.pack("<H", status)),
    ]
    if comment:
        elements.append(implicit_element(0x0902, _padded(comment[:64], b" ", "latin-1")))
    elements.append(implicit_element(_AFFECTED_SOP_INSTANCE, _padded(request.sop_instance, b"\0")))
    return command_pdu(request.context_id, elements)


def command_pdu(context_id: int, elements: list[bytes]) -> bytes:
    """A P-DATA-TF PDU holding a whole command set of these encoded elements (ascending)."""
    body = b"".join(elements)
    command = implicit_element(0x0000, struct.pack("<L", len(body))) + body
    return pdv_pdu(context_id, 0x03, command)


def pdv_pdu(context_id: int, control: int, fragment: bytes) -> bytes:
    """A P-DATA-TF PDU holding one PDV item."""
    pdv = struct.pack(">LBB", len(fragment) + 2, context_id, control) + fragment
    return struct.pack(">BBL", P_DATA_TF, 0, len(pdv)) + pdv


def padded_uid(uid: str) -> bytes:
    return _padded(uid, b"\0")


def _explicit(element: int, vr: bytes, value: bytes) -> bytes:
    if vr == b"OB":
        return struct.pack("<HH2s2xL", 0x0002, element, vr, len(value)) + value
    return struct.pack("<HH2sH", 0x0002, element, vr, len(value)) + value


# Implementation Class UID and Version Name: the same in every file, encoded once.
_IMPLEMENTATION = (_explicit(0x0012, b"UI", _padded(IMPLEMENTATION_CLASS_UID, b"\0"))
                   + _explicit(0x0013, b"SH", _padded(implementation_version_name(), b" ")))


def file_meta(sop_class: str, sop_instance: str, transfer_syntax: str) -> bytes:
    """Preamble, prefix and file meta group of a received instance, as pynetdicom's chunked
    receive writes them (Explicit VR Little Endian), naming pacsnode's implementation."""
    group = b"".join([
        _explicit(0x0001, b"OB", b"\x00\x01"),
        _explicit(0x0002, b"UI", _padded(sop_class, b"\0")),
        _explicit(0x0003, b"UI", _padded(sop_instance, b"\0")),
        _explicit(0x0010, b"UI", _padded(transfer_syntax, b"\0")),
        _IMPLEMENTATION,
    ])
    return (b"\0" * 128 + b"DICM" + _explicit(0x0000, b"UL", struct.pack("<L", len(group)))
            + group)


class DirectStore:
    """One association's C-STORE receiver; used by its DUL thread only (prompt.PromptDUL)."""

    def __init__(self, assoc: Any, persist: Persist, incoming: Path,
                 syncs: DirectorySyncs) -> None:
        self.assoc = assoc
        self.persist = persist
        self.incoming = incoming
        self.syncs = syncs
        self._names = f"{incoming}/tmp{os.getpid()}-"  # and a count: see _new_file
        self._request: StoreRequest | None = None
        # The data set's temporary file, written through the descriptor: a Python file object
        # costs four system calls to make (fstat twice, an isatty ioctl, lseek) and buys nothing.
        self._fd: int | None = None
        # The file meta header, written with the data set's first fragment (one writev).
        self._head = b""
        self._path: Path | None = None
        self._unsynced = 0  # bytes written since the last start_writeback
        self._size = 0  # bytes written to the file
        self._error: OSError | None = None  # why the data set being received is not written
        # The next store's temporary file, made while the peer prepares that store: creating
        # a file costs about 0.12 ms of (the kernel's) CPU here, off the path the peer waits on.
        self._spare: tuple[int, Path] | None = None
        self.trace = dicomtrace.traced(assoc)  # (admitted: its AE titles are known)
        self._meta_length = 0  # the file meta header's bytes, while tracing

    @property
    def busy(self) -> bool:
        """A data set is half received."""
        return self._request is not None

    def receive(self, body: bytes | bytearray) -> bool:
        """Take a P-DATA-TF body received in Sta6; False leaves it to pynetdicom."""
        items = pdv_items(body)
        if self._request is None:
            try:
                first = next(items)
            except ProtocolError:
                return False  # pynetdicom refuses it as it would any invalid PDU
            request = self._claim(*first)
            if request is None:
                return False
            self._start(request)
        for context_id, control, fragment in items:
            self._data(context_id, control, fragment)
        return True

    def _claim(self, context_id: int, control: int, fragment: memoryview) -> StoreRequest | None:
        if control != 0x03:  # a command's only (last) fragment
            return None
        assoc = self.assoc
        # Not assoc.is_established: the reactor sets it only after the A-ASSOCIATE-AC is queued,
        # and a quick peer's first store (in Sta6 already) must not race it to pynetdicom.
        if assoc.is_aborted or assoc._sent_release \
                or getattr(assoc.dimse, "message", None) is not None:
            return None
        peer_maximum = assoc.requestor.maximum_length
        if peer_maximum and peer_maximum < _MIN_PEER_PDU:
            return None
        try:
            request = store_request(context_id, command_elements(fragment))
        except ProtocolError:
            return None  # pynetdicom decodes it and aborts as it would
        if request is None:
            return None
        context = assoc._accepted_cx.get(context_id)
        if context is None or context.abstract_syntax != request.sop_class \
                or request.sop_class in assoc.acceptor.accepted_common_extended \
                or not sop_classes.is_stored(request.sop_class):
            return None
        return request

    def _new_file(self) -> tuple[int, Path]:
        # Readable as well: the store reads the header back through the same descriptor.
        flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
        while True:
            name = f"{self._names}{next(_file_numbers)}.dcm"
            try:
                fd = os.open(name, flags, 0o600)
            except FileExistsError:
                continue  # left by an earlier process of the same ID
            return fd, Path(name)

    def _start(self, request: StoreRequest) -> None:
        context = self.assoc._accepted_cx[request.context_id]
        spare, self._spare = self._spare, None
        if spare is not None:
            made = os.fstat(spare[0])
            if made.st_nlink == 0 or time.time() - made.st_mtime > SPARE_MAX_AGE:
                _discard(*spare)  # removed meanwhile, or about to be swept: a new one
                spare = None
        self._request = request
        self._size = 0
        self._head = file_meta(request.sop_class, request.sop_instance,
                               str(context.transfer_syntax[0]))
        if self.trace:
            self._meta_length = len(self._head)
        try:
            self._fd, self._path = spare or self._new_file()
        except OSError as exc:
            self._failed(exc)

    def _data(self, context_id: int, control: int, fragment: memoryview) -> None:
        request = self._request
        if request is None:
            raise ProtocolError("a PDV after the data set's last fragment")
        if control & 0x01 or context_id != request.context_id:
            raise ProtocolError(
                f"{'a command' if control & 0x01 else f'context {context_id}'} PDV inside the "
                f"data set of C-STORE {request.sop_instance} (context {request.context_id})")
        fd = self._fd
        if fd is not None:  # (None: writing failed; the rest is read and dropped)
            try:
                self._write(fd, fragment)
                self._unsynced += len(fragment)
                # (after the last fragment, _finish starts the writeback of what is left)
                if self._unsynced >= WRITEBACK_EVERY and not control & 0x02:
                    files.start_writeback(fd)
                    self._unsynced = 0
            except OSError as exc:
                self._failed(exc)
        if control & 0x02:
            self._finish()

    def _write(self, fd: int, fragment: memoryview | bytes) -> None:
        parts = [self._head, fragment] if self._head else [fragment]
        self._head = b""
        self._size += write_all(fd, parts)

    def _failed(self, exc: OSError) -> None:
        """Writing the data set failed (e.g. the disk is full): drop what was written, read
        the rest, and answer the store with a failure instead of ending the association."""
        _discard(self._fd, self._path)
        self._fd = self._path = None
        self._head = b""
        self._error = exc

    def _finish(self) -> None:
        request, path, fd = self._request, self._path, self._fd
        received: files.ReceivedFile | OSError | None = self._error
        assert request is not None
        self._request = self._path = self._fd = self._error = None
        self._unsynced = 0
        deferred: files.DeferredSync | None = None
        try:
            if fd is not None and path is not None:
                try:
                    if self._head:  # a data set of no bytes: the header alone
                        self._write(fd, b"")
                    # The store checks the header while the data is on its way to disk.
                    files.start_writeback(fd)
                    received = files.ReceivedFile(path, fd, self._size)
                except OSError as exc:
                    received = exc
            assert received is not None
            if self.trace:
                dicomtrace.emit(self.assoc, False, dicomtrace.dimse(
                    C_STORE_RQ, context_id=request.context_id, message_id=request.message_id,
                    sop_class=request.sop_class, sop_instance=request.sop_instance,
                    data_set=self._size - self._meta_length if fd is not None else -1))
            try:
                status, comment, deferred = self.persist(self.assoc, request, received)
            finally:
                if fd is not None:
                    with contextlib.suppress(OSError):  # written through already: nothing to lose
                        os.close(fd)
            # The answer first: the data and the index row are on disk already. The fsync of
            # the new file's directory follows in a batch (storage/dirsync.py), and the fsynced
            # temporary file is kept until it is done (files.DeferredSync); without one, the
            # temporary file is of no more use. A crash in between leaves either to the
            # start-up check.
            self.assoc.dul.socket.send(store_response(request, status, comment))
            if self.trace:
                dicomtrace.emit(self.assoc, True, dicomtrace.dimse(
                    C_STORE_RSP, context_id=request.context_id, responded_to=request.message_id,
                    sop_class=request.sop_class, sop_instance=request.sop_instance,
                    status=status, comment=comment))
        finally:
            if deferred is not None:
                self.syncs.add(deferred)
            elif path is not None:
                with contextlib.suppress(OSError):
                    os.unlink(path)
        with contextlib.suppress(OSError):  # e.g. a full disk: the next store makes its own
            self._spare = self._new_file()

    def abandon(self) -> None:
        """Drop a half-received data set and the spare file (the association is ending)."""
        for fd, path in ((self._fd, self._path), self._spare or (None, None)):
            _discard(fd, path)
        self._request = self._path = self._fd = self._spare = self._error = None
        self._unsynced = 0
        self._head = b""


def write_all(fd: int, parts: list[bytes | memoryview]) -> int:
    """Write `parts` one after another at the file's position; returns how many bytes."""
    total = sum(len(part) for part in parts)
    done = os.writev(fd, parts)
    if done < total:  # a short write, e.g. a disk nearly full: the rest, or the error
        rest = memoryview(b"".join(parts))[done:]
        while rest:
            written = os.write(fd, rest)
            if not written:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            rest = rest[written:]
    return total


def _discard(fd: int | None, path: Path | None) -> None:
    if fd is not None:
        with contextlib.suppress(OSError):
            os.close(fd)
    if path is not None:
        with contextlib.suppress(OSError):
            os.unlink(path)
