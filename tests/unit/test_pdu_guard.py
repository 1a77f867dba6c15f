"""The PDU length guard: the decision, and the socket subclass on a local socket pair."""

from __future__ import annotations

import queue
import select
import socket
import struct
import threading
from collections.abc import Iterator
from types import SimpleNamespace

import pytest
from pynetdicom.transport import AssociationSocket

from node.internals.pdu_guard import (
    ABORT_INVALID_PARAMETER,
    MAX_ASSOCIATE_LENGTH,
    PDU_SLACK,
    READ_AHEAD,
    GuardedAssociationSocket,
    check_pdu,
    guard,
)

MIB = 1 << 20


@pytest.mark.parametrize(("pdu_type", "length", "maximum", "refused"), [
    (0x04, MIB, MIB, False),  # exactly the advertised maximum
    (0x04, MIB + PDU_SLACK, MIB, False),  # a peer that counts headers in: tolerated
    (0x04, MIB + PDU_SLACK + 1, MIB, True),
    (0x04, 0xFFFFFFF0, MIB, True),
    (0x04, 0xFFFFFFF0, 0, False),  # 0: the node advertised no limit
    (0x04, 0xFFFFFFF0, None, False),
    (0x01, MAX_ASSOCIATE_LENGTH, MIB, False),
    (0x01, MAX_ASSOCIATE_LENGTH + 1, MIB, True),
    (0x02, 0xFFFFFFFF, MIB, True),
    (0x05, 4, MIB, False),  # A-RELEASE-RQ
    (0x05, 0xFFFFFFF0, MIB, True),
    (0x07, 5000, MIB, True),  # an "A-ABORT" of 5000 bytes
    (0x09, 0xFFFFFFF0, MIB, False),  # unknown type: pynetdicom refuses it on the header
])
def test_check_pdu(pdu_type: int, length: int, maximum: int | None, refused: bool) -> None:
    assert (check_pdu(pdu_type, length, maximum) is not None) is refused


@pytest.fixture
def pair() -> Iterator[tuple[AssociationSocket, socket.socket]]:
    """A guarded AssociationSocket on one end of a socket pair, the peer on the other."""
    ours, theirs = socket.socketpair()
    ours.settimeout(2)
    local = SimpleNamespace(maximum_length=4096)
    assoc = SimpleNamespace(dul=SimpleNamespace(event_queue=queue.Queue()), is_acceptor=True,
                            acceptor=local, requestor=None,
                            remote={"ae_title": "PEER", "address": "127.0.0.1", "port": 1})
    sock = AssociationSocket(assoc, client_socket=ours)  # type: ignore[arg-type]
    guard(sock)
    yield sock, theirs
    theirs.close()
    ours.close()


def test_guarded_socket_passes_pdus_within_the_maximum(
        pair: tuple[AssociationSocket, socket.socket]) -> None:
    sock, peer = pair
    assert isinstance(sock, GuardedAssociationSocket)
    # A 6-byte body that looks like a huge P-DATA header must be read as a body, not judged.
    body = struct.pack(">BBL", 0x04, 0, 0xFFFFFFF0)
    peer.sendall(struct.pack(">BBL", 0x04, 0, 6) + body + struct.pack(">BBL", 0x05, 0, 4)
                 + b"\0" * 4)
    assert sock.recv(6)[0] == 0x04
    assert sock.recv(6) == body
    assert sock.recv(6)[0] == 0x05
    assert sock.recv(4) == b"\0" * 4


def test_guarded_socket_refuses_an_oversized_pdu_with_an_abort(
        pair: tuple[AssociationSocket, socket.socket], caplog: pytest.LogCaptureFixture
) -> None:
    sock, peer = pair
    peer.sendall(struct.pack(">BBL", 0x04, 0, 0xFFFFFFF0) + b"\0" * 1000)
    assert sock.recv(6) == b""  # the DUL sees no PDU: a closed transport
    assert sock.recv(0xFFFFFFF0) == b""  # and nothing more is read
    peer.settimeout(2)
    assert peer.recv(100) == ABORT_INVALID_PARAMETER
    assert peer.recv(100) == b""  # then the connection is shut down
    assert "PEER@127.0.0.1:1" in caplog.text


def test_guarded_socket_turns_a_timeout_into_a_quiet_close(
        pair: tuple[AssociationSocket, socket.socket], caplog: pytest.LogCaptureFixture
) -> None:
    sock, peer = pair
    assert sock.socket is not None
    sock.socket.settimeout(0.2)
    peer.sendall(struct.pack(">BBL", 0x04, 0, 100) + b"\0" * 10)  # then nothing
    assert len(sock.recv(6)) == 6
    assert sock.recv(100) == b""
    assert "timed out" in caplog.text


def test_pdus_read_ahead_are_returned_whole_and_keep_the_socket_ready(
        pair: tuple[AssociationSocket, socket.socket]) -> None:
    """One receive takes what the peer sent back to back; pynetdicom's DUL, which asks
    `ready` (a select) before each PDU, must still see the PDUs that were read ahead."""
    sock, peer = pair
    assert isinstance(sock, GuardedAssociationSocket) and sock.socket is not None
    command = struct.pack(">BBL", 0x04, 0, 10) + bytes(range(10))
    data = struct.pack(">BBL", 0x04, 0, 3000) + b"d" * 3000
    release = struct.pack(">BBL", 0x05, 0, 4) + b"\0" * 4
    peer.sendall(command + data + release)
    assert wait_readable(sock.socket)
    assert sock.recv(6) == command[:6]
    assert select.select([sock.socket], [], [], 0.2)[0] == []  # all taken off the socket
    assert sock.read_ahead == len(command + data + release) - 6
    assert sock.ready
    assert sock.recv(10) == command[6:]
    assert sock.recv(6) == data[:6] and sock.recv(3000) == data[6:]
    assert sock.recv(6) == release[:6] and sock.recv(4) == release[6:]
    assert sock.read_ahead == 0 and not sock.ready


def test_a_body_longer_than_the_read_ahead_arrives_whole(
        pair: tuple[AssociationSocket, socket.socket]) -> None:
    sock, peer = pair
    local = sock.assoc.acceptor
    local.maximum_length = 4 * READ_AHEAD
    body = bytes(range(256)) * (3 * READ_AHEAD // 256) + b"tail"
    sender = threading.Thread(target=peer.sendall,
                              args=(struct.pack(">BBL", 0x04, 0, len(body)) + body + b"next",))
    sender.start()
    assert sock.recv(6)[0] == 0x04
    assert sock.recv(len(body)) == body
    sender.join()
    assert sock.recv(4) == b"next"


def test_what_arrived_before_the_peer_closed_is_returned_short(
        pair: tuple[AssociationSocket, socket.socket]) -> None:
    sock, peer = pair
    peer.sendall(struct.pack(">BBL", 0x04, 0, 100) + b"x" * 40)
    peer.close()
    assert len(sock.recv(6)) == 6
    assert sock.recv(100) == b"x" * 40  # the DUL sees the short read: connection closed


def wait_readable(sock: socket.socket) -> bool:
    return bool(select.select([sock], [], [], 2)[0])
