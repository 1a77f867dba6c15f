"""Stored files sent as C-STORE requests straight to the peer's socket, and the responses read
straight off it: the sub-operations of C-GET and C-MOVE, and forwarding.

pynetdicom sends a C-STORE by encoding its command set with pydicom, splitting the message
into P-DATA primitives queued for the DUL thread, which runs its state machine and encodes a
PDU for each; the response comes back the same way (decoded by the DUL thread, handed to the
waiting thread through a queue). For a stored instance sent as it is stored, that machinery
is most of the CPU a sub-operation costs, and three thread hand-offs of latency per instance.

`Wire` does the same exchange in the sending thread: it borrows the association's socket from
its DUL (`prompt._WaitsForWork.lend`: the DUL stops reading and sending until it is given
back), writes the C-STORE-RQ command set (encoded with struct) and the file's data set in
P-DATA-TF PDUs of at most the peer's maximum length (read from the file in pieces of up to
`CHUNK` bytes, each piece written with its PDU headers in one sendmsg), and reads PDUs until
the C-STORE-RSP arrives. Anything else the peer sends meanwhile (a C-CANCEL, an
N-EVENT-REPORT, a release or abort request) is handed to the DUL to act on as usual.

`StoredFile` opens a file and reads its first piece and its file meta (where the data set
starts, its transfer syntax and UIDs, with struct); it is made for the next instance while the
peer is still storing the current one, and asks the kernel to read ahead what follows.

On TLS too: while the socket is lent the DUL thread does not touch it, so the SSL object is
only ever used by one thread; each piece is then written with one sendall (an SSL socket has
no sendmsg). Not used for peers that receive PDUs under 1 KiB, or when the DUL is not one of
prompt.py's: pynetdicom sends those (scu/send.py).

pynetdicom's C-GET and C-MOVE service classes make each sub-operation themselves, with
`send_c_store` on a data set the handler yields; a retrieve makes it first and yields a `Sent`,
which the association's `send_c_store` (`answers_sent`) answers with its outcome. A C-MOVE's
sub-operation association is released in a thread of its own (`released_in_the_background`).
"""

from __future__ import annotations

import contextlib
import os
import select
import socket
import ssl
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydicom.dataset import Dataset

from node import dicomtrace
from node.internals.direct_store import (
    P_DATA_TF,
    ProtocolError,
    command_elements,
    command_pdu,
    implicit_element,
    padded_uid,
    pdv_items,
)
from node.internals.pdu_guard import GuardedAssociationSocket
from node.internals.prompt import _WaitsForWork
from node.statuses import SUCCESS

C_STORE_RQ = 0x0001
C_STORE_RSP = 0x8001
# The most of a file read (and written to the socket) at once; also the largest data fragment
# sent in one PDU when the peer accepts larger ones (a PDU may be shorter than the maximum).
CHUNK = 1 << 20
# sendmsg takes at most IOV_MAX (1024) buffers: a header and a fragment per PDU.
_MAX_PDUS_PER_WRITE = 500
# A peer that receives less per PDU gets pynetdicom's encoder (the command set is ~150 bytes).
_MIN_PEER_PDU = 1024
# Long VRs of explicit VR little endian: a 2-byte reserved field and a 4-byte length.
_LONG_VRS = frozenset({b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN",
                       b"UR", b"UT", b"UV"})
# How far ahead of what is being sent the kernel is asked to read a file.
READ_AHEAD = 8 << 20


class Broken(Exception):
    """The association cannot carry more messages (closed, aborted, timed out, or a message
    half sent)."""


class Unreadable(Exception):
    """The file is not a Part-10 file this module can send as it is (pynetdicom may)."""


@dataclass(frozen=True)
class FileMeta:
    """What a Part-10 file's meta group says, and where its data set starts."""

    data_set_offset: int
    transfer_syntax: str
    sop_class: str
    sop_instance: str


def file_meta(head: bytes | bytearray | memoryview) -> FileMeta:
    """The file meta of a Part-10 file whose first bytes are `head` (explicit VR little
    endian, as the standard and every writer of the node's files have it)."""
    view = memoryview(head)
    if len(view) < 132 or bytes(view[128:132]) != b"DICM":
        raise Unreadable("no DICM prefix")
    values: dict[int, str] = {}
    offset, end = 132, len(view)
    while end - offset >= 8:
        group, element = struct.unpack_from("<HH", view, offset)
        if group != 0x0002:
            break
        vr = bytes(view[offset + 4:offset + 6])
        if vr in _LONG_VRS:
            if end - offset < 12:
                raise Unreadable("file meta longer than the first piece read")
            (length,) = struct.unpack_from("<L", view, offset + 8)
            start = offset + 12
        elif vr.isalpha() and vr.isupper():
            (length,) = struct.unpack_from("<H", view, offset + 6)
            start = offset + 8
        else:
            raise Unreadable(f"file meta element ({group:04X},{element:04X}) has no VR")
        if length == 0xFFFFFFFF or start + length > end:
            raise Unreadable(f"file meta element ({group:04X},{element:04X}) does not fit")
        if element in (0x0002, 0x0003, 0x0010):
            values[element] = bytes(view[start:start + length]).decode(
                "ascii", "replace").rstrip("\0 ")
        offset = start + length
    else:
        if end - offset:
            raise Unreadable("file meta longer than the first piece read")
    if any(not values.get(e) for e in (0x0002, 0x0003, 0x0010)):
        raise Unreadable("file meta without SOP class, SOP instance or transfer syntax")
    return FileMeta(offset, values[0x0010], values[0x0002], values[0x0003])


