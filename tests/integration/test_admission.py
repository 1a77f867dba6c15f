"""Association admission by called and calling AE, and partition changes applied live."""

from __future__ import annotations

import contextlib
import json
import socket
import time
from collections.abc import Callable

import pytest
from pynetdicom.sop_class import Verification

from tests import hostile
from tests.conftest import RunningNode, free_port, wait_for
from tests.dicomgen import make_instance
from tests.hostile import RawPeer
from tests.scu import associate, statuses, store


def reject_reason(port: int, called: str, calling: str) -> tuple[int, int, int] | None:
    """(result, source, diagnostic) of the A-ASSOCIATE-RJ, or None if it was accepted."""
    assoc = associate(port, called, calling, contexts=[Verification])
    if assoc.is_established:
        assoc.release()
        return None
    assert assoc.is_rejected, "expected a reject, got an abort or no answer"
    rsp = assoc.acceptor.primitive
    return (rsp.result, rsp.result_source, rsp.diagnostic)


CALLED_NOT_RECOGNISED = (1, 1, 7)
CALLING_NOT_RECOGNISED = (1, 1, 3)


def devices(node: RunningNode) -> dict[str, dict]:
    result = node.cli("device", "list", "--json")
    assert result.exit_code == 0, result.output
    return {d["name"]: d for d in json.loads(result.output)}


def test_unknown_called_ae_is_rejected(node: RunningNode) -> None:
    assert reject_reason(node.port, "NOSUCHAE", "CT1") == CALLED_NOT_RECOGNISED
    assert reject_reason(node.port, "PACSNODE", "CT1") is None


def test_closed_partition_rejects_unknown_devices(node: RunningNode) -> None:
    assert node.cli("partition", "edit", "PACSNODE", "--no-accept-any",
                    "--auto-insert").exit_code == 0
    assert reject_reason(node.port, "PACSNODE", "STRANGER") == CALLING_NOT_RECOGNISED
    assert "STRANGER" not in devices(node)  # auto-insert never admits what accept-any refuses
    assert node.cli("device", "add", "CT1", "--host", "127.0.0.1", "--port", "4006",
                    "--partition", "PACSNODE").exit_code == 0
    assert reject_reason(node.port, "PACSNODE", "CT1") is None


def test_node_wide_device_is_known_to_every_partition(node: RunningNode) -> None:
    assert node.cli("partition", "edit", "PACSNODE", "--no-accept-any").exit_code == 0
    assert node.cli("device", "add", "MR1", "--host", "127.0.0.1").exit_code == 0
    assert reject_reason(node.port, "PACSNODE", "MR1") is None


def test_disabled_device_is_rejected_then_enabled(node: RunningNode) -> None:
    assert node.cli("device", "add", "CT1", "--host", "127.0.0.1").exit_code == 0
    assert node.cli("device", "disable", "CT1").exit_code == 0
    assert reject_reason(node.port, "PACSNODE", "CT1") == CALLING_NOT_RECOGNISED
    assert node.cli("device", "enable", "CT1").exit_code == 0
    assert reject_reason(node.port, "PACSNODE", "CT1") is None


def test_auto_insert_adds_device_with_peer_ip_and_default_port(node: RunningNode) -> None:
    assert node.cli("partition", "edit", "PACSNODE", "--auto-insert",
                    "--default-remote-port", "4006").exit_code == 0
    assert statuses(store(node.port, [make_instance()], calling="NEWMOD")) == [0]
    device = devices(node)["NEWMOD"]
    assert (device["ae_title"], device["ip"], device["port"]) == ("NEWMOD", "127.0.0.1", 4006)
    assert device["partition"] == "PACSNODE" and device["auto_inserted"] is True
    # A second association does not insert it again.
    assert reject_reason(node.port, "PACSNODE", "NEWMOD") is None
    assert list(devices(node)) == ["NEWMOD"]


def test_without_auto_insert_unknown_devices_are_accepted_but_not_added(
        node: RunningNode) -> None:
    assert reject_reason(node.port, "PACSNODE", "PASSING") is None
    assert devices(node) == {}




