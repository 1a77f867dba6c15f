"""Hostile PDUs after an association is accepted: the node aborts that association (or closes
it), never buffers an absurd PDU, and keeps serving the others."""

from __future__ import annotations

import contextlib
import logging
import random
import socket
import struct
import threading
import time
from collections.abc import Iterator

import pytest
from pynetdicom.association import Association

from node.internals.pdu_guard import PDU_SLACK
from tests import hostile
from tests.conftest import RunningNode, incoming_files, wait_for
from tests.dicomgen import make_instance
from tests.hostile import RawPeer, echo_request, is_abort, pdu_header
from tests.integration.test_bad_input import echo_ok
from tests.scu import statuses, store

MAX_PDU = 1 << 20  # the node's default dicom.max_pdu_size
# The PDU layer does not touch the index: one backend is enough.
pytestmark = pytest.mark.parametrize("new_db", ["sqlite"], indirect=True)


def associated(node: RunningNode, timeout: float = 10.0) -> RawPeer:
    peer = RawPeer(node.port, timeout=timeout)
    answer = peer.associate()
    assert answer[:1] == b"\x02", f"no A-ASSOCIATE-AC: {answer[:16]!r}"
    return peer


def refused(peer: RawPeer) -> bool:
    """The node answered with an A-ABORT, or closed the connection without a word.

    After an A-ABORT pynetdicom waits (ARTIM timer) for the peer to close, as PS3.8 has it, so
    the test reads the abort rather than waiting for the close."""
    answer = peer.read_pdu()
    return answer == b"" or is_abort(answer)


def test_raw_echo_is_answered(node: RunningNode) -> None:
    # The raw peer itself is sound, so what the other tests see is the node refusing.
    with associated(node) as peer:
        peer.send(echo_request())
        response = peer.read_pdu()
        assert response[:1] == b"\x04"  # P-DATA-TF: the C-ECHO-RSP


def test_absurd_p_data_length_is_aborted_at_once_not_buffered(
        node: RunningNode, bystander: Association, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING)
    with associated(node, timeout=5) as peer:
        offered = 64 << 20
        sent = peer.send(pdu_header(0x04, 0xFFFFFFF0) + bytes(offered))
        # pynetdicom alone would read (and keep) all of it; the node stops after the header,
        # so only what fits in the socket buffers goes out.
        assert sent < 16 << 20, f"the node took {sent >> 20} MiB of an absurd PDU"
        answer, closed = peer.answer()
    assert is_abort(answer) and answer[8:10] == b"\x02\x06", answer  # provider, invalid param
    assert closed
    assert "longer than the maximum" in caplog.text
    assert "RAWPEER@127.0.0.1" in caplog.text


def test_p_data_longer_than_the_advertised_maximum_is_aborted(
        node: RunningNode, bystander: Association) -> None:
    with associated(node, timeout=5) as peer:
        length = MAX_PDU + PDU_SLACK + 1
        peer.send(pdu_header(0x04, length) + bytes(length))
        answer, closed = peer.answer()
    assert is_abort(answer) and closed


def test_pdus_of_the_advertised_maximum_still_pass(node: RunningNode) -> None:
    # 2 MiB of pixel data: pynetdicom sends it in P-DATA-TFs of exactly the node's maximum.
    assert statuses(store(node.port, [make_instance(size=1024)])) == [0]


def test_control_pdu_with_absurd_length_is_aborted(node: RunningNode,
                                                   bystander: Association) -> None:
    with associated(node, timeout=5) as peer:
        peer.send(pdu_header(0x05, 0xFFFFFFF0) + bytes(1 << 20))  # an "A-RELEASE-RQ"
        answer, closed = peer.answer()
    assert is_abort(answer) and closed


def test_pdu_length_shorter_than_the_bytes_sent(node: RunningNode,
                                                bystander: Association) -> None:
    echo = echo_request()
    length = struct.unpack(">L", echo[2:6])[0]
    # The PDU ends 10 bytes early: its PDV item is cut and the rest looks like another PDU.
    with associated(node, timeout=5) as peer:
        peer.send(echo[:2] + struct.pack(">L", length - 10) + echo[6:])
        assert refused(peer)


def test_pdu_length_longer_than_the_bytes_sent_then_close(node: RunningNode,
                                                          bystander: Association) -> None:
    echo = echo_request()
    with associated(node, timeout=5) as peer:
        peer.send(echo[:2] + struct.pack(">L", len(echo) + 100) + echo[6:])
        peer.sock.shutdown(socket.SHUT_WR)
        answer, closed = peer.answer()
    assert closed and (answer == b"" or is_abort(answer))


def test_unknown_pdu_types_after_association(node: RunningNode,
                                             bystander: Association) -> None:
    for pdu_type in (0x00, 0x08, 0x09, 0x7F, 0xFF):
        with associated(node, timeout=5) as peer:
            peer.send(pdu_header(pdu_type, 4) + b"\0" * 4)
            assert is_abort(peer.read_pdu()), f"PDU type 0x{pdu_type:02X}"


