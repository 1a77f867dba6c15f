"""Wake pynetdicom's two association threads when there is work, instead of polling.

pynetdicom runs each association as two threads that poll: the association reactor sleeps a
fixed 1 ms between looks at its DIMSE queue, and the DUL thread sleeps 1 ms whenever it found
nothing to do. Every C-STORE pays these sleeps on the way in and on the way out (about 3 ms
per small image on one association, see docs/performance/journal.md), and every idle
association wakes 2000 times a second.

`PromptDUL` waits in `select()` on the peer's socket and on a pipe that `send_pdu` and
`kill_dul` write to, so it reads a PDU as soon as it arrives and sends a primitive as soon as
it is queued. `PromptAssociation` waits on an event the DUL's state machine sets after each
action (a DIMSE message completed, a release or abort arrived), so a request is served as soon
as it is decoded. Both still wake every `IDLE_WAIT` to check their timers.

pynetdicom has no hook for either loop, so these subclasses replace `run_reactor` and
`_run_reactor` with the same steps in the same order, only the sleep changed; `prompt` (an
EVT_CONN_OPEN handler, run before either thread starts on an accepted connection) swaps the
classes, and gives the DUL thread its server's `affinity.ReceiverPinning`. Written against
pynetdicom 3.0; the association tests exercise every exit of both
loops (release, abort, peer gone, network timeout).
"""

from __future__ import annotations

import contextlib
import logging
import queue
import select
import socket
import ssl
import struct
import threading
import weakref
from typing import Any

from pynetdicom import evt
from pynetdicom.association import Association
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.dul import DULServiceProvider
from pynetdicom.pdu import A_ABORT_RQ
from pynetdicom.pdu_primitives import A_ABORT as A_ABORT_PRIMITIVE
from pynetdicom.pdu_primitives import A_ASSOCIATE, A_P_ABORT, A_RELEASE, P_DATA
from pynetdicom.service_class import ServiceClass, StorageServiceClass
from pynetdicom.sop_class import uid_to_service_class

from node import sop_classes
from node.affinity import ReceiverPinning
from node.internals.direct_store import P_DATA_TF, DirectStore, ProtocolError
from node.internals.timers import monotonic_timers

log = logging.getLogger(__name__)

# How long either thread waits with nothing to do before it checks its timers (ARTIM, network
# timeout; pynetdicom's count seconds). Work, a stop (kill_dul, kill) and every state-machine
# action wake them at once, so this only bounds how late a timer is seen. Each turn costs
# Python work: at 10 ms, 12 idle associations took 18% of a core on the development machine.
IDLE_WAIT = 0.1
_FREE, _REQUESTED, _LENT = "free", "requested", "lent"


