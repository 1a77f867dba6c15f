"""What pynetdicom has no option for, on associations the node opens: socket and queue."""

from __future__ import annotations

import contextlib
import queue
import socket
from typing import Any

from pynetdicom import evt
from pynetdicom.events import EventHandlerType

from node import dicomtrace
from node.internals import pdu_guard
from node.internals.timers import monotonic_timers


def tcp_nodelay(event: evt.Event) -> None:
    """EVT_CONN_OPEN handler: send small PDUs at once.

    A DIMSE message goes out as several small writes; with Nagle's algorithm each one after
    the first waits for the peer's delayed ACK (~40 ms on Linux loopback).
    """
    sock = getattr(event.assoc.dul.socket, "socket", None)
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class ResponsesForTheWaiter(queue.Queue[Any]):
    """A DIMSE message queue that keeps a response for the `send_*` call waiting for it.

    pynetdicom's reactor polls the queue without blocking, while `send_c_store` and the other
    `send_*` calls pause it and then wait on the queue for their response. The pause has a gap:
    a reactor that has just passed its checkpoint can still poll once, and if the response
    arrives in that moment the reactor takes it, logs "Received unexpected C-STORE service
    message" and the sender waits out its DIMSE timeout. So while a call has the reactor
    paused (its checkpoint cleared), the reactor's polls take requests only (a peer's
    N-EVENT-REPORT); between calls it still takes, and drops, a response nobody waits for,
    which must not be read as the answer to the next request.
    """

    def __init__(self, assoc: Any) -> None:
        super().__init__()
        self.assoc = assoc

    def get(self, block: bool = True, timeout: float | None = None) -> Any:
        if block or self.assoc._reactor_checkpoint.is_set():
            return super().get(block, timeout)
        with self.not_empty:
            if not self._qsize() or not _is_request(self.queue[0]):
                raise queue.Empty
            item = self._get()
            self.not_full.notify()
            return item


def _is_request(item: tuple[int | None, Any]) -> bool:
    msg = item[1]
    return msg is not None and bool(msg.is_valid_request)


def responses_for_the_waiter(event: evt.Event) -> None:
    """EVT_CONN_OPEN handler: install `ResponsesForTheWaiter` before any message arrives."""
    event.assoc.dimse.msg_queue = ResponsesForTheWaiter(event.assoc)


# The node's peers on outbound associations are devices it was told about, but what they send
# back gets the same PDU checks as inbound traffic.
def monotonic_timers_on_open(event: evt.Event) -> None:
    """EVT_CONN_OPEN: the association's timers go by the monotonic clock (timers.py)."""
    monotonic_timers(event.assoc.dul)


CONNECTION_HANDLERS: list[EventHandlerType] = [
    *dicomtrace.HANDLERS,
    (evt.EVT_CONN_OPEN, tcp_nodelay),
    (evt.EVT_CONN_OPEN, monotonic_timers_on_open),
    (evt.EVT_CONN_OPEN, responses_for_the_waiter),
    *pdu_guard.HANDLERS,
]
