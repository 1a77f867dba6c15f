"""pynetdicom's association timers on the monotonic clock.

pynetdicom's `Timer` (ARTIM, and the network timeout's idle timer) counts `time.time()`: a step
of the wall clock forward by more than a timeout expires it at once (every idle association,
inbound or a forwarding heartbeat, is aborted), and a step back postpones it by the step's
length (a peer that went silent holds its association, and its slot, an hour longer).
"""

from __future__ import annotations

import time

from pynetdicom.dul import DULServiceProvider
from pynetdicom.timer import Timer


class MonotonicTimer(Timer):
    """`Timer` counting time.monotonic(), which no one can step."""

    @property
    def remaining(self) -> float:
        if self.timeout is None:
            return 1
        if self._start_time is None:
            return self.timeout
        end = self._end_time if self._end_time is not None else time.monotonic()
        return self.timeout - (end - self._start_time)

    def start(self) -> None:
        self._start_time = time.monotonic()
        self._end_time = None

    def stop(self) -> None:
        self._end_time = time.monotonic()


def monotonic_timers(dul: DULServiceProvider) -> None:
    """Make the DUL's timers monotonic; one already running keeps the time it has left."""
    for timer in (dul.artim_timer, dul._idle_timer):
        if type(timer) is not Timer:
            continue
        offset = time.monotonic() - time.time()  # wall-clock readings as monotonic ones
        if timer._start_time is not None:
            timer._start_time += offset
        if timer._end_time is not None:
            timer._end_time += offset
        timer.__class__ = MonotonicTimer
