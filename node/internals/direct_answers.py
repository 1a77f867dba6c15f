"""C-FIND, C-GET and C-MOVE pending answers sent straight to the peer's socket, without
pynetdicom's DIMSE layer.

For each pending answer pynetdicom builds a response primitive, encodes its command set with
pydicom, splits the message into P-DATA primitives, queues them for the DUL thread, wakes it,
runs its state machine and encodes a PDU: about two thirds of the CPU an answer costs
(docs/performance/journal.md). `FindAnswers` writes the same bytes itself: the C-FIND-RSP command
set encoded with struct (direct_store's encoders) and the identifier, each in one PDV of one
P-DATA-TF, as pynetdicom sends them.

It is used from the association's reactor thread while the handler runs, which is safe
because nothing else sends on that association meanwhile: the reactor is busy in the handler
and the DUL thread sends only what the reactor queues. It is not used where that or the
encoding would not hold: on TLS (an SSL object must not be written from one thread while
another reads it), for transfer syntaxes other than Little Endian ones, or when an answer
would not fit the peer's maximum PDU (pynetdicom fragments those). Final and failure
responses still go through pynetdicom.

`RetrieveAnswers` does the same for the pending responses pynetdicom's C-GET and C-MOVE service
classes send after each sub-operation: while a retrieve's handler runs, its association's
`dimse.send_msg` writes a pending C-GET-RSP or C-MOVE-RSP (counts, no identifier) to the
socket itself when the handler's thread sends it, and leaves everything else to pynetdicom.
A C-GET's own C-STOREs go on the same socket, from the same thread (direct_send.py
borrows it from the DUL), so nothing is ever written to it by two threads at once; there the
pending response goes out with the next C-STORE request, in one write (the requestor reads
both at once), and on TLS only so.
"""

from __future__ import annotations

import ssl
import struct
import threading
from collections.abc import Callable
from typing import Any

from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom.dimse_primitives import C_GET, C_MOVE
from pynetdicom.dsutils import encode

from node import dicomtrace
from node.internals.direct_store import command_pdu, implicit_element, padded_uid, pdv_pdu
from node.statuses import PENDING

C_FIND_RSP = 0x8020
C_GET_RSP = 0x8010
C_MOVE_RSP = 0x8021
NO_DATA_SET = 0x0101
# CommandDataSetType of a response that has an identifier (any value but 0x0101).
_DATA_SET_PRESENT = 0x0001
# A PDV item's length field, context ID and message control header.
_PDV_HEADER = 6
# Peers that receive less per PDU get pynetdicom's fragmenting encoder.
_MIN_PEER_PDU = 1024


def find_response(context_id: int, message_id: int, sop_class: str, status: int,
                  identifier: bytes) -> bytes:
    """The PDUs of a C-FIND-RSP with an identifier, as pynetdicom sends them."""
    command = command_pdu(context_id, [
        implicit_element(0x0002, padded_uid(sop_class)),
        implicit_element(0x0100, struct.pack("<H", C_FIND_RSP)),
        implicit_element(0x0120, struct.pack("<H", message_id)),
        implicit_element(0x0800, struct.pack("<H", _DATA_SET_PRESENT)),
        implicit_element(0x0900, struct.pack("<H", status)),
    ])
    return command + pdv_pdu(context_id, 0x02, identifier)


class FindAnswers:
    """Sends one C-FIND request's pending answers."""

    def __init__(self, event: Any, maximum: int) -> None:
        self.assoc = event.assoc
        self.context_id = int(event.context.context_id)
        self.message_id = int(event.request.MessageID)
        self.sop_class = str(event.request.AffectedSOPClassUID)
        self.implicit = str(event.context.transfer_syntax) == ImplicitVRLittleEndian
        self.maximum = maximum  # the peer's maximum PDU length, 0: unlimited
        self.trace = dicomtrace.traced(self.assoc)

    @classmethod
    def for_event(cls, event: Any) -> FindAnswers | None:
        """The sender for this C-FIND, or None where pynetdicom must send every answer."""
        assoc = event.assoc
        sock = assoc.dul.socket.socket if assoc.dul.socket is not None else None
        maximum = int(assoc.requestor.maximum_length or 0)
        usable = (sock is not None and not isinstance(sock, ssl.SSLSocket)
                  and assoc.is_acceptor and assoc.is_established
                  and (maximum == 0 or maximum >= _MIN_PEER_PDU)
                  and str(event.context.transfer_syntax) in (ImplicitVRLittleEndian,
                                                             ExplicitVRLittleEndian))
        return cls(event, maximum) if usable else None

    def send(self, identifier: Dataset) -> bool:
        """Send one pending answer; False if pynetdicom must send it (it did not fit)."""
        encoded = encode(identifier, self.implicit, True)
        if encoded is None:
            return False  # pynetdicom answers what it cannot encode (0xC312)
        return self.send_encoded(encoded)

    def send_encoded(self, identifier: bytes) -> bool:
        """Send one pending answer already encoded in the context's transfer syntax; False if
        pynetdicom must send it (it did not fit)."""
        if self.maximum and len(identifier) + _PDV_HEADER > self.maximum:
            return False  # (the command set, about 100 bytes, fits any maximum allowed here)
        self.assoc.dul.socket.send(find_response(self.context_id, self.message_id,
                                                 self.sop_class, PENDING, identifier))
        if self.trace:
            dicomtrace.emit(self.assoc, True, dicomtrace.dimse(
                C_FIND_RSP, context_id=self.context_id, responded_to=self.message_id,
                sop_class=self.sop_class, status=PENDING, data_set=len(identifier)))
        return True


