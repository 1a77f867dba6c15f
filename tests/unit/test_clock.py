"""Wall-clock steps (node/clock.py) and the forward queue's retry ceiling (queue.wait_groups)."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta

import pytest
from pynetdicom import AE
from pynetdicom.association import Association
from pynetdicom.dul import DULServiceProvider
from pynetdicom.timer import Timer

from hierarchy.neighbours import shifted
from node.clock import StepWatch, clamped
from node.config import ForwardingSettings
from node.forwarding.queue import backoff_seconds, longest_wait, wait_groups
from node.internals.timers import MonotonicTimer, monotonic_timers

NOW = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)


class Clocks:
    def __init__(self) -> None:
        self.wall = 1_800_000_000.0
        self.monotonic = 5_000.0

    def tick(self, seconds: float, wall_drift: float = 0.0) -> None:
        self.monotonic += seconds
        self.wall += seconds + wall_drift


def test_a_step_of_the_wall_clock_is_seen_once_with_its_size_and_direction() -> None:
    clocks = Clocks()
    watch = StepWatch(lambda: clocks.wall, lambda: clocks.monotonic)
    clocks.tick(1.0)
    assert watch.step() == 0.0  # time passing is no step
    clocks.tick(1.0, wall_drift=-3600)
    assert watch.step() == pytest.approx(-3600)
    assert watch.step() == 0.0  # seen once
    clocks.tick(0.5, wall_drift=7200)
    assert watch.step() == pytest.approx(7200)


def test_slewing_is_no_step_even_over_a_long_time() -> None:
    clocks = Clocks()
    watch = StepWatch(lambda: clocks.wall, lambda: clocks.monotonic)
    for _ in range(10_000):  # NTP's fastest slew, 0.5 ms a second, for 10,000 s
        clocks.tick(1.0, wall_drift=0.0005)
        assert watch.step() == 0.0
    clocks.tick(1.0, wall_drift=1.5)
    assert watch.step() == pytest.approx(1.5)


@pytest.mark.parametrize(("ahead", "wait", "expected"), [
    (10, 10, 10),  # scheduled now for 10 s: kept
    (11, 10, 11),  # within the tolerance (a second)
    (3610, 10, 10),  # stored before the clock went back an hour: 10 s from now
    (3600.5, 3600, 3600.5),  # a wait of an hour is plausible when the backoff is an hour
    (3700, 3600, 3600),
    (-5, 10, -5),  # overdue: due now, untouched
    (120, 0, 0),  # never tried, yet due in two minutes: due now
])
def test_a_due_time_further_ahead_than_any_wait_is_clamped_to_that_wait_from_now(
        ahead: float, wait: float, expected: float) -> None:
    due = NOW + timedelta(seconds=ahead)
    assert clamped(due, NOW, wait) == NOW + timedelta(seconds=expected)


@pytest.mark.parametrize(("base", "cap"), [(10, 3600), (2, 10), (10, 10), (20, 10),
                                           (0.001, 86400), (3, 100)])
def test_each_attempt_count_has_one_wait_group_with_its_own_backoff(base: float,
                                                                    cap: float) -> None:
    settings = ForwardingSettings(retry_base_seconds=base, retry_max_seconds=cap)
    groups = wait_groups(settings)
    assert groups[0] == (0, 0, 0.0)  # never tried: due when queued
    assert groups[-1][1] is None and groups[-1][2] == cap  # all past the cap share it
    for attempts in range(0, 100):
        mine = [(first, last, wait) for first, last, wait in groups
                if first <= attempts and (last is None or attempts <= last)]
        assert len(mine) == 1
        assert mine[0][2] == longest_wait(attempts, settings)
        if attempts:
            assert longest_wait(attempts, settings) == backoff_seconds(attempts, base, cap)
    assert len(groups) <= 30  # one statement each, after a step


@pytest.mark.parametrize(("seen_ago", "jump", "expected_ago"), [
    # (seconds before the look, by the clock as it is now; None: left as it is)
    (3605, 3600, 5),  # seen 5 s before a step forward of an hour: still 5 s ago
    (3600, 3600, 0),
    (2, 3600, None),  # seen after the step (a heartbeat since): already right
    (-3595, -3600, 5),  # seen 5 s before a step back of an hour: "in an hour" -> 5 s ago
    (3, -3600, None),  # seen after the step back
    (7200, -3600, None),  # seen long before: already in the past, dead either way
])
def test_a_neighbours_last_seen_time_moves_with_a_step_taken_after_it(
        seen_ago: float, jump: float, expected_ago: float | None) -> None:
    moved = shifted(NOW - timedelta(seconds=seen_ago), NOW, jump)
    assert moved == (None if expected_ago is None else NOW - timedelta(seconds=expected_ago))


def test_association_timers_count_monotonic_time_across_a_step(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """pynetdicom's own Timer expires when the wall clock jumps forward, and waits the jump's
    length when it jumps back; a DUL's timers made monotonic (one already running keeping the
    time it has left) do neither."""
    wall = [1_800_000_000.0]
    monkeypatch.setattr(time, "time", lambda: wall[0])
    dul = DULServiceProvider(Association(AE(), "requestor"))
    dul._idle_timer.timeout = 120
    dul._idle_timer.start()
    stock = Timer(120)
    stock.start()
    wall[0] += 30
    monotonic_timers(dul)
    assert isinstance(dul._idle_timer, MonotonicTimer)
    assert isinstance(dul.artim_timer, MonotonicTimer)
    assert dul._idle_timer.remaining == pytest.approx(90, abs=1)  # what it had left
    wall[0] += 3600  # a step forward
    assert stock.expired
    assert not dul._idle_timer.expired and not dul.artim_timer.expired
    assert dul._idle_timer.remaining == pytest.approx(90, abs=1)
    wall[0] -= 7200  # and back
    assert stock.remaining > 3000
    assert dul._idle_timer.remaining == pytest.approx(90, abs=1)
    dul._idle_timer.restart()
    assert dul._idle_timer.remaining == pytest.approx(120, abs=1)
