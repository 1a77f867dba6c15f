"""Several processes serving one node's associations (`dicom.association_processes`): the
connections are spread over them, the node's limits hold over all of them, forwarding hears
of what any of them stored, one that dies is started again, they stop with the node, and with
one per CPU each keeps its receiving threads on its own CPU while it serves two or more."""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest
from pynetdicom.sop_class import Verification
from sqlalchemy import func, select

from node.affinity import PROCESS_CPUS
from node.db.models import Instance
from node.internals.prompt import PromptDUL
from tests.conftest import RunningNode, dcmtk_env, stored_files, wait_for
from tests.destination import CountingSCP
from tests.dicomgen import make_instance, write_study
from tests.integration.test_limits import LOCAL_LIMIT_EXCEEDED, reject_of, release_all
from tests.scu import associate, statuses, store

TWO = "[dicom]\nassociation_processes = 2\n"
SQLITE_ONLY = pytest.mark.parametrize("new_db", ["sqlite"], indirect=True)


def count_instances(node: RunningNode) -> int:
    with node.db.session() as session:
        return int(session.scalar(select(func.count()).select_from(Instance)) or 0)


def handed(node: RunningNode) -> int:
    """Connections the main process handed to its other process."""
    assert node.node.processes is not None
    return node.node.processes.handed()[1]


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A child that exited but was not reaped yet is a zombie: gone for our purpose.
    with open(f"/proc/{pid}/stat") as stat:
        return stat.read().rsplit(")", 1)[1].split()[0] != "Z"


@pytest.mark.interop
def test_storescu_associations_are_spread_and_every_image_is_stored(
        make_node: object, dcmtk: Path, tmp_path: Path) -> None:
    node: RunningNode = make_node(TWO)  # type: ignore[operator]
    studies = [write_study(tmp_path / f"in{n}", 15) for n in range(4)]
    # Held open in the main process, so the first sender goes to the other one even if each
    # sender is done before the next connects.
    held = associate(node.port, contexts=[Verification])
    try:
        senders = [subprocess.Popen(
            [str(dcmtk / "storescu"), "-aec", "PACSNODE", "-aet", f"CT{n}", "127.0.0.1",
             str(node.port), *map(str, files)], env=dcmtk_env(), stderr=subprocess.PIPE)
            for n, files in enumerate(studies)]
        for sender in senders:
            _, err = sender.communicate(timeout=120)
            assert sender.returncode == 0, err.decode(errors="replace")
    finally:
        held.release()
    assert count_instances(node) == 60
    assert len(stored_files(node.storage)) == 60
    assert handed(node) >= 1


@SQLITE_ONLY
def test_the_node_limit_and_device_limits_hold_over_all_processes(make_node: object) -> None:
    node: RunningNode = make_node(  # type: ignore[operator]
        TWO + "maximum_associations = 3\nmax_associations_per_device = 2\n")
    held = [associate(node.port, calling="CT1", contexts=[Verification]) for _ in range(2)]
    try:
        assert all(a.is_established for a in held)
        assert handed(node) == 1  # one in each process
        # The device's third, whichever process it lands in, counts the other two.
        assert reject_of(associate(node.port, calling="CT1",
                                   contexts=[Verification])) == LOCAL_LIMIT_EXCEEDED
        held.append(associate(node.port, calling="MR1", contexts=[Verification]))
        assert held[-1].is_established
        assert reject_of(associate(node.port, calling="US1",
                                   contexts=[Verification])) == LOCAL_LIMIT_EXCEEDED
        held.pop(0).release()
        assert wait_for(lambda: (a := associate(node.port, calling="US1",
                                                contexts=[Verification])).is_established
                        and (held.append(a) or True))
    finally:
        release_all(held)