def connect_refused(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(1)
        return s.connect_ex(("127.0.0.1", port)) != 0


def test_disabling_a_partition_takes_effect_without_restart(node: RunningNode) -> None:
    other = free_port()
    assert node.cli("partition", "add", "SHARED", "--port", str(node.port)).exit_code == 0
    assert node.cli("partition", "add", "OTHERPORT", "--port", str(other)).exit_code == 0
    assert wait_for(lambda: not connect_refused(other))
    assert reject_reason(other, "OTHERPORT", "CT1") is None

    # Shared port: the listener stays for the others, the disabled AE is refused.
    assert node.cli("partition", "disable", "SHARED").exit_code == 0
    assert reject_reason(node.port, "SHARED", "CT1") == CALLED_NOT_RECOGNISED
    assert reject_reason(node.port, "PACSNODE", "CT1") is None

    # Its own port: the node stops listening there.
    assert node.cli("partition", "disable", "OTHERPORT").exit_code == 0
    assert wait_for(lambda: connect_refused(other))
    assert node.cli("partition", "enable", "OTHERPORT").exit_code == 0
    assert wait_for(lambda: not connect_refused(other))
    assert reject_reason(other, "OTHERPORT", "CT1") is None


def test_partition_on_another_port_is_refused_there(node: RunningNode) -> None:
    other = free_port()
    assert node.cli("partition", "add", "OTHERPORT", "--port", str(other)).exit_code == 0
    assert wait_for(lambda: not connect_refused(other))
    # The called AE must be a partition of the port it was called on.
    assert reject_reason(other, "PACSNODE", "CT1") == CALLED_NOT_RECOGNISED


IMPLICIT, EXPLICIT = "1.2.840.10008.1.2", "1.2.840.10008.1.2.1"


@pytest.mark.parametrize(("settings", "expected"), [
    ("", IMPLICIT),  # default: the requestor's first proposal
    ('transfer_syntax_preference = "node"\n'
     'transfer_syntaxes = ["ExplicitVRLittleEndian", "ImplicitVRLittleEndian"]\n', EXPLICIT),
    ("enforce_default_transfer_syntax = true\n", IMPLICIT),
], ids=["requestor", "node-order", "enforce-default"])
def test_transfer_syntax_choice(make_node: object, settings: str, expected: str) -> None:
    node = make_node("[dicom]\n" + settings)  # type: ignore[operator]
    from pynetdicom import AE

    ae = AE(ae_title="TSCHECK")
    ae.add_requested_context(Verification, [IMPLICIT, EXPLICIT])
    ae.add_requested_context("1.2.840.10008.5.1.4.1.1.2", [EXPLICIT, IMPLICIT])
    assoc = ae.associate("127.0.0.1", node.port, ae_title="PACSNODE")
    assert assoc.is_established
    accepted = {cx.abstract_syntax: cx.transfer_syntax[0] for cx in assoc.accepted_contexts}
    assoc.release()
    assert accepted["1.2.840.10008.1.1"] == expected
    # The CT context lists Explicit first: only "enforce" overrides the requestor there.
    assert accepted["1.2.840.10008.5.1.4.1.1.2"] == (IMPLICIT if "enforce" in settings
                                                     else EXPLICIT)


def test_implementation_version_name_can_be_suppressed(make_node: object) -> None:
    node = make_node("[dicom]\nsend_implementation_version_name = false\n")  # type: ignore[operator]
    assoc = associate(node.port, contexts=[Verification])
    assert assoc.is_established
    name = assoc.acceptor.implementation_version_name
    assoc.release()
    assert name is None
    default = make_node(name="default")  # type: ignore[operator]
    assoc = associate(default.port, contexts=[Verification])
    name = assoc.acceptor.implementation_version_name
    assoc.release()
    assert name and name.startswith("PACSNODE")


def test_max_pdu_and_timeouts_are_applied(make_node: object,
                                          caplog: pytest.LogCaptureFixture) -> None:
    node = make_node("[dicom]\nmax_pdu_size = 65536\nacse_timeout = 1\n"  # type: ignore[operator]
                     "network_timeout = 1\nhandshake_timeout = 1\n")
    assoc = associate(node.port, contexts=[Verification])
    assert assoc.is_established
    assert assoc.acceptor.maximum_length == 65536  # what the node told the peer it receives
    # network_timeout: an idle association is closed by the node.
    assert wait_for(lambda: not assoc.is_established, timeout=5)
    # handshake_timeout: a peer that connects and says nothing is dropped, with a log line.
    caplog.set_level("WARNING")
    with socket.create_connection(("127.0.0.1", node.port), timeout=5) as silent:
        started = time.monotonic()
        assert silent.recv(16) == b""
        assert time.monotonic() - started < 3
    assert "no complete A-ASSOCIATE-RQ within 1 s" in caplog.text


def _protocol_version(rq: bytes, version: int) -> bytes:
    return rq[:6] + version.to_bytes(2, "big") + rq[8:]


def _non_ascii_abstract_syntax(rq: bytes) -> bytes:
    at = rq.index(b"1.2.840.10008.1.1")
    return rq[:at + 4] + b"\xde" + rq[at + 5:]


@pytest.mark.parametrize("mangle", [lambda rq: _protocol_version(rq, 4),
                                    _non_ascii_abstract_syntax],
                         ids=["protocol-version-4", "non-ascii-uid"])
def test_requests_pynetdicom_drops_hold_no_connection(
        make_node: object, mangle: Callable[[bytes], bytes]) -> None:
    """Well framed A-ASSOCIATE-RQs the fuzzer found that pynetdicom's state machine drops
    without an indication: its association thread waited the whole ACSE timeout (30 s),
    holding a slot and the peer address's count. With a per-address limit of 2, two of them
    locked the address out for 30 s."""
    node = make_node("[dicom]\nmax_connections_per_address = 2\n")  # type: ignore[operator]
    for _ in range(3):
        with RawPeer(node.port, timeout=10) as peer:
            peer.send(mangle(hostile.associate_rq(calling="FUZZED")))
            with contextlib.suppress(OSError):
                peer.sock.recv(1024)  # an A-ABORT or A-ASSOCIATE-RJ, or the close
    started = time.monotonic()
    assoc = associate(node.port, contexts=[Verification])
    assert assoc.is_established, "the peer's address was locked out"
    assoc.release()
    assert time.monotonic() - started < 2