class _WaitsForWork(DULServiceProvider):
    """What both prompt DULs share: a wake-up socket pair that queued primitives and a kill
    write to, and a wait in select() on it and on the peer's socket; and the socket lent to
    another thread (`lend`), during which the DUL neither reads nor writes it."""

    # A socket pair, not a pipe: a closed socket object refuses writes, where a closed pipe's
    # file descriptor number could meanwhile belong to another file.
    _wake_r: socket.socket
    _wake_w: socket.socket
    # The loan: FREE, REQUESTED (a thread waits in `lend`) or LENT, changed under _loan_lock.
    _loan: str
    borrower: Any = None  # what writes to the lent socket (direct_send.Wire)
    _loan_lock: threading.Lock
    _loan_granted: threading.Event

    @property
    def lent(self) -> bool:
        return self._loan == _LENT

    def lend(self, timeout: float) -> bool:
        """Hand the peer's socket to the calling thread (direct_send.py): once the DUL has
        nothing half done (no PDU half read, nothing queued to send or to act on, the
        association established), it stops reading and sending until `give_back`, and meanwhile
        acts only on what the borrower hands it (`deliver`). False if it was not granted within
        `timeout` seconds (the association is busy or ending)."""
        with self._loan_lock:
            if self._loan != _FREE:
                return False
            self._loan = _REQUESTED
            self._loan_granted.clear()
        self._wake()
        self._loan_granted.wait(timeout)
        with self._loan_lock:
            if self._loan == _LENT:
                return True
            self._loan = _FREE  # not granted in time, or refused
            return False

    def give_back(self) -> None:
        """End the loan: the DUL reads and sends again (what was queued meanwhile first)."""
        with self._loan_lock:
            self._loan = _FREE
        self._wake()

    def deliver(self, pdu: bytes) -> None:
        """A PDU the borrower read but does not handle (a C-CANCEL, an N-EVENT-REPORT, a
        release or abort request): acted on by the DUL as if it had read it itself."""
        try:
            decoded, event = self._decode_pdu(bytearray(pdu))
        except Exception as exc:
            log.error("unable to decode the received PDU: %s: %s", type(exc).__name__, exc)
            self.event_queue.put("Evt19")
        else:
            self.event_queue.put(event)
            self._recv_pdu.put(decoded)
        self._wake()

    def _lending(self) -> bool:
        """True while the socket is lent; grants a requested loan when nothing is half done."""
        if self._loan == _FREE:
            return False
        with self._loan_lock:
            if self._loan == _REQUESTED:
                if self.state_machine.current_state != "Sta6":
                    self._loan = _FREE  # ending: the borrower goes through pynetdicom
                    self._loan_granted.set()
                    return False
                if not self._idle():
                    return False
                self._loan = _LENT
                self._loan_granted.set()
            return self._loan == _LENT

    def _idle(self) -> bool:
        return (self.event_queue.empty() and self.to_provider_queue.empty()
                and getattr(self.assoc.dimse, "message", None) is None)

    def _process_recv_primitive(self) -> bool:
        if self._loan == _LENT:
            return False  # queued primitives are sent after the loan
        return super()._process_recv_primitive()

    def _is_transport_event(self) -> bool:
        if self._lending():
            # The borrower reads the socket and answers what it waits for; the association
            # is not idle meanwhile.
            self._idle_timer.restart()
            return False
        return super()._is_transport_event()

    def send_pdu(self, primitive: A_ASSOCIATE | A_RELEASE | A_ABORT_PRIMITIVE | A_P_ABORT
                 | P_DATA) -> None:
        super().send_pdu(primitive)
        self._wake()

    def kill_dul(self) -> None:
        super().kill_dul()
        self._wake()

    def _wake(self) -> None:
        with contextlib.suppress(OSError):  # full (already woken) or closed (thread ended)
            self._wake_w.send(b"\0")

    def _wait_for_work(self) -> None:
        if self._loan == _LENT:
            with contextlib.suppress(OSError, ValueError):
                if select.select([self._wake_r], [], [], IDLE_WAIT)[0]:
                    self._wake_r.recv(4096)
            return
        sock = self.socket.socket if self.socket is not None else None
        if isinstance(sock, ssl.SSLSocket) and sock.pending():
            return  # decrypted bytes already buffered: select() cannot see them
        if getattr(self.socket, "read_ahead", 0):
            return  # the next PDU was read with the last one (pdu_guard)
        watched = [self._wake_r] if sock is None or sock.fileno() < 0 else [self._wake_r, sock]
        try:
            ready, _, _ = select.select(watched, [], [], IDLE_WAIT)
        except (OSError, ValueError):
            return  # the socket closed meanwhile: the loop sees it
        if sock is not None and sock in ready and self.socket is not None:
            # pynetdicom's _is_transport_event asks the socket's `ready` next, a select() of
            # its own; pdu_guard's socket answers from this instead.
            self.socket.seen_readable = True  # type: ignore[attr-defined]
        if self._wake_r in ready:
            with contextlib.suppress(OSError):
                self._wake_r.recv(4096)


def _add_wake_pair(dul: DULServiceProvider) -> None:
    dul._wake_r, dul._wake_w = socket.socketpair()  # type: ignore[attr-defined]
    dul._wake_r.setblocking(False)  # type: ignore[attr-defined]
    dul._wake_w.setblocking(False)  # type: ignore[attr-defined]
    dul._loan = _FREE  # type: ignore[attr-defined]
    dul._loan_lock = threading.Lock()  # type: ignore[attr-defined]
    dul._loan_granted = threading.Event()  # type: ignore[attr-defined]


