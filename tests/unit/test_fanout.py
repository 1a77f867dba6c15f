"""Asking children at once: answers pass on as they arrive; a silent child is reported, not
waited for."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from concurrent import futures

from hierarchy.fanout import Call, child_timeout, fan_out, fan_out_batches


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


def test_answers_that_arrived_meanwhile_come_in_one_batch() -> None:
    """A node passing its subtree on sends what has arrived since its last message in one:
    while the caller is busy with the first batch, the rest piles up and comes together."""
    go, second_child_done = threading.Event(), threading.Event()

    def first(_timeout: float) -> Iterator[str]:
        yield "a-1"

    def second(_timeout: float) -> Iterator[str]:
        go.wait(2)
        yield from ("b-1", "b-2", "b-3")
        second_child_done.set()

    batches = fan_out_batches([Call("a", first), Call("b", second)], 2.0,
                              lambda key, reason: f"down:{key}")
    assert next(batches) == ["a-1"]
    go.set()
    assert second_child_done.wait(2)
    time.sleep(0.05)  # its end-of-stream marker is queued too
    assert list(batches) == [["b-1", "b-2", "b-3"]]  # what arrived meanwhile, in one batch
    assert list(fan_out_batches([], 1.0, lambda key, reason: None)) == []


def test_a_pool_can_run_the_calls() -> None:
    with futures.ThreadPoolExecutor(max_workers=2) as pool:
        out = list(fan_out([Call(k, lambda _t, k=k: iter([k])) for k in "xyz"], 1.0,
                           lambda key, reason: f"down:{key}", spawn=pool.submit))
    assert sorted(out) == ["x", "y", "z"]  # three calls, two threads: the third waits its turn
