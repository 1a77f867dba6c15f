"""Association limits (node, partition, calling device) and timers that cut off stuck peers."""

from __future__ import annotations

import contextlib
import os
import socket
import struct
import threading
import time

import pytest
from pynetdicom.association import Association
from pynetdicom.sop_class import Verification

from tests.conftest import RunningNode, wait_for
from tests.dicomgen import make_instance
from tests.scu import associate

LOCAL_LIMIT_EXCEEDED = (2, 3, 2)  # rejected-transient, service-provider (presentation)

# Admission does not depend on the index database: SQLite only, to keep the suite short.
pytestmark = pytest.mark.parametrize("new_db", ["sqlite"], indirect=True)


def open_assoc(node: RunningNode, calling: str, called: str = "PACSNODE") -> Association:
    return associate(node.port, called, calling, contexts=[Verification])


def reject_of(assoc: Association) -> tuple[int, int, int] | None:
    if assoc.is_established:
        return None
    assert assoc.is_rejected, "expected a reject, got an abort or no answer"
    rsp = assoc.acceptor.primitive
    return (rsp.result, rsp.result_source, rsp.diagnostic)


def release_all(assocs: list[Association]) -> None:
    for assoc in assocs:
        if assoc.is_established:
            assoc.release()


def test_per_device_limit_and_device_override(make_node: object) -> None:
    node: RunningNode = make_node("[dicom]\nmax_associations_per_device = 2\n")  # type: ignore
    held = [open_assoc(node, "CT1"), open_assoc(node, "CT1")]
    try:
        assert all(a.is_established for a in held)
        third = open_assoc(node, "CT1")
        assert reject_of(third) == LOCAL_LIMIT_EXCEEDED
        other = open_assoc(node, "MR1")  # another device is not held back
        assert other.is_established
        other.release()
        held.pop().release()
        assert wait_for(lambda: (a := open_assoc(node, "CT1")).is_established
                        and (held.append(a) or True))
    finally:
        release_all(held)
    # A device's own limit overrides the node default.
    added = node.cli("device", "add", "CT1", "--host", "127.0.0.1", "--max-inbound", "1")
    assert added.exit_code == 0, added.output
    first = open_assoc(node, "CT1")
    try:
        assert first.is_established
        assert reject_of(open_assoc(node, "CT1")) == LOCAL_LIMIT_EXCEEDED
    finally:
        first.release()
    # The activity log is written in batches about once a second.
    assert wait_for(lambda: "local limit exceeded: device 'CT1' already has 1 associations "
                    "(limit 1)" in node.cli("activity", "--kind", "reject", "--json").output)


def test_per_partition_and_node_limits(make_node: object) -> None:
    node: RunningNode = make_node("[dicom]\nmaximum_associations = 3\n")  # type: ignore
    edited = node.cli("partition", "edit", "PACSNODE", "--max-associations", "1")
    assert edited.exit_code == 0, edited.output
    assert node.cli("partition", "add", "OTHER", "--port", str(node.port)).exit_code == 0
    held = [open_assoc(node, "A1")]
    try:
        assert held[0].is_established
        assert reject_of(open_assoc(node, "A2")) == LOCAL_LIMIT_EXCEEDED
        held += [open_assoc(node, "A3", "OTHER"), open_assoc(node, "A4", "OTHER")]
        assert all(a.is_established for a in held)
        # The node holds 3: a fourth is refused whatever the partition.
        assert reject_of(open_assoc(node, "A5", "OTHER")) == LOCAL_LIMIT_EXCEEDED
    finally:
        release_all(held)
    assert wait_for(lambda: (a := open_assoc(node, "A6", "OTHER")).is_established
                    and (a.release() or True))


def _open_sockets() -> int:
    """Sockets this process holds (database files are not counted: SQLite's pool may grow)."""
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            count += os.readlink(f"/proc/self/fd/{fd}").startswith("socket:")
    return count


def test_aborted_associations_release_threads_and_sockets(make_node: object) -> None:
    node: RunningNode = make_node()  # type: ignore[operator]
    warm = open_assoc(node, "WARM")
    warm.release()
    time.sleep(0.5)
    threads, sockets = threading.active_count(), _open_sockets()
    ds = make_instance(size=256)
    for i in range(20):
        assoc = associate(node.port, calling=f"AB{i}")
        assert assoc.is_established
        if i % 2:
            # Cut off in the middle of a C-STORE: half a P-DATA-TF, then an abort.
            sock = assoc.dul.socket.socket
            sock.sendall(struct.pack(">BBL", 0x04, 0, 5000) + b"\x00" * 100)
        assoc.abort()
    # Raw connections that never associate are dropped too.
    for _ in range(5):
        with socket.create_connection(("127.0.0.1", node.port)) as raw:
            raw.sendall(b"GET / HTTP/1.0\r\n\r\n")
    assert wait_for(lambda: threading.active_count() <= threads + 1, timeout=15), (
        f"{threading.active_count()} threads, {threads} before")
    # Each leaked association would hold at least one socket: 25 connections were made.
    assert wait_for(lambda: _open_sockets() <= sockets + 2, timeout=15), (
        f"{_open_sockets()} open sockets, {sockets} before")
    ok = associate(node.port, calling="AFTER")
    try:
        assert int(ok.send_c_store(ds).Status) == 0
    finally:
        ok.release()


def test_idle_and_stalled_peers_are_cut_off(make_node: object) -> None:
    node: RunningNode = make_node("[dicom]\nnetwork_timeout = 1.0\n")  # type: ignore
    idle = open_assoc(node, "IDLE")
    stalled = associate(node.port, calling="STALL")
    assert idle.is_established and stalled.is_established
    # Half a PDU, then silence: the node's read of the PDU body must not wait for ever.
    stalled.dul.socket.socket.sendall(struct.pack(">BBL", 0x04, 0, 5000) + b"\x00" * 100)
    started = time.monotonic()
    assert wait_for(lambda: not idle.is_alive() and not stalled.is_alive(), timeout=15)
    assert time.monotonic() - started < 10
    assert idle.is_aborted
    assert wait_for(lambda: (a := open_assoc(node, "NEXT")).is_established
                    and (a.release() or True))
