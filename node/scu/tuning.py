"""Socket settings for associations the node opens (pynetdicom has no option for them)."""

from __future__ import annotations

import contextlib
import socket

from pynetdicom import evt

from node.scp import pdu_guard


def tcp_nodelay(event: evt.Event) -> None:
    """EVT_CONN_OPEN handler: send small PDUs at once.

    A DIMSE message goes out as several small writes; with Nagle's algorithm each one after
    the first waits for the peer's delayed ACK (~40 ms on Linux loopback).
    """
    sock = getattr(event.assoc.dul.socket, "socket", None)
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


# The node's peers on outbound associations are devices it was told about, but what they send
# back gets the same PDU checks as inbound traffic.
CONNECTION_HANDLERS = [(evt.EVT_CONN_OPEN, tcp_nodelay), *pdu_guard.HANDLERS]