class PromptDUL(_WaitsForWork):
    """A DUL thread that blocks until the socket is readable or a primitive is queued."""

    # Takes C-STORE requests off the wire once the association is admitted (direct_store.py).
    store_receiver: DirectStore | None = None
    _pinning: ReceiverPinning

    def run(self) -> None:
        # pynetdicom made the thread's target the base class's run_reactor when it created it.
        with self._pinning.running():
            self.run_reactor()

    def run_reactor(self) -> None:
        try:
            self._loop()
        finally:
            if self.store_receiver is not None:
                self.store_receiver.abandon()
            _close_all(self._wake_r, self._wake_w)

    def _idle(self) -> bool:
        receiver = self.store_receiver
        return super()._idle() and (receiver is None or not receiver.busy)

    def _read_pdu_data(self) -> None:
        # pynetdicom's DULServiceProvider._read_pdu_data (same reads, same events), except that
        # a P-DATA-TF in Sta6 is first offered to the direct C-STORE receiver.
        sock = self.socket
        assert sock is not None
        try:
            header = sock.recv(6)
            pdu_type, _, length = struct.unpack(">BBL", header)
        except (OSError, struct.error):
            self.event_queue.put("Evt17")  # closed before a whole header arrived
            return
        if not 0x01 <= pdu_type <= 0x07:
            log.error("unknown PDU type 0x%02X received", pdu_type)
            self.event_queue.put("Evt19")
            return
        try:
            body = sock.recv(length)
        except OSError:
            body = bytearray()
        if len(body) != length:
            log.error("connection closed before the entire PDU was received")
            self.event_queue.put("Evt17")
            return
        receiver = self.store_receiver
        if receiver is not None:
            if pdu_type == P_DATA_TF and self.state_machine.current_state == "Sta6":
                try:
                    if receiver.receive(body):
                        return
                except ProtocolError as exc:
                    log.warning("association with %s aborted: %s", _peer(self), exc)
                    receiver.abandon()
                    self.event_queue.put("Evt19")  # A-ABORT, as for any invalid PDU
                    return
            elif receiver.busy:
                receiver.abandon()  # a release or abort cut the data set off
        try:
            pdu, event = self._decode_pdu(header + body)
        except Exception as exc:
            log.error("unable to decode the received PDU: %s: %s", type(exc).__name__, exc)
            self.event_queue.put("Evt19")
            return
        self.event_queue.put(event)
        self._recv_pdu.put(pdu)

    def _loop(self) -> None:
        # pynetdicom's DULServiceProvider.run_reactor, waiting in _wait_for_work instead of
        # sleeping _run_loop_delay.
        self._idle_timer.start()
        while True:
            if not self.assoc._dul_ready.is_set():
                self.assoc._dul_ready.set()
            if self._kill_thread:
                break
            if self.artim_timer.expired:
                self.event_queue.put("Evt18")
            try:
                if self._process_recv_primitive():
                    pass
                elif self._is_transport_event():
                    self._idle_timer.restart()
            except Exception as exc:
                log.error("DUL failed, aborting the association: %s: %s",
                          type(exc).__name__, exc)
                self._abort_at_once()
                return
            try:
                event = self.event_queue.get(block=False)
            except queue.Empty:
                self._wait_for_work()
                continue
            self.state_machine.do_action(event)

    def _abort_at_once(self) -> None:
        # As pynetdicom does: bypass the state machine, whose state can no longer be trusted.
        abort = A_ABORT_RQ()
        abort.source = 0x02
        abort.reason_diagnostic = 0x00
        if self.socket is not None:
            with contextlib.suppress(OSError):
                self.socket.send(abort.encode())
        self.assoc.is_aborted = True
        self.assoc.is_established = False
        self.assoc._kill = True
        self._kill_thread = True


class PromptAssociation(Association):
    """An association reactor that waits for its DUL's next action instead of sleeping."""

    _prompt_wake: threading.Event

    def kill(self) -> None:
        super().kill()
        self._prompt_wake.set()  # the reactor ends now, not when its wait runs out

    def _serve_request(self, msg: Any, context_id: int) -> None:
        # pynetdicom serves C-STORE only for the storage classes it lists and aborts for the
        # others; the node accepted their contexts as storage too (sop_classes.py), so
        # they are served as storage. (The direct receiver takes almost every C-STORE; this
        # is for the few it leaves to pynetdicom, e.g. from a peer with a tiny maximum PDU.)
        context = self._accepted_cx.get(context_id)
        sop_class = str(getattr(msg, "AffectedSOPClassUID", ""))
        if not (isinstance(msg, C_STORE) and context is not None and not self._sent_release
                and uid_to_service_class(sop_class) is ServiceClass
                and sop_classes.is_stored(sop_class)):
            super()._serve_request(msg, context_id)
            return
        self._is_paused = True  # as pynetdicom's: the handler may call send_*()
        try:
            StorageServiceClass(self).SCP(msg, context)
        except Exception:
            log.exception("C-STORE of %s failed", sop_class)
            self.abort()
        finally:
            self._is_paused = False

    def _run_reactor(self) -> None:
        # pynetdicom's Association._run_reactor, waiting on _prompt_wake instead of a fixed
        # 1 ms sleep. The event is cleared before the queues are looked at, so an action that
        # lands meanwhile sets it again and is seen on the next turn.
        wake = self._prompt_wake
        while not self._kill:
            # Paused while it waits, and while a send_*() from another thread waits for its
            # own answer: such a call clears the checkpoint and then waits until the reactor
            # says it is paused (in 0.1 ms sleeps), which pynetdicom's reactor says within a
            # millisecond; waiting here it would not say so for up to IDLE_WAIT (a forwarding
            # association's C-ECHO took 90 ms). Nothing in the wait touches the queues, and
            # after it the reactor stops at the checkpoint before it does.
            self._is_paused = True
            wake.wait(IDLE_WAIT)
            wake.clear()
            self._reactor_checkpoint.wait()
            self._is_paused = False
            context_id, msg = self.dimse.get_msg(block=False)
            if msg:
                self._serve_request(msg, context_id)  # type: ignore[arg-type]
                wake.set()  # another request may have arrived while this one was served
            if self.is_established and self.acse.is_release_requested():
                # Marked released before the answer goes out: the DUL now sends it at once,
                # and the peer's close (EVT_CONN_CLOSE, whose handlers ask is_released) can
                # arrive before this thread would otherwise have got here.
                self.is_released = True
                self.is_established = False
                self.acse.send_release(is_response=True)
                log.debug("association released")
                evt.trigger(self, evt.EVT_RELEASED, {})
                self.kill()
                return
            if self.acse.is_aborted():
                self.dul.receive_pdu(wait=False)  # so EVT_ACSE_RECV fires for the abort
                self.is_aborted = True
                self.is_established = False
                evt.trigger(self, evt.EVT_ABORTED, {})
                self.kill()
                return
            if not self.dul.is_alive():
                self.kill()
                return
            if self.dul.idle_timer_expired():
                log.error("network timeout reached")
                if self.network_timeout_response == "A-RELEASE":
                    self._is_paused = True
                    self._reactor_checkpoint.wait()
                    self.release()
                    self._is_paused = False
                else:
                    self.abort()
                self.kill()
                return