def test_random_bytes_after_the_a_associate_ac(node: RunningNode,
                                               bystander: Association) -> None:
    for seed in range(10):
        garbage = random.Random(seed).randbytes(4096)
        with associated(node, timeout=5) as peer:
            peer.send(garbage)
            peer.sock.shutdown(socket.SHUT_WR)
            assert refused(peer), f"seed {seed}"


def test_peer_that_stops_mid_pdu_is_closed_after_the_network_timeout(
        make_node: object, caplog: pytest.LogCaptureFixture) -> None:
    node: RunningNode = make_node("[dicom]\nnetwork_timeout = 1.0\n")  # type: ignore[operator]
    caplog.set_level(logging.WARNING)
    echo = echo_request()
    with associated(node, timeout=10) as peer:
        peer.send(echo[:2] + struct.pack(">L", len(echo) + 100) + echo[6:])  # then silence
        answer, closed = peer.answer()
    assert closed and (answer == b"" or is_abort(answer))
    assert "Traceback" not in caplog.text
    assert echo_ok(node)


UNDECODABLE = {
    "no Command Field": hostile.p_data(1, 0x03, hostile.command(MessageID=1)),
    "unknown Command Field": hostile.p_data(1, 0x03, hostile.command(
        CommandField=0x0F0F, MessageID=1, CommandDataSetType=0x0101)),
    "C-STORE on a context never proposed": hostile.p_data(99, 0x03, hostile.command(
        CommandField=0x0001, MessageID=1, CommandDataSetType=0x0000,
        AffectedSOPClassUID="1.2.840.10008.5.1.4.1.1.2", AffectedSOPInstanceUID="1.2.3")),
    "C-STORE without its UIDs": hostile.p_data(1, 0x03, hostile.command(
        CommandField=0x0001, MessageID=1, CommandDataSetType=0x0000)),
    "command set that is not a dataset": hostile.p_data(1, 0x03, b"\xff" * 11),
}


@pytest.mark.parametrize("name", list(UNDECODABLE))
def test_undecodable_dimse_message_aborts_the_association(
        node: RunningNode, bystander: Association, caplog: pytest.LogCaptureFixture,
        name: str) -> None:
    # pynetdicom raises these inside its state machine; unguarded, the DUL thread dies.
    died: list[str] = []
    previous = threading.excepthook
    threading.excepthook = lambda args: died.append(f"{args.exc_type.__name__}")
    try:
        with associated(node, timeout=5) as peer:
            peer.send(UNDECODABLE[name])
            assert refused(peer), name
    finally:
        threading.excepthook = previous
    assert died == []
    assert "undecodable DIMSE message" in caplog.text or "Received an invalid" in caplog.text
    assert wait_for(lambda: incoming_files(node.storage) == [])


def test_answer_to_a_request_followed_by_garbage_is_dropped_quietly(
        node: RunningNode, bystander: Association) -> None:
    # The echo is read, then the garbage aborts the association while the node is answering
    # the echo: unguarded, pynetdicom raises InvalidEventError (P-DATA in state 13) and the
    # association's DUL thread dies.
    died: list[str] = []
    previous = threading.excepthook
    threading.excepthook = lambda args: died.append(f"{args.exc_type.__name__}")
    try:
        for _ in range(5):
            with associated(node, timeout=5) as peer:
                peer.send(echo_request() + pdu_header(0x09, 4) + b"\0" * 4)
                answer = peer.read_pdu()
                if answer[:1] == b"\x04":  # the echo answer won the race: then the abort
                    answer = peer.read_pdu()
                assert is_abort(answer)
    finally:
        threading.excepthook = previous
    assert died == []


@contextlib.contextmanager
def no_thread_dies() -> Iterator[list[str]]:
    died: list[str] = []
    previous = threading.excepthook
    threading.excepthook = lambda args: died.append(f"{args.exc_type.__name__}: {args.exc_value}")
    try:
        yield died
    finally:
        threading.excepthook = previous
    assert died == [], died


def test_a_abort_with_an_invalid_source(node: RunningNode, bystander: Association) -> None:
    # pynetdicom raises ValueError converting it, inside its state machine.
    with no_thread_dies(), associated(node, timeout=5) as peer:
        peer.send(pdu_header(0x07, 4) + bytes([0, 0, 9, 0]))
        answer, closed = peer.answer()
        assert closed and (answer == b"" or is_abort(answer))


def test_a_associate_rq_with_an_even_context_id(node: RunningNode,
                                                bystander: Association) -> None:
    # pynetdicom raises ValueError building the request primitive (action AE-6).
    rq = hostile.with_context_id(hostile.associate_rq(), 2)
    with no_thread_dies(), RawPeer(node.port, timeout=5) as peer:
        peer.send(rq)
        started = time.monotonic()
        answer, closed = peer.answer()
        assert closed and is_abort(answer), answer[:16]
        assert time.monotonic() - started < 2  # closed at once, not after a timer