class StoredFile:
    """An open stored file: its meta and its first piece, read into the caller's buffer."""

    def __init__(self, path: str | Path, buffer: bytearray) -> None:
        """Raises OSError (missing, unreadable) or Unreadable (not a Part-10 file)."""
        self.path = path
        self.fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            self.buffer = buffer
            # Most instances fit the buffer: a short read is the whole file (three system
            # calls an instance: open, read, close).
            self.head = os.preadv(self.fd, [buffer], 0)
            self.size = self.head
            if self.head == len(buffer):
                self.size = os.fstat(self.fd).st_size
                with contextlib.suppress(OSError):  # (only advice) the kernel reads on
                    os.posix_fadvise(self.fd, self.head, READ_AHEAD, os.POSIX_FADV_WILLNEED)
            self.meta = file_meta(memoryview(buffer)[:self.head])
            if self.meta.data_set_offset == self.head < self.size:
                raise Unreadable("file meta longer than the first piece read")
        except BaseException:
            os.close(self.fd)
            raise

    def close(self) -> None:
        if self.fd >= 0:
            with contextlib.suppress(OSError):
                os.close(self.fd)
            self.fd = -1


def read_at(fd: int, into: memoryview, offset: int) -> int:
    """Fill `into` from the file at `offset` (short only at the end of the file)."""
    done = 0
    while done < len(into):
        count = os.preadv(fd, [into[done:]], offset + done)
        if not count:
            break
        done += count
    return done


def store_command(context_id: int, message_id: int, sop_class: str, sop_instance: str,
                  originator: tuple[str, int] | None = None) -> bytes:
    """The P-DATA-TF PDU of a C-STORE-RQ command set (priority medium, a data set follows),
    as pynetdicom encodes it; `originator`: the C-MOVE requestor's AE title and message ID."""
    elements = [
        implicit_element(0x0002, padded_uid(sop_class)),
        implicit_element(0x0100, struct.pack("<H", C_STORE_RQ)),
        implicit_element(0x0110, struct.pack("<H", message_id)),
        implicit_element(0x0700, struct.pack("<H", 0)),
        implicit_element(0x0800, struct.pack("<H", 0x0001)),
        implicit_element(0x1000, padded_uid(sop_instance)),
    ]
    if originator is not None:
        ae = originator[0].strip().encode("ascii", "replace")[:16]
        elements.append(implicit_element(0x1030, ae + b" " * (len(ae) % 2)))
        elements.append(implicit_element(0x1031, struct.pack("<H", originator[1])))
    return command_pdu(context_id, elements)


def pdv_header(context_id: int, last: bool, length: int) -> bytes:
    """A P-DATA-TF PDU's header and its one PDV item's header, for a data fragment."""
    return struct.pack(">BBLLBB", P_DATA_TF, 0, length + 6, length + 2, context_id,
                       0x02 if last else 0x00)


@dataclass(frozen=True)
class Response:
    status: int
    comment: str


def store_response(command: dict[int, bytes], message_id: int) -> Response | None:
    """The C-STORE-RSP to `message_id` these command elements make, or None (another
    message)."""
    try:
        (field,) = struct.unpack("<H", command[0x0100])
        (answered,) = struct.unpack("<H", command[0x0120])
        (status,) = struct.unpack("<H", command[0x0900])
    except (KeyError, struct.error):
        return None
    if field != C_STORE_RSP or answered != message_id:
        return None
    comment = command.get(0x0902, b"").decode("latin-1").rstrip("\0 ")
    return Response(status, comment)


