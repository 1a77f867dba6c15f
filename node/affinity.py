"""Which CPU an association process's receiving threads run on (`dicom.cpu_affinity`).

An association's DUL thread receives its C-STOREs and stores them (direct_store). Two of them
in one process hand the GIL to each other at nearly every system call (about 30 times per
small image); when the kernel has put them on different CPUs each hand-off wakes the other
CPU, and on a virtual machine that wake-up is an interrupt the hypervisor delivers. With one
association process per CPU, a process serving two or more associations at once keeps their
DUL threads on one CPU of its own, so a hand-off is a switch on that CPU. 64x64 over four
associations (two per process, two cores), eight interleaved pairs: median 1110 -> 1230 img/s,
ahead in 6; CT over four, ahead in 3 of 4 pairs, node CPU per image lower in all 4. A lone
association is left to the scheduler: pinned, it could not move off a CPU that its peer or the
node's other threads were using (one association, pinned from the start: 684-754 -> 626-692
img/s in three pairs).
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections.abc import Collection, Iterator

log = logging.getLogger(__name__)

# The CPUs the process may use, as it started (before any of its threads was pinned); none
# where the system has no CPU affinity calls (not Linux): nothing is pinned there.
PROCESS_CPUS = (frozenset(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                else frozenset[int]())


def process_cpu(number: int, processes: int, cpus: Collection[int], enabled: bool
                ) -> int | None:
    """The CPU association process `number` (0: the main process) keeps its DUL threads on,
    when there is one process per CPU in `cpus`; None: the scheduler places them."""
    if not enabled or processes < 2 or processes != len(cpus):
        return None
    return sorted(cpus)[number % processes]


def unpin_current_thread() -> None:
    """Let the calling thread run on any of the process's CPUs: for a thread that a pinned
    one may have started (a thread inherits its creator's CPUs)."""
    if PROCESS_CPUS:
        with contextlib.suppress(OSError):
            os.sched_setaffinity(0, PROCESS_CPUS)


class ReceiverPinning:
    """The DUL threads of one server's accepted associations: on `cpu` while two or more of
    them run, on any of the process's CPUs otherwise."""

    def __init__(self, cpu: int | None) -> None:
        self.cpu = cpu
        self._lock = threading.Lock()
        self._threads: set[int] = set()  # native thread IDs
        self._pinned = False
        self._warned = False

    @property
    def pinned(self) -> bool:
        with self._lock:
            return self._pinned

    @contextlib.contextmanager
    def running(self) -> Iterator[None]:
        """Around a DUL thread's run."""
        cpu = self.cpu
        if cpu is None:
            yield
            return
        tid = threading.get_native_id()
        with self._lock:
            self._threads.add(tid)
            self._apply(cpu, joined=tid)
        try:
            yield
        finally:
            with self._lock:
                self._threads.discard(tid)
                self._apply(cpu, joined=None)

    def _apply(self, cpu: int, joined: int | None) -> None:
        # Under the lock: every thread in _threads is alive (each leaves before it ends).
        pin = len(self._threads) >= 2
        if pin != self._pinned:
            targets: Collection[int] = self._threads
            self._pinned = pin
        elif pin and joined is not None:
            targets = (joined,)
        else:
            return
        cpus = {cpu} if pin else PROCESS_CPUS
        for tid in targets:
            try:
                os.sched_setaffinity(tid, cpus)
            except OSError as exc:  # e.g. a container's cpuset changed under the process
                if not self._warned:
                    self._warned = True
                    log.warning("cannot set the CPUs of association thread %d to %s: %s",
                                tid, sorted(cpus), exc)
