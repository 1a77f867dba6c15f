"""The pure decisions about connections before their association: request framing, limits,
refusal reports, the listen backlog (no sockets)."""

from __future__ import annotations

import struct

import pytest

from node.policy.handshake import (
    REJECT_PROTOCOL_VERSION,
    ConnectionLimits,
    Refusals,
    check_associate_rq,
    listen_backlog,
    refuse_connection,
    unsupported_version,
)
from node.scp.gate import Connections, undecodable
from tests import hostile

RQ = hostile.associate_rq(abstract_syntaxes=("1.2.840.10008.1.1", "1.2.840.10008.5.1.4.1.1.2"))


def with_pdu_length(rq: bytes) -> bytes:
    return rq[:2] + struct.pack(">L", len(rq) - 6) + rq[6:]


def test_a_well_formed_request_passes() -> None:
    assert check_associate_rq(RQ) is None


@pytest.mark.parametrize(("broken", "why"), [
    (with_pdu_length(RQ[:150]), "claims"),  # truncated at 150 bytes
    (RQ[:76] + b"\0\0" + RQ[78:], "A-ASSOCIATE-RQ"),  # application context item length 0
    (with_pdu_length(RQ[:60]), "shorter than its fixed fields"),
    (with_pdu_length(RQ + b"\x99\0\0\0"), "unknown item type 0x99"),
    (with_pdu_length(RQ + b"\x10"), "stray byte"),
])
def test_malformed_requests_are_refused_with_the_reason(broken: bytes, why: str) -> None:
    reason = check_associate_rq(broken)
    assert reason is not None and why in reason


def test_an_even_context_id_and_missing_items_are_refused() -> None:
    first_context = RQ.index(b"\x20\x00", 74)
    even = bytearray(RQ)
    even[first_context + 4] = 2
    assert "must be odd" in (check_associate_rq(bytes(even)) or "")
    user_info = RQ.rindex(b"\x50\x00")
    assert "user information" in (check_associate_rq(with_pdu_length(RQ[:user_info])) or "")


def test_limits_per_address_then_for_handshakes() -> None:
    limits = ConnectionLimits(per_address=3, handshakes=10)
    assert refuse_connection(limits, 2, 9) is None
    assert "3 connections per address" in (refuse_connection(limits, 3, 0) or "")
    assert "10 connections in handshake" in (refuse_connection(limits, 0, 10) or "")
    assert refuse_connection(ConnectionLimits(0, 0), 10_000, 10_000) is None


def test_connections_count_by_address_over_processes() -> None:
    connections = Connections(ConnectionLimits(per_address=2, handshakes=3))
    assert connections.open("10.0.0.1") is None
    assert connections.open("10.0.0.1") is None
    assert connections.open("10.0.0.1") is not None  # a third from the same address
    assert connections.open("10.0.0.2") is None  # another address
    assert connections.open("10.0.0.3") is not None  # three in handshake over the node
    connections.handshaken("10.0.0.1", 1)  # served by association process 1
    connections.abandoned("10.0.0.2")
    assert connections.counts() == (1, 1)
    assert connections.open("10.0.0.1") is not None  # still two from there
    connections.release_owner(1)  # that process died
    assert connections.open("10.0.0.1") is None
    connections.handshaken("10.0.0.1", 0)
    connections.closed("10.0.0.1", 0)
    assert connections.counts() == (1, 0)


def test_backlog_holds_the_limits_within_the_kernel_cap() -> None:
    assert listen_backlog(64, 256, 4096) == 320
    assert listen_backlog(64, 256, 128) == 128
    assert listen_backlog(64, 0, 4096) == 4096  # no handshake limit: as many as allowed


def test_refusals_report_the_first_then_a_count_per_window() -> None:
    now = [0.0]
    refusals = Refusals(window=10.0, clock=lambda: now[0])
    assert refusals.add("10.0.0.9", "closed", "first")
    assert not refusals.add("10.0.0.9", "closed", "second")
    assert not refusals.add("10.0.0.9", "closed", "third")
    assert refusals.add("10.0.0.9", "malformed", "another kind")
    assert refusals.add("10.0.0.8", "closed", "another address")
    now[0] = 5.0
    assert refusals.due() == []
    assert refusals.next_due() == 5.0
    now[0] = 10.0
    assert refusals.due() == [("10.0.0.9", "closed", 2, "third")]
    assert refusals.next_due() is None
    assert refusals.add("10.0.0.9", "closed", "a new window")


def test_only_protocol_version_1_is_spoken() -> None:
    rq = hostile.associate_rq()
    assert unsupported_version(rq) is None
    assert unsupported_version(rq[:6] + b"\x00\x04" + rq[8:]) == (
        "A-ASSOCIATE-RQ of protocol version 0x0004 (only 0x0001 is known)")
    assert REJECT_PROTOCOL_VERSION[:1] == b"\x03"  # an A-ASSOCIATE-RJ, as pynetdicom sends


def test_a_request_pynetdicom_cannot_decode_is_named() -> None:
    rq = hostile.associate_rq()
    assert undecodable(rq) is None
    at = rq.index(b"RAWPEER")
    # Well framed (the gate's own check passes), but not an AE title pynetdicom can decode.
    mangled = rq[:at + 12] + b"\xfd" + rq[at + 13:]
    assert check_associate_rq(mangled) is None
    assert "cannot be decoded" in str(undecodable(mangled))
