"""Asking children at once: answers pass on as they arrive; a silent child is reported, not
waited for."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

from hierarchy.fanout import Call, child_timeout, fan_out


def test_answers_arrive_and_late_or_failing_children_are_reported() -> None:
    release = threading.Event()

    def quick(_timeout: float) -> Iterator[str]:
        yield "quick-1"
        yield "quick-2"

    def hangs(timeout: float) -> Iterator[str]:
        release.wait(timeout + 5)  # ignores its deadline, like a wedged peer
        yield "too late"

    def broken(_timeout: float) -> Iterator[str]:
        raise RuntimeError("database is locked")
        yield ""

    failed: list[tuple[str, str]] = []
    answered: list[str] = []
    started = time.monotonic()
    out = list(fan_out([Call("quick", quick), Call("hangs", hangs), Call("broken", broken)], 1.0,
                       lambda key, reason: failed.append((key, reason)) or f"down:{key}",
                       answered.append))
    elapsed = time.monotonic() - started
    release.set()
    assert elapsed < 1.0  # the caller has time left to pass the answers on
    assert out.index("quick-1") < out.index("quick-2")
    assert set(out) == {"quick-1", "quick-2", "down:hangs", "down:broken"}
    assert dict(failed)["broken"] == "database is locked"
    assert dict(failed)["hangs"].startswith("no answer within 0.8 s")
    assert answered == ["quick"]


def test_a_child_that_answered_then_fails_is_not_also_reported_down() -> None:
    def partial(_timeout: float) -> Iterator[str]:
        yield "own entry"
        raise RuntimeError("cut")

    out = list(fan_out([Call("c", partial)], 1.0, lambda key, reason: f"down:{key}"))
    assert out == ["own entry"]


def test_each_level_gets_less_time_than_its_caller() -> None:
    assert child_timeout(10.0) < 10.0
    assert child_timeout(child_timeout(10.0)) < child_timeout(10.0)
    assert child_timeout(0.0) > 0  # a call always has some deadline
