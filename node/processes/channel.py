"""The link between the node's main process and one of its other association processes.

One AF_UNIX SOCK_SEQPACKET socket pair per process: each message is one record (a pickled
tuple, between processes of one node and nothing else), and a connection's descriptor travels
with the message that hands it over (SCM_RIGHTS).

Main -> other:  ("settings", Settings, number) first; ("connection", port, tls, address,
                A-ASSOCIATE-RQ bytes already read, or b"") with the connection's descriptor;
                ("admitted", request, token, why); ("stop", grace).
Other -> main:  ("ready",); ("admit", request, PartitionPolicy, DeviceView | None, calling AE);
                ("release", token); ("closed", peer IP) when a connection it served ended;
                ("queued",) when it queued forward jobs.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import pickle
import socket
import threading
from typing import Any

from node.policy.admission import DeviceView, PartitionPolicy

log = logging.getLogger(__name__)

MAX_MESSAGE = 1 << 20
# How long an association process waits for the main process to admit an association: the
# answer is a dictionary look-up there, so only a main process that is stuck or gone is slower.
ADMIT_TIMEOUT = 10.0
GONE = "the node's main process is gone"


class Channel:
    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self._send_lock = threading.Lock()

    @classmethod
    def pair(cls) -> tuple[Channel, socket.socket]:
        """A channel for this side and the other side's socket (to pass to the process)."""
        mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        return cls(mine), theirs

    def send(self, *message: Any, fd: int | None = None) -> None:
        """Raises OSError when the other side is gone."""
        data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
        with self._send_lock:
            if fd is None:
                self.sock.send(data)
            else:
                socket.send_fds(self.sock, [data], [fd])

    def receive(self) -> tuple[tuple[Any, ...], socket.socket | None] | None:
        """The next message and the connection it carries; None when the other side closed."""
        try:
            data, fds, _flags, _address = socket.recv_fds(self.sock, MAX_MESSAGE, 1)
        except OSError:
            return None
        if not data:
            return None
        sock = socket.socket(fileno=fds[0]) if fds else None
        return pickle.loads(data), sock

    def close(self) -> None:
        self.sock.close()


class RemoteAdmissions:
    """`registry.Admissions` for an association process: the main process's registry decides."""

    def __init__(self, channel: Channel) -> None:
        self.channel = channel
        self._requests = itertools.count(1)
        self._lock = threading.Lock()
        self._waiting: dict[int, tuple[threading.Event, list[Any]]] = {}
        self._closed = False

    def admit(self, partition: PartitionPolicy, device: DeviceView | None,
              calling_ae: str) -> tuple[int | None, str | None]:
        request = next(self._requests)
        done = threading.Event()
        answer: list[Any] = []
        with self._lock:
            if self._closed:
                return None, GONE
            self._waiting[request] = (done, answer)
        try:
            self.channel.send("admit", request, partition, device, calling_ae)
            done.wait(ADMIT_TIMEOUT)
            unreachable = None
        except OSError as exc:
            unreachable = exc
        with self._lock:
            # Under the lock: an answer arriving now either is in `answer` or finds no one
            # waiting and gives its token back.
            self._waiting.pop(request, None)
        if unreachable is not None:
            return None, f"the node's main process cannot be reached ({unreachable})"
        if not answer:
            return None, GONE if self._closed else \
                "the node's main process did not answer the admission in time"
        token, why = answer
        return token, why

    def answered(self, request: int, token: int | None, why: str | None) -> None:
        with self._lock:
            waiting = self._waiting.get(request)
            if waiting is not None:
                done, answer = waiting
                answer.extend((token, why))
                done.set()
        if waiting is None and token is not None:
            self.release(token)  # counted there for an association that timed out here

    def close(self) -> None:
        """No more answers will come (the main process is gone, or this process stops):
        refuse what waits for one, and every later request, at once."""
        with self._lock:
            self._closed = True
            for done, _ in self._waiting.values():
                done.set()

    def release(self, token: int) -> None:
        # A main process that is gone took its count with it.
        with contextlib.suppress(OSError):
            self.channel.send("release", token)
