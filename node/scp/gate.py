"""The node's gate for new connections (main process): every connection is counted by peer
address, and a plain DICOM connection's whole A-ASSOCIATE-RQ is read and checked here,
within `dicom.handshake_timeout`, before pynetdicom (or an association process) gets it.

pynetdicom counts a connection against `maximum_associations` from the moment it has an
acceptor thread, and that thread waits the whole ACSE timeout for a request that never comes
or the network timeout for the rest of a PDU: a few hundred half-open connections locked
every other caller out for 30-120 s. Here one thread with a selector holds all connections
in their handshake; a connection that closes or sends something malformed is cut off as soon
as that is known, one that is slow after the handshake timeout, and none of them holds an
association slot. The request's bytes go along with the socket and are replayed to
pynetdicom's DUL (pdu_guard.guard).
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import selectors
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

from pynetdicom.pdu import A_ASSOCIATE_RQ

from node import dicomtrace
from node.activity import ActivityLog, Event
from node.policy.handshake import (
    REJECT_PROTOCOL_VERSION,
    ConnectionLimits,
    Refusals,
    check_associate_rq,
    refuse_connection,
    unsupported_version,
)
from node.scp.listener import ABORT_INVALID, screen

log = logging.getLogger(__name__)

Address = tuple[str, int]
# (socket, address, the A-ASSOCIATE-RQ's bytes): a connection ready for an association.
Deliver = Callable[[socket.socket, Address, bytes], None]


def undecodable(request: bytes) -> str | None:
    """Why pynetdicom cannot decode this A-ASSOCIATE-RQ, or None. Its DUL answers such a
    request with an A-ABORT but leaves the association's thread waiting the whole ACSE
    timeout for a request that never comes (a slot, and the peer address's count, held 30 s):
    what pynetdicom cannot decode is refused here."""
    try:
        pdu = A_ASSOCIATE_RQ()
        pdu.decode(request)
        pdu.to_primitive()
    except Exception as exc:  # whatever a hostile request makes the decoder raise
        return f"A-ASSOCIATE-RQ that cannot be decoded ({type(exc).__name__}: {exc})"[:200]
    return None


class Connections:
    """Open connections by peer address (every port, every association process), and those
    still in their handshake; `open` says whether one more may start."""

    def __init__(self, limits: ConnectionLimits) -> None:
        self.limits = limits
        self._lock = threading.Lock()
        self._handshaking: Counter[str] = Counter()
        self._serving: Counter[tuple[int, str]] = Counter()  # (owner process, ip)

    def open(self, ip: str) -> str | None:
        """Count a new connection in handshake; or why it must be closed (not counted)."""
        with self._lock:
            held = self._handshaking[ip] + sum(n for (_, addr), n in self._serving.items()
                                               if addr == ip)
            why = refuse_connection(self.limits, held, self._handshaking.total())
            if why is None:
                self._handshaking[ip] += 1
            return why

    def handshaken(self, ip: str, owner: int) -> None:
        """Its handshake is over; process `owner` serves it until `closed`."""
        with self._lock:
            self._drop(self._handshaking, ip)
            self._serving[(owner, ip)] += 1

    def abandoned(self, ip: str) -> None:
        """Closed during its handshake."""
        with self._lock:
            self._drop(self._handshaking, ip)

    def closed(self, ip: str, owner: int) -> None:
        with self._lock:
            self._drop(self._serving, (owner, ip))

    def release_owner(self, owner: int) -> None:
        """Forget the connections of a process that ended."""
        with self._lock:
            for key in [k for k in self._serving if k[0] == owner]:
                del self._serving[key]

    def counts(self) -> tuple[int, int]:
        """(connections in handshake, connections being served)."""
        with self._lock:
            return self._handshaking.total(), self._serving.total()

    @staticmethod
    def _drop(counter: Counter, key: object) -> None:
        if counter[key] <= 1:
            counter.pop(key, None)
        else:
            counter[key] -= 1


@dataclass
class _Waiting:
    sock: socket.socket
    address: Address
    deliver: Deliver
    deadline: float
    data: bytearray = field(default_factory=bytearray)
    wanted: int = 6  # bytes the request has until its end is known, then its whole length


class HandshakeGate:
    """One thread for every connection in its handshake."""

    def __init__(self, connections: Connections, timeout: float,
                 activity: ActivityLog | None) -> None:
        self.connections = connections
        self.timeout = timeout
        self.activity = activity if activity is not None and activity.enabled else None
        self.refusals = Refusals()
        self._refusals_lock = threading.Lock()  # the accept loops refuse too
        self._new: queue.SimpleQueue[_Waiting] = queue.SimpleQueue()
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="handshake-gate", daemon=True)
        self._thread.start()

    # --- called by the listeners' accept loops -----------------------------------------------

    def refused(self, sock: socket.socket, address: Address) -> bool:
        """Count a new connection, or close it at once when a limit says so (True)."""
        why = self.connections.open(address[0])
        if why is None:
            return False
        self._refuse(sock, address, "limit", b"", why)
        return True

    def admit(self, sock: socket.socket, address: Address, deliver: Deliver) -> None:
        """Read the connection's A-ASSOCIATE-RQ (counted by `refused`), then `deliver` it."""
        sock.setblocking(False)
        self._new.put(_Waiting(sock, address, deliver, time.monotonic() + self.timeout))
        self._wake()

    def stop(self) -> None:
        self._stopping = True
        self._wake()
        self._thread.join(5.0)

    def _wake(self) -> None:
        with contextlib.suppress(OSError):
            os.write(self._wake_w, b"\0")

    # --- the gate's thread ---------------------------------------------------------------

    def _run(self) -> None:
        waiting: dict[socket.socket, _Waiting] = {}
        with selectors.DefaultSelector() as selector:
            selector.register(self._wake_r, selectors.EVENT_READ)
            while not self._stopping:
                now = time.monotonic()
                timeouts = [w.deadline - now for w in waiting.values()]
                with self._refusals_lock:
                    report = self.refusals.next_due()
                if report is not None:
                    timeouts.append(report)
                ready = selector.select(max(0.0, min(timeouts, default=1.0)))
                for key, _ in ready:
                    if key.fileobj == self._wake_r:
                        with contextlib.suppress(OSError):
                            os.read(self._wake_r, 4096)
                        continue
                    sock = key.fileobj  # (registered: the wake pipe's fd, else sockets)
                    entry = waiting.get(sock) if isinstance(sock, socket.socket) else None
                    if entry is not None and self._read(entry):
                        selector.unregister(entry.sock)
                        del waiting[entry.sock]
                while True:
                    try:
                        entry = self._new.get_nowait()
                    except queue.Empty:
                        break
                    waiting[entry.sock] = entry
                    selector.register(entry.sock, selectors.EVENT_READ)
                now = time.monotonic()
                for entry in [w for w in waiting.values() if w.deadline <= now]:
                    selector.unregister(entry.sock)
                    del waiting[entry.sock]
                    self._give_up(entry, "timeout", b"",
                                  f"no complete A-ASSOCIATE-RQ within {self.timeout:g} s "
                                  f"(handshake_timeout; {len(entry.data)} bytes received)")
                self._report_repeats()
            for entry in waiting.values():
                self._give_up(entry, "stopping", b"", "the node is stopping")
        for fd in (self._wake_r, self._wake_w):
            os.close(fd)

    def _read(self, entry: _Waiting) -> bool:
        """Take what arrived; True when the connection left the gate (delivered or refused)."""
        try:
            chunk = entry.sock.recv(entry.wanted - len(entry.data))
        except (BlockingIOError, InterruptedError):
            return False
        except OSError as exc:
            self._give_up(entry, "closed", b"",
                          f"connection failed before a complete A-ASSOCIATE-RQ ({exc})")
            return True
        if not chunk:
            self._give_up(entry, "closed", b"",
                          f"connection closed before a complete A-ASSOCIATE-RQ "
                          f"({len(entry.data)} bytes received)")
            return True
        entry.data += chunk
        if len(entry.data) < entry.wanted:
            return False
        if entry.wanted == 6:
            verdict = screen(bytes(entry.data))
            if verdict is not None:
                self._give_up(entry, "malformed", *verdict)
                return True
            entry.wanted = 6 + int.from_bytes(entry.data[2:6], "big")
            if len(entry.data) < entry.wanted:
                return False
        why = unsupported_version(bytes(entry.data))
        if why is not None:
            self._give_up(entry, "malformed", REJECT_PROTOCOL_VERSION, why)
            return True
        why = check_associate_rq(bytes(entry.data)) or undecodable(bytes(entry.data))
        if why is not None:
            self._give_up(entry, "malformed", ABORT_INVALID, why)
            return True
        entry.sock.setblocking(True)
        try:
            entry.deliver(entry.sock, entry.address, bytes(entry.data))
        except Exception:
            log.exception("the connection from %s:%d could not be served", *entry.address)
            self.connections.abandoned(entry.address[0])
            entry.sock.close()
        return True

    def _give_up(self, entry: _Waiting, kind: str, abort: bytes, why: str) -> None:
        self.connections.abandoned(entry.address[0])
        self._refuse(entry.sock, entry.address, kind, abort, why)

    def _refuse(self, sock: socket.socket, address: Address, kind: str, abort: bytes,
                why: str) -> None:
        told = ("A-ASSOCIATE-RJ" if abort[:1] == b"\x03" else "A-ABORT") if abort \
            else "connection closed"
        if dicomtrace.enabled():  # every one, where the log says only the first of a series
            dicomtrace.refused(*address, told, why)
        with self._refusals_lock:
            first = self.refusals.add(address[0], kind, why)
        if first:  # (said before the peer sees the close)
            log.warning("connection from %s:%d refused (%s): %s", *address, told, why)
            self._record(f"{address[0]}:{address[1]}", 1, f"{told}: {why}")
        if abort:
            with contextlib.suppress(OSError):
                sock.send(abort)
        with contextlib.suppress(OSError):
            sock.close()

    def _report_repeats(self) -> None:
        with self._refusals_lock:
            due = self.refusals.due()
        for ip, _kind, count, why in due:
            log.warning("%d more connection(s) from %s refused in the last %g s, the last: %s",
                        count, ip, self.refusals.window, why)
            self._record(ip, count, f"{count} more in {self.refusals.window:g} s, the last: "
                                    f"{why}")

    def _record(self, peer: str, count: int, detail: str) -> None:
        if self.activity is not None:
            self.activity.record(Event("reject", peer=peer, count=count, outcome="failed",
                                       detail=detail))
