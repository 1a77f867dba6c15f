"""Steps of the wall clock: noticing them, and stored due times that a step made wrong.

Timers inside a process count on time.monotonic() (threading's waits do too), which no one can
step. What the database keeps for other processes and for after a restart (a forward job's next
try, a claim's lease, when a neighbour was last seen) has to be wall-clock time, which NTP or an
administrator may step back or forward by any amount, while the node runs or while it is down.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import datetime, timedelta

# Seconds: a change of the wall clock against the monotonic one beyond this between two looks
# is a step (NTP's slewing moves it at most 0.5 ms a second); and how far ahead of the latest
# plausible due time a stored one may lie before it counts as set by a clock since stepped back.
STEP_TOLERANCE = 1.0


class StepWatch:
    """Tells how far the wall clock was stepped since the last look: the difference between
    wall-clock and monotonic time changes only when it is (a suspended machine's monotonic
    clock stops too, so a resume looks like a step forward, which it is for stored times)."""

    def __init__(self, wall: Callable[[], float] = time.time,
                 monotonic: Callable[[], float] = time.monotonic) -> None:
        self._wall = wall
        self._monotonic = monotonic
        self._offset = wall() - monotonic()

    def step(self) -> float:
        """Seconds the wall clock jumped since the last look (negative: back); 0.0 if none."""
        offset = self._wall() - self._monotonic()
        jump, self._offset = offset - self._offset, offset
        return jump if abs(jump) > STEP_TOLERANCE else 0.0


def latest_plausible(now: datetime, longest_wait: float) -> datetime:
    """The latest a due time stored by this clock can be, when nothing waits longer than
    `longest_wait` seconds: anything later was stored before the clock was stepped back (or
    by another machine whose clock is ahead)."""
    return now + timedelta(seconds=longest_wait + STEP_TOLERANCE)


def clamped(due: datetime, now: datetime, longest_wait: float) -> datetime:
    """`due` as it should be now: unchanged when plausible, else `longest_wait` from now, as
    if it had been scheduled at this moment (never the whole length of the step)."""
    if due > latest_plausible(now, longest_wait):
        return now + timedelta(seconds=longest_wait)
    return due