@SQLITE_ONLY
def test_a_store_in_the_other_process_wakes_forwarding_at_once(make_node: object) -> None:
    # Polled only every 30 s: within the test's wait only the wake can send it.
    node: RunningNode = make_node(  # type: ignore[operator]
        TWO + "[forwarding]\npoll_seconds = 30\n")
    dest = CountingSCP().start()
    try:
        added = node.cli("device", "add", "BACKUP", "--ae-title", dest.ae_title, "--type",
                         "BACKUP_TARGET", "--host", "127.0.0.1", "--port", str(dest.port))
        assert added.exit_code == 0, added.output
        # The forwarder's first look at the queue (at start) is behind it now.
        time.sleep(0.5)
        first = associate(node.port, contexts=[Verification])  # served by the main process
        try:
            assert first.is_established
            instance = make_instance()
            assert statuses(store(node.port, [instance])) == [0]
            assert handed(node) == 1
            assert wait_for(lambda: dest.received == [str(instance.SOPInstanceUID)],
                            timeout=10)
        finally:
            first.release()
    finally:
        dest.stop()


@SQLITE_ONLY
def test_a_process_that_dies_is_started_again_and_stops_with_the_node(
        make_node: object) -> None:
    node: RunningNode = make_node(TWO)  # type: ignore[operator]
    processes = node.node.processes
    assert processes is not None
    first_pid = processes.pids()[1]
    held = associate(node.port, contexts=[Verification])
    try:
        victim = associate(node.port, contexts=[Verification])  # in the other process
        assert victim.is_established and handed(node) == 1
        os.kill(first_pid, signal.SIGKILL)
        assert wait_for(lambda: victim.is_aborted or not victim.is_established, timeout=10)
        # Started again, and its association no longer counts against the limits.
        assert wait_for(lambda: processes.pids().get(1, first_pid) != first_pid, timeout=15)
        assert wait_for(lambda: processes.registry.open_by_owner()[1] == 0)
        assert wait_for(processes.all_ready, timeout=15)
        # The node kept serving, and the new process serves too.
        second = make_instance()
        assert statuses(store(node.port, [second])) == [0]
        assert handed(node) == 2
    finally:
        held.release()
    new_pid = processes.pids()[1]
    node.node.stop()
    assert not alive(new_pid)
    assert not alive(first_pid)


def restricted_threads(pid: int) -> list[set[int]]:
    """The CPUs of each thread of process `pid` that may not run on all the node's CPUs."""
    found = []
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            cpus = os.sched_getaffinity(int(tid))
        except ProcessLookupError:
            continue  # ended meanwhile
        if cpus != PROCESS_CPUS:
            found.append(cpus)
    return found


def receivers_here() -> list[set[int]]:
    """The CPUs of this (the main) process's DUL threads of accepted associations."""
    return [os.sched_getaffinity(t.native_id) for t in threading.enumerate()
            if isinstance(t, PromptDUL) and t.is_alive() and t.native_id is not None]


@SQLITE_ONLY
@pytest.mark.skipif(len(PROCESS_CPUS) < 2, reason="one process per CPU is one process here")
@pytest.mark.parametrize("enabled", [True, False])
def test_with_one_process_per_cpu_each_keeps_its_receivers_on_its_own_cpu(
        make_node: object, enabled: bool) -> None:
    cpus = sorted(PROCESS_CPUS)
    node: RunningNode = make_node(  # type: ignore[operator]
        f"[dicom]\nassociation_processes = 0\ncpu_affinity = {str(enabled).lower()}\n")
    processes = node.node.processes
    assert processes is not None and len(processes.pids()) == len(cpus) - 1
    # The main process serves the first, each other process the next, and so on: two each.
    held = [associate(node.port, contexts=[Verification]) for _ in range(2 * len(cpus))]
    try:
        assert all(a.is_established for a in held)
        assert wait_for(lambda: sorted(map(sorted, receivers_here())) == (
            [[cpus[0]]] * 2 if enabled else [cpus, cpus]))
        for number, pid in processes.pids().items():
            assert wait_for(lambda pid=pid, number=number: restricted_threads(pid) == (
                [{cpus[number]}] * 2 if enabled else []))
        # Down to one association, the main process leaves its receiver to the scheduler.
        held.pop(0).release()
        assert wait_for(lambda: receivers_here() == [set(PROCESS_CPUS)])
    finally:
        release_all(held)