class Wire:
    """C-STORE requests of stored files over one association whose socket it has borrowed
    (`open`); used by one thread at a time, until `close`."""

    def __init__(self, assoc: Any, dul: _WaitsForWork, sock: GuardedAssociationSocket,
                 raw: socket.socket, timeout: float) -> None:
        self.assoc = assoc
        self.dul = dul
        self.socket = sock  # pdu_guard's: its reads check each PDU's length
        self.raw = raw
        self.tls_socket = self.raw if isinstance(self.raw, ssl.SSLSocket) else None
        self.tls = self.tls_socket is not None
        self.timeout = timeout  # seconds for a response (the DIMSE timeout)
        peer = (assoc.acceptor if assoc.is_requestor else assoc.requestor).maximum_length
        self.fragment = min(int(peer) - 6, CHUNK) if peer else CHUNK
        self.piece = self.fragment * max(1, min(CHUNK // self.fragment, _MAX_PDUS_PER_WRITE))
        self.buffer = bytearray(max(self.piece, 64 * 1024))
        self.thread = threading.get_ident()
        self._later: list[bytes] = []  # written with the next message (see `later`)
        self.trace = dicomtrace.traced(assoc)

    @classmethod
    def open(cls, assoc: Any, grant_timeout: float = 5.0) -> Wire | None:
        """Borrow the association's socket, or None where pynetdicom must send."""
        dul = assoc.dul
        guarded = dul.socket
        sock = getattr(guarded, "socket", None)
        peer = (assoc.acceptor if assoc.is_requestor else assoc.requestor).maximum_length
        if (not isinstance(dul, _WaitsForWork) or sock is None
                or not isinstance(guarded, GuardedAssociationSocket)
                or not assoc.is_established or (peer and peer < _MIN_PEER_PDU)):
            return None
        if not dul.lend(grant_timeout):
            return None
        timeout = assoc.dimse_timeout
        wire = cls(assoc, dul, guarded, sock, float(timeout) if timeout else 0.0)
        dul.borrower = wire
        return wire

    def later(self, message: bytes) -> None:
        """A message (a C-GET's pending response) written with the next C-STORE request, in
        one write: the peer then reads both at once. Written at `close` at the latest."""
        self._later.append(message)

    def close(self) -> None:
        if self._later:
            with contextlib.suppress(Broken):  # (the association is gone: nothing to tell)
                self._write([])
        self.dul.borrower = None
        self.dul.give_back()

    def send(self, stored: StoredFile, context_id: int, message_id: int,
             originator: tuple[str, int] | None = None) -> None:
        """Write the C-STORE-RQ and the file's data set (raises Broken)."""
        meta = stored.meta
        parts: list[bytes | memoryview] = [store_command(context_id, message_id, meta.sop_class,
                                                         meta.sop_instance, originator)]
        if self.trace:
            dicomtrace.emit(self.assoc, True, dicomtrace.dimse(
                C_STORE_RQ, context_id=context_id, message_id=message_id,
                sop_class=meta.sop_class, sop_instance=meta.sop_instance,
                data_set=stored.size - meta.data_set_offset,
                extra=f"move_originator={originator[0]}/{originator[1]}" if originator else ""))
        if meta.data_set_offset == stored.size:  # an empty data set: one empty last fragment
            self._write([*parts, pdv_header(context_id, True, 0)])
            return
        view = memoryview(stored.buffer)
        position = meta.data_set_offset  # the next byte of the file to send
        base, filled = 0, stored.head  # the buffer holds the file's bytes [base, base + filled)
        while True:
            end = base + filled
            while position < end:
                length = min(self.fragment, end - position)
                parts.append(pdv_header(context_id, position + length == stored.size, length))
                parts.append(view[position - base:position - base + length])
                position += length
            self._write(parts)
            parts = []
            if position >= stored.size:
                return
            want = min(self.piece, stored.size - position)
            view = memoryview(self.buffer)  # (the first piece may be in another buffer)
            try:
                base, filled = position, read_at(stored.fd, view[:want], position)
            except OSError as exc:
                raise Broken(f"{stored.path} could not be read half-way: {exc}") from exc
            if filled < want:
                raise Broken(f"{stored.path} shrank while it was being sent")
            if position + want < stored.size:
                with contextlib.suppress(OSError):  # the kernel reads on while this piece goes
                    os.posix_fadvise(stored.fd, position + want, READ_AHEAD,
                                     os.POSIX_FADV_WILLNEED)

    def _write(self, parts: list[bytes | memoryview]) -> None:
        if self._later:
            parts[:0] = self._later
            self._later = []
        first = 0  # parts[first:] are still to send
        try:
            if self.tls:
                self.raw.sendall(b"".join(parts))
                return
            while first < len(parts):
                sent = self.raw.sendmsg(parts[first:] if first else parts)
                while first < len(parts) and sent >= len(parts[first]):
                    sent -= len(parts[first])
                    first += 1
                if sent:  # a short write (the peer is slow to read): the rest of that part
                    parts[first] = memoryview(parts[first])[sent:]
        except OSError as exc:
            raise Broken(f"the connection failed while sending: {exc}") from exc

    def response(self, message_id: int) -> Response:
        """Read PDUs until the C-STORE-RSP to `message_id` (raises Broken)."""
        deadline = time.monotonic() + self.timeout if self.timeout else None
        pending: list[bytes] = []  # the PDUs of a command set being received
        command = bytearray()
        while True:
            pdu_type, pdu = self._read_pdu(deadline)
            if pdu_type != P_DATA_TF:
                self._hand_over([*pending, pdu])
                raise Broken("the peer released or aborted the association"
                             if pdu_type in (0x05, 0x07) else
                             f"unexpected PDU type 0x{pdu_type:02X}")
            try:
                items = list(pdv_items(memoryview(pdu)[6:]))
            except ProtocolError:
                items = []
            if not items or any(not control & 0x01 for _, control, _ in items):
                # A data set (of a message not ours), or a PDU no peer sends: pynetdicom's.
                self._hand_over([*pending, pdu])
                pending, command = [], bytearray()
                continue
            pending.append(pdu)
            for _, _, fragment in items:
                command += fragment
            if not items[-1][1] & 0x02:
                continue  # more of this command set follows
            try:
                answer = store_response(command_elements(command), message_id)
            except ProtocolError:
                answer = None
            if answer is not None:
                if self.trace:
                    dicomtrace.emit(self.assoc, False, dicomtrace.dimse(
                        C_STORE_RSP, responded_to=message_id, status=answer.status,
                        comment=answer.comment))
                return answer
            self._hand_over(pending)  # a C-CANCEL, an N-EVENT-REPORT, ...
            pending, command = [], bytearray()

    def _read_pdu(self, deadline: float | None) -> tuple[int, bytes]:
        # (select() cannot see bytes already read ahead, or decrypted and buffered by SSL)
        if not self.socket.read_ahead and not (self.tls_socket is not None
                                               and self.tls_socket.pending()):
            wait = None if deadline is None else max(0.0, deadline - time.monotonic())
            try:
                ready = select.select([self.raw], [], [], wait)[0]
            except (OSError, ValueError) as exc:
                raise Broken(f"the connection failed: {exc}") from exc
            if not ready:
                raise Broken(f"no C-STORE response within {self.timeout:.0f} s")
        header = self.socket.recv(6)
        if len(header) < 6:
            raise Broken("the connection closed")
        pdu_type, _, length = struct.unpack(">BBL", header)
        if not 0x01 <= pdu_type <= 0x07:
            self._hand_over([bytes(header)])  # the DUL aborts, as for any unknown PDU
            raise Broken(f"unknown PDU type 0x{pdu_type:02X}")
        body = self.socket.recv(length) if length else bytearray()
        if len(body) < length:
            raise Broken("the connection closed mid-PDU")
        return pdu_type, bytes(header + body)

    def _hand_over(self, pdus: list[bytes]) -> None:
        for pdu in pdus:
            self.dul.deliver(pdu)


class Sent(Dataset):
    """A C-STORE sub-operation a retrieve made itself: pynetdicom's C-GET and C-MOVE service
    classes hand every pending data set to `send_c_store`, which `answers_sent` makes answer
    with this one's outcome instead of sending it."""

    def __init__(self, sop_instance: str, status: int) -> None:
        super().__init__()
        self.SOPInstanceUID = sop_instance  # (pynetdicom lists failed ones by it)
        self.outcome = status

    @classmethod
    def of(cls, sop_instance: str, status: int) -> Sent:
        """The outcome of one sub-operation; pynetdicom only counts a success, so one Sent
        serves them all."""
        return _STORED if status == 0 else cls(sop_instance, status)


_STORED = Sent("", SUCCESS)
_STATUSES: dict[int, Dataset] = {}  # a status Dataset per code, made once (only read)


def _status(code: int) -> Dataset:
    status = _STATUSES.get(code)
    if status is None:
        status = Dataset()
        status.Status = code
        _STATUSES[code] = status
    return status


def answers_sent(assoc: Any) -> None:
    """Make `assoc.send_c_store` answer a `Sent` with its outcome (anything else is sent)."""
    if "send_c_store" in vars(assoc):
        return  # done for an earlier request on this association
    send: Callable[..., Dataset] = assoc.send_c_store

    def send_c_store(dataset: Any, *args: Any, **kwargs: Any) -> Dataset:
        if isinstance(dataset, Sent):
            return _status(dataset.outcome)
        return send(dataset, *args, **kwargs)

    assoc.send_c_store = send_c_store


def released_in_the_background(assoc: Any) -> None:
    """pynetdicom releases a C-MOVE's sub-operation association before it sends the final
    response, and its release waits for the association's threads to end in 10 ms sleeps
    (10 ms of most C-MOVEs, 3% of one of 1000 small images). The sub-operations are all
    answered by then: as Orthanc does, the requestor gets its final response while the
    destination's association is released."""
    release = assoc.release

    def in_the_background() -> None:
        threading.Thread(target=release, name="release-move-destination", daemon=True).start()

    assoc.release = in_the_background
