"""Which CPU an association process keeps its receiving threads on, and when (affinity.py)."""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from node.affinity import PROCESS_CPUS, ReceiverPinning, process_cpu, unpin_current_thread

TWO_CPUS = pytest.mark.skipif(len(PROCESS_CPUS) < 2,
                              reason="pinning is seen only with two CPUs or more")


def test_one_process_per_cpu_gives_each_its_own_cpu() -> None:
    cpus = {2, 5, 7}
    assert [process_cpu(n, 3, cpus, True) for n in range(3)] == [2, 5, 7]


@pytest.mark.parametrize(("processes", "cpus", "enabled"), [
    (2, {0, 1}, False),  # switched off
    (1, {0}, True),  # one process: the scheduler may use every CPU for it
    (2, {0, 1, 2, 3}, True),  # fewer processes than CPUs
    (4, {0, 1}, True),  # more processes than CPUs
])
def test_no_cpu_unless_one_process_per_cpu_and_enabled(processes: int, cpus: set[int],
                                                         enabled: bool) -> None:
    assert all(process_cpu(n, processes, cpus, enabled) is None for n in range(processes))


class _Receiver:
    """A thread inside `pinning.running()` until told to leave."""

    def __init__(self, pinning: ReceiverPinning) -> None:
        self.entered = threading.Event()
        self.leave = threading.Event()
        self.tid = 0
        self.thread = threading.Thread(target=self._run, args=(pinning,), daemon=True)
        self.thread.start()
        assert self.entered.wait(5)

    def _run(self, pinning: ReceiverPinning) -> None:
        self.tid = threading.get_native_id()
        with pinning.running():
            self.entered.set()
            self.leave.wait(10)

    def cpus(self) -> set[int]:
        return os.sched_getaffinity(self.tid)

    def stop(self) -> None:
        self.leave.set()
        self.thread.join(5)


@contextmanager
def receivers(pinning: ReceiverPinning, count: int) -> Iterator[list[_Receiver]]:
    started = [_Receiver(pinning) for _ in range(count)]
    try:
        yield started
    finally:
        for receiver in started:
            receiver.stop()


@TWO_CPUS
def test_receivers_share_the_cpu_while_two_or_more_run_and_a_lone_one_is_free() -> None:
    cpu = max(PROCESS_CPUS)
    pinning = ReceiverPinning(cpu)
    with receivers(pinning, 1) as (first,):
        assert first.cpus() == set(PROCESS_CPUS) and not pinning.pinned
        with receivers(pinning, 2) as (second, third):
            assert pinning.pinned
            assert first.cpus() == second.cpus() == third.cpus() == {cpu}
            second.stop()
            assert first.cpus() == third.cpus() == {cpu}  # still two
            third.stop()
        assert first.cpus() == set(PROCESS_CPUS) and not pinning.pinned


@TWO_CPUS
def test_without_a_cpu_receivers_are_left_to_the_scheduler() -> None:
    pinning = ReceiverPinning(None)
    with receivers(pinning, 3) as started:
        assert all(r.cpus() == set(PROCESS_CPUS) for r in started) and not pinning.pinned


@TWO_CPUS
def test_a_thread_started_by_a_pinned_one_can_free_itself() -> None:
    seen: list[set[int]] = []

    def child() -> None:
        unpin_current_thread()
        seen.append(os.sched_getaffinity(0))

    def pinned() -> None:
        os.sched_setaffinity(0, {min(PROCESS_CPUS)})
        helper = threading.Thread(target=child)
        helper.start()
        helper.join(5)

    thread = threading.Thread(target=pinned)
    thread.start()
    thread.join(5)
    assert seen == [set(PROCESS_CPUS)]
