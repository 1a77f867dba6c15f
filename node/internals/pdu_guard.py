"""Refuse PDUs longer than the node said it would receive, before pynetdicom buffers them, and
abort (rather than crash on) DIMSE messages pynetdicom cannot decode.

pynetdicom's DUL reads a PDU's 6-byte header and then `recv(length)` for the body, whatever the
length says: a P-DATA-TF announcing 0xFFFFFFF0 bytes is accumulated in memory for as long as
the peer keeps sending (measured: +200 MB of RSS for 200 MB sent), although the node advertised
a maximum PDU length of 1 MiB. The listener screens only the first PDU of a connection.

`GuardedAssociationSocket` checks each PDU header as the DUL reads it: a PDU longer than the
node's advertised maximum (plus `PDU_SLACK` for peers that count the header in) gets an
A-ABORT and the connection is shut down; pynetdicom then sees the transport close (Evt17) and
aborts the association like any dropped connection, so partial C-STORE files are discarded by
the usual clean-up. It also turns a peer that stops mid-PDU (the socket's network timeout) or
resets the connection into a quiet close instead of a traceback in the log.

`GuardedDIMSEServiceProvider` covers the next layer: pynetdicom decodes a message's command set
inside its state machine (action DT-2) without catching anything, so a command set without
Command Field, with an unknown one, or a C-STORE on a context that was not accepted raises there
and kills the association's DUL thread (an uncaught thread exception; found by the fuzz test).
The subclass turns such a failure into what pynetdicom itself does for a message it cannot
convert: an invalid-PDU event (Evt19), so the association is aborted with an A-ABORT; the
partial dataset file pynetdicom may already have created is removed.

pynetdicom creates its `AssociationSocket` and `DIMSEServiceProvider` itself and has no factory
hook for them, so `guard_connection` (an EVT_CONN_OPEN handler: pynetdicom calls it before the
DUL reads anything, for accepted and requested associations alike) changes these objects' class
(and the DUL's `StateMachine`'s, see `GuardedStateMachine`) to a subclass that only overrides
one method and keeps its state in plain attributes.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import socket
import struct
from typing import Any

from pynetdicom import evt
from pynetdicom.dimse import DIMSEServiceProvider
from pynetdicom.fsm import TRANSITION_TABLE, StateMachine
from pynetdicom.pdu_primitives import A_P_ABORT, P_DATA
from pynetdicom.transport import AssociationSocket

from node.internals.prompt import wake_reactor

log = logging.getLogger(__name__)

P_DATA_TF = 0x04
_ASSOCIATE_PDUS = (0x01, 0x02)  # A-ASSOCIATE-RQ, -AC: presentation contexts, user information
# pynetdicom reads the body of these types and refuses the others on their header alone.
_KNOWN_PDUS = frozenset(range(0x01, 0x08))
# Peers that count the PDU header, or a PDV item header, in the maximum: tolerated.
PDU_SLACK = 64 * 1024
# An A-ASSOCIATE-RQ/-AC with 128 presentation contexts of 64 transfer syntaxes stays well below
# this (the same bound the listener applies to the first PDU).
MAX_ASSOCIATE_LENGTH = 1 << 20
# A-ASSOCIATE-RJ, A-RELEASE-RQ/-RP and A-ABORT have 4-byte bodies.
MAX_CONTROL_LENGTH = 1024
# The most one receive takes off the socket beyond what the DUL asked for (one buffer per
# association): a small image's command and data PDUs together. A body of this size or more is
# read straight into its own buffer, so only this much of a large PDU is copied twice.
READ_AHEAD = 16 * 1024
# A-ABORT, source: service provider (2), reason: invalid PDU parameter value (6) / not
# specified (0).
ABORT_INVALID_PARAMETER = bytes([0x07, 0, 0, 0, 0, 4, 0, 0, 2, 6])
ABORT_NOT_SPECIFIED = bytes([0x07, 0, 0, 0, 0, 4, 0, 0, 2, 0])


def check_pdu(pdu_type: int, length: int, maximum: int | None) -> str | None:
    """Why a PDU with this header must not be read, or None.

    `maximum` is the Maximum Length Received the node advertised for this association (the
    longest P-DATA-TF variable field it accepts); 0 or None means unlimited.
    """
    if pdu_type == P_DATA_TF:
        if maximum and length > maximum + PDU_SLACK:
            return (f"P-DATA-TF of {length} bytes, longer than the maximum of {maximum} "
                    "advertised")
        return None
    if pdu_type in _ASSOCIATE_PDUS:
        if length > MAX_ASSOCIATE_LENGTH:
            return f"PDU type 0x{pdu_type:02X} of {length} bytes (at most {MAX_ASSOCIATE_LENGTH})"
        return None
    if pdu_type in _KNOWN_PDUS and length > MAX_CONTROL_LENGTH:
        return f"PDU type 0x{pdu_type:02X} of {length} bytes (its body has 4)"
    return None  # an unknown type: pynetdicom aborts on the header without reading a body


class GuardedAssociationSocket(AssociationSocket):
    """An AssociationSocket whose `recv` refuses PDUs that `check_pdu` refuses."""

    _guard_body: int | None  # length of the PDU body the DUL reads next, after a header
    _guard_refused: bool
    _ahead: memoryview  # READ_AHEAD bytes; [_ahead_at:_ahead_end] were read, not returned
    _ahead_at: int
    _ahead_end: int
    # The DUL's own wait (prompt.PromptDUL) found the socket readable: the bytes stay there
    # until the DUL reads them, so `ready` need not ask select() again.
    seen_readable: bool

    def recv(self, nr_bytes: int) -> bytearray:
        if self._guard_refused:
            return bytearray()
        body, self._guard_body = self._guard_body, None
        data = self._recv_quietly(nr_bytes)
        if body is None and nr_bytes == 6 and len(data) == 6:
            # pynetdicom reads each PDU as a 6-byte header and then its body.
            pdu_type, _, length = struct.unpack(">BBL", data)
            local = self.assoc.acceptor if self.assoc.is_acceptor else self.assoc.requestor
            reason = check_pdu(pdu_type, length, local.maximum_length)
            if reason is not None:
                self._refuse(reason)
                return bytearray()  # no PDU: the DUL sees the transport close (Evt17)
            if pdu_type in _KNOWN_PDUS:
                self._guard_body = length
        return data

    def _recv_quietly(self, nr_bytes: int) -> bytearray:
        try:
            return self._recv_exactly(nr_bytes)
        except OSError as exc:  # TimeoutError included
            # pynetdicom would log a traceback for what is only a peer gone quiet or away; a
            # short read makes it close the connection all the same.
            log.warning("connection with %s closed mid-PDU: %s", self._peer(),
                        "timed out" if isinstance(exc, TimeoutError) else exc)
            return bytearray()

    @property
    def ready(self) -> bool:
        seen, self.seen_readable = self.seen_readable, False
        if self.socket is not None and self._is_connected and (seen or self.read_ahead):
            return True  # (select() cannot see bytes already taken off the socket)
        return super().ready

    @property
    def read_ahead(self) -> int:
        """How many bytes were read from the socket and not yet returned by `recv`."""
        return self._ahead_end - self._ahead_at

    def _recv_exactly(self, nr_bytes: int) -> bytearray:
        # pynetdicom's recv reads 4 KiB at a time into a growing bytearray: a 16 KiB PDU was
        # four recv calls and four copies, a 512 KiB CT image 128. Here a short read takes
        # whatever the socket holds, up to READ_AHEAD, and keeps what the DUL did not ask for
        # yet: a peer sends a C-STORE's command PDU and its data PDU back to back, and both
        # headers and bodies then come from one system call instead of four. A body of
        # READ_AHEAD or more is read straight into its buffer. As pynetdicom's: what arrived
        # before the peer closed the connection is returned short.
        sock = self.socket
        assert sock is not None
        buffer = bytearray(nr_bytes)
        view = memoryview(buffer)
        got = self._take_ahead(view)
        while got < nr_bytes:
            if nr_bytes - got >= READ_AHEAD:
                count = sock.recv_into(view[got:])
            else:
                if len(self._ahead) > READ_AHEAD:  # (an A-ASSOCIATE-RQ larger than it)
                    self._ahead = memoryview(bytearray(READ_AHEAD))
                self._ahead_at, self._ahead_end = 0, sock.recv_into(self._ahead)
                count = self._take_ahead(view[got:])
            if not count:
                view.release()
                del buffer[got:]
                return buffer
            got += count
        view.release()
        return buffer

    def _take_ahead(self, into: memoryview) -> int:
        count = min(len(into), self._ahead_end - self._ahead_at)
        if count:
            into[:count] = self._ahead[self._ahead_at:self._ahead_at + count]
            self._ahead_at += count
        return count

    def _refuse(self, reason: str) -> None:
        self._guard_refused = True
        log.warning("association with %s aborted: %s", self._peer(), reason)
        sock = self.socket
        if sock is None:
            return
        with contextlib.suppress(OSError):
            sock.sendall(ABORT_INVALID_PARAMETER)
        # The peer may still be sending the rest of its PDU: stop both directions now so it
        # sees the connection end instead of filling our receive buffer.
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)

    def _peer(self) -> str:
        remote: dict[str, Any] = self.assoc.remote
        ae = (remote.get("ae_title") or "").strip()
        where = f"{remote.get('address')}:{remote.get('port')}"
        return f"{ae}@{where}" if ae else where


class GuardedDIMSEServiceProvider(DIMSEServiceProvider):
    """A DIMSE provider that aborts the association on a message it cannot decode."""

    def receive_primitive(self, primitive: P_DATA) -> None:
        try:
            super().receive_primitive(primitive)
        except Exception as exc:
            remote: dict[str, Any] = self.assoc.remote
            log.warning("association with %s:%s aborted: undecodable DIMSE message (%s: %s)",
                        remote.get("address"), remote.get("port"), type(exc).__name__, exc)
            self._discard_message()
            self.dul.event_queue.put("Evt19")  # invalid PDU: A-ABORT, then the close

    def _discard_message(self) -> None:
        message, self.message = self.message, None
        discard_partial_dataset(message)


def discard_partial_dataset(message: object) -> None:
    """Remove the temporary file of a C-STORE cut off mid-transfer (pynetdicom leaves it)."""
    partial = getattr(message, "_data_set_file", None)
    if partial is None:
        return
    with contextlib.suppress(OSError):
        partial.close()
    with contextlib.suppress(OSError):
        os.unlink(partial.name)


# Events raised by the local user's primitives (A-ASSOCIATE, P-DATA, A-RELEASE, A-ABORT).
_LOCAL_EVENTS = frozenset({"Evt1", "Evt7", "Evt8", "Evt9", "Evt11", "Evt14", "Evt15"})
_PRIMITIVES = {"Evt9": "P-DATA", "Evt11": "A-RELEASE request", "Evt14": "A-RELEASE response",
               "Evt15": "A-ABORT"}


class GuardedStateMachine(StateMachine):
    """A state machine that never lets an exception kill the DUL thread.

    pynetdicom runs each state-machine action in the DUL thread without catching anything: an
    exception logs a traceback, stops the DUL and then kills its thread, leaving the peer's
    connection open and the association waiting for its timers. The fuzz test found peer input
    that does this (an A-ABORT with an invalid source, an A-ASSOCIATE-RQ with an even context
    ID), and a race: a peer that sends a request and then garbage gets an A-ABORT (state 13)
    while the node is still answering, and the answer's P-DATA (Evt9) is invalid there.

    A local primitive that is invalid in the current state is dropped: nothing can be sent on
    an association being torn down. Any other failure aborts the association as pynetdicom
    would have done for an invalid PDU: A-ABORT to the peer, the connection closed, an
    A-P-ABORT for the association (so it ends now and its clean-up handlers run).
    """

    def do_action(self, event: str) -> None:
        if event in _LOCAL_EVENTS and (event, self.current_state) not in TRANSITION_TABLE:
            with contextlib.suppress(queue.Empty):
                # The primitive is still at the head of the queue (its action would take it).
                self.dul.to_provider_queue.get_nowait()
            log.info("%s not sent: the association is already ending (state %s)",
                     _PRIMITIVES.get(event, event), self.current_state)
            return
        try:
            super().do_action(event)
        except Exception as exc:  # pynetdicom has logged it and stopped the DUL
            self._abandon(event, exc)
        # The association reactor may wait for this action's outcome (prompt.py).
        wake_reactor(self.dul)

    def _abandon(self, event: str, exc: Exception) -> None:
        dul, state = self.dul, self.current_state
        remote: dict[str, Any] = dul.assoc.remote
        log.warning("association with %s:%s aborted: pynetdicom failed on %s in state %s "
                    "(%s: %s)", remote.get("address"), remote.get("port"), event, state,
                    type(exc).__name__, exc)
        sock = dul.socket
        if sock is not None and sock.socket is not None:
            if event != "Evt16":  # no A-ABORT in answer to the peer's own
                with contextlib.suppress(OSError):
                    sock.socket.sendall(ABORT_NOT_SPECIFIED)
            sock.close()
        if state != "Sta2":
            # An acceptor still waiting for its A-ASSOCIATE-RQ (state 2) takes any primitive
            # for the request; it ends when its ACSE timer expires, like after any bad request.
            abort = A_P_ABORT()
            abort.provider_reason = 0x00
            dul.to_user_queue.put(abort)
        self.transition("Sta1")



def guard(sock: AssociationSocket, received: bytes = b"") -> None:
    """Make `sock` a GuardedAssociationSocket (before its DUL reads anything). `received`:
    bytes already taken off the socket (the A-ASSOCIATE-RQ the node's gate read and
    checked), which the DUL reads first."""
    if not isinstance(sock, GuardedAssociationSocket):
        sock._guard_body = None  # type: ignore[attr-defined]
        sock._guard_refused = False  # type: ignore[attr-defined]
        sock._ahead = memoryview(bytearray(READ_AHEAD))  # type: ignore[attr-defined]
        sock._ahead_at = sock._ahead_end = 0  # type: ignore[attr-defined]
        sock.seen_readable = False  # type: ignore[attr-defined]
        sock.__class__ = GuardedAssociationSocket
    if received:
        assert isinstance(sock, GuardedAssociationSocket) and not sock.read_ahead
        sock._ahead = memoryview(bytearray(max(READ_AHEAD, len(received))))
        sock._ahead[:len(received)] = received
        sock._ahead_at, sock._ahead_end = 0, len(received)


def guard_connection(event: evt.Event) -> None:
    """EVT_CONN_OPEN handler installing the guards on the association."""
    sock = event.assoc.dul.socket
    if sock is not None:
        guard(sock)
    dimse = event.assoc.dimse
    if type(dimse) is DIMSEServiceProvider:
        dimse.__class__ = GuardedDIMSEServiceProvider
    machine = event.assoc.dul.state_machine
    if type(machine) is StateMachine:
        machine.__class__ = GuardedStateMachine


HANDLERS = [(evt.EVT_CONN_OPEN, guard_connection)]