def _peer(dul: DULServiceProvider) -> str:
    remote = dul.assoc.remote
    return f"{(remote.get('ae_title') or '').strip()}@{remote.get('address')}:{remote.get('port')}"


def wake_reactor(dul: DULServiceProvider) -> None:
    """Called by the DUL's state machine after each action (see pdu_guard)."""
    wake = getattr(dul.assoc, "_prompt_wake", None)
    if wake is not None:
        wake.set()


def prompt(event: evt.Event, pinning: ReceiverPinning) -> None:
    """EVT_CONN_OPEN handler for accepted connections: before the association's threads start,
    make them wait for work instead of polling."""
    assoc = event.assoc
    if type(assoc) is not Association or type(assoc.dul) is not DULServiceProvider \
            or assoc.dul.is_alive():
        return  # already running (a requestor's DUL starts before it connects)
    dul = assoc.dul
    _add_wake_pair(dul)
    monotonic_timers(dul)
    dul.__class__ = PromptDUL
    dul._pinning = pinning  # type: ignore[attr-defined]
    assoc._prompt_wake = threading.Event()  # type: ignore[attr-defined]
    assoc.__class__ = PromptAssociation


def handlers(pinning: ReceiverPinning) -> list[Any]:
    """The event handlers of a server whose DUL threads `pinning` places."""
    return [(evt.EVT_CONN_OPEN, prompt, [pinning])]


class PromptRequestorDUL(_WaitsForWork):
    """The DUL of an association the node requests (forwarding), waiting for work as PromptDUL
    does.

    Its thread was started before it connected and runs pynetdicom's own loop, which sleeps
    `_run_loop_delay` (1 ms) after every turn with nothing to do: up to a millisecond before a
    queued request goes out and another before its response is read. With the delay at 0, the
    loop's look at the socket (`_is_transport_event`, asked on every turn that sent nothing)
    waits in select() instead, while nothing is queued for it to do.
    """

    def _is_transport_event(self) -> bool:
        if self._loan == _LENT or (self.event_queue.empty() and self.to_provider_queue.empty()
                                   and not self._kill_thread):
            # (lent: what is queued waits for the loan's end; what the borrower delivers
            # wakes the wait)
            self._wait_for_work()
        return super()._is_transport_event()


def prompt_requestor(event: evt.Event) -> None:
    """EVT_CONN_OPEN handler for associations the node requests (forwarding, a C-MOVE's
    sub-operations): pynetdicom triggers it in the DUL thread as the connection opens, so the
    class changes under no other thread's feet. The association's reactor thread starts only
    once the association is established: it waits for its DUL's actions too, instead of
    polling every millisecond (each of those wakes took the GIL from the thread sending the
    sub-operations)."""
    assoc = event.assoc
    dul = assoc.dul
    if type(dul) is not DULServiceProvider:
        return
    _add_wake_pair(dul)
    # The loop is pynetdicom's, with no end to hook: the pair is closed with the DUL object.
    weakref.finalize(dul, _close_all, dul._wake_r, dul._wake_w)  # type: ignore[attr-defined]
    dul._run_loop_delay = 0
    dul.__class__ = PromptRequestorDUL
    if type(assoc) is Association and not assoc.is_alive():
        assoc._prompt_wake = threading.Event()  # type: ignore[attr-defined]
        assoc.__class__ = PromptAssociation


def _close_all(*sockets: socket.socket) -> None:
    for sock in sockets:
        sock.close()