def retrieve_response(context_id: int, command: int, message_id: int, sop_class: str,
                      status: int, remaining: int, completed: int, failed: int,
                      warning: int) -> bytes:
    """The PDU of a C-GET-RSP or C-MOVE-RSP (`command`) without an identifier, as pynetdicom
    sends it."""
    return command_pdu(context_id, [
        implicit_element(0x0002, padded_uid(sop_class)),
        implicit_element(0x0100, struct.pack("<H", command)),
        implicit_element(0x0120, struct.pack("<H", message_id)),
        implicit_element(0x0800, struct.pack("<H", NO_DATA_SET)),
        implicit_element(0x0900, struct.pack("<H", status)),
        implicit_element(0x1020, struct.pack("<H", remaining)),
        implicit_element(0x1021, struct.pack("<H", completed)),
        implicit_element(0x1022, struct.pack("<H", failed)),
        implicit_element(0x1023, struct.pack("<H", warning)),
    ])


class RetrieveAnswers:
    """A retrieve's pending responses written by its handler's thread (a context manager: on
    exit the association's DIMSE sends everything itself again)."""

    def __init__(self, assoc: Any) -> None:
        self.dimse = assoc.dimse
        self.dul = assoc.dul
        self.socket = assoc.dul.socket
        self.tls = isinstance(assoc.dul.socket.socket, ssl.SSLSocket)
        self.thread = threading.get_ident()
        self.send_msg: Callable[[Any, int], None] = assoc.dimse.send_msg
        self.assoc = assoc
        self.trace = dicomtrace.traced(assoc)

    @classmethod
    def for_event(cls, event: Any) -> RetrieveAnswers | None:
        """For this C-GET or C-MOVE, or None where pynetdicom must send every response."""
        assoc = event.assoc
        sock = assoc.dul.socket.socket if assoc.dul.socket is not None else None
        maximum = int(assoc.requestor.maximum_length or 0)
        usable = (sock is not None and assoc.is_acceptor and assoc.is_established
                  and (maximum == 0 or maximum >= _MIN_PEER_PDU)
                  and "send_msg" not in vars(assoc.dimse))
        return cls(assoc) if usable else None

    def __enter__(self) -> RetrieveAnswers:
        self.dimse.send_msg = self._send_msg
        return self

    def __exit__(self, *exc: object) -> None:
        del self.dimse.send_msg  # pynetdicom's own again

    def _send_msg(self, primitive: Any, context_id: int) -> None:
        if (threading.get_ident() != self.thread or not isinstance(primitive, C_GET | C_MOVE)
                or primitive.Status != PENDING or primitive.Identifier is not None
                or primitive.MessageIDBeingRespondedTo is None
                or primitive.AffectedSOPClassUID is None
                or (self.tls and not getattr(self.dul, "lent", False))):
            self.send_msg(primitive, context_id)
            return
        command = C_GET_RSP if isinstance(primitive, C_GET) else C_MOVE_RSP
        counts = (primitive.NumberOfRemainingSuboperations or 0,
                  primitive.NumberOfCompletedSuboperations or 0,
                  primitive.NumberOfFailedSuboperations or 0,
                  primitive.NumberOfWarningSuboperations or 0)
        encoded = retrieve_response(context_id, command, primitive.MessageIDBeingRespondedTo,
                                    primitive.AffectedSOPClassUID, PENDING, *counts)
        if self.trace:
            dicomtrace.emit(self.assoc, True, dicomtrace.dimse(
                command, context_id=context_id,
                responded_to=primitive.MessageIDBeingRespondedTo,
                sop_class=str(primitive.AffectedSOPClassUID), status=PENDING,
                extra=dicomtrace.suboperations(*counts)))
        wire = getattr(self.dul, "borrower", None)
        if wire is not None and wire.thread == self.thread:
            wire.later(encoded)  # a C-GET: goes with the next sub-operation's request
        else:
            self.socket.send(encoded)
