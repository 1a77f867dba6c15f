"""Ask every child at once and pass on their answers as they arrive, within a deadline.

Recollect, hierarchy status and refresh-IP all walk the tree this way. Each child gets a
shorter deadline than the caller's own, so a child whose own child hangs still answers in
time, and a child that does not answer is reported as unreachable instead of hanging the
whole walk.
"""

from __future__ import annotations

import functools
import logging
import queue
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar, cast

import grpc

from hierarchy.channels import describe

log = logging.getLogger(__name__)

T = TypeVar("T")
# The share of the remaining time a child gets: it must finish (and report its own late
# children) before the caller gives up on it.
CHILD_SHARE = 0.8
# How long the caller waits for its children: past their deadline, but leaving the rest of its
# own time to report the late ones and finish before its caller gives up on it in turn.
WAIT_SHARE = 0.9
# Passing a request up to the parent does no work of its own: it keeps nearly all the time.
UP_SHARE = 0.95


@dataclass(frozen=True)
class Call(Generic[T]):
    key: str  # the child's node id
    run: Callable[[float], Iterable[T]]  # timeout seconds -> its answers


def child_timeout(remaining: float) -> float:
    return max(0.05, remaining * CHILD_SHARE)


def up_timeout(remaining: float) -> float:
    return max(0.05, remaining * UP_SHARE)


def start_thread(work: Callable[[], None]) -> None:
    threading.Thread(target=work, name="fan-out", daemon=True).start()


def fan_out(calls: Sequence[Call[T]], remaining: float,
            failed: Callable[[str, str], T | None],
            answered: Callable[[str], None] = lambda _key: None,
            spawn: Callable[[Callable[[], None]], object] = start_thread) -> Iterator[T]:
    """Yield every child's answers as they come; `failed(key, reason)` stands in for a child
    that errs or misses its deadline before answering anything. `spawn` runs each call in
    the background (a new thread by default; a node passes its pool of reused threads)."""
    for batch in fan_out_batches(calls, remaining, failed, answered, spawn):
        yield from batch


def fan_out_batches(calls: Sequence[Call[T]], remaining: float,
                    failed: Callable[[str, str], T | None],
                    answered: Callable[[str], None] = lambda _key: None,
                    spawn: Callable[[Callable[[], None]], object] = start_thread
                    ) -> Iterator[list[T]]:
    """As `fan_out`, but each time yields every answer that has arrived by then: a node
    passing a subtree's answers on sends a few messages rather than one per node. The calls
    start at once, before the first answer is asked for."""
    if not calls:
        return iter(())
    deadline = time.monotonic() + remaining * WAIT_SHARE
    timeout = child_timeout(remaining)
    inbox: queue.Queue[tuple[str, str, object]] = queue.Queue()

    def run(call: Call[T]) -> None:
        try:
            for item in call.run(timeout):
                inbox.put((call.key, "item", item))
            inbox.put((call.key, "done", None))
        except grpc.RpcError as exc:
            inbox.put((call.key, "error", describe(exc)))
        except Exception as exc:  # one child's failure must not end the walk
            log.exception("asking %s failed", call.key)
            inbox.put((call.key, "error", str(exc)))

    for call in calls:
        spawn(functools.partial(run, call))
    return _gather([call.key for call in calls], inbox, deadline, timeout, failed, answered)


def _gather(keys: list[str], inbox: queue.Queue[tuple[str, str, object]], deadline: float,
            timeout: float, failed: Callable[[str, str], T | None],
            answered: Callable[[str], None]) -> Iterator[list[T]]:
    pending = set(keys)
    answered_any: set[str] = set()

    def take(key: str, kind: str, payload: object, batch: list[T]) -> None:
        if kind == "item":
            if key not in answered_any:
                answered_any.add(key)
                answered(key)
            batch.append(cast(T, payload))  # an "item" carries one of the call's answers
            return
        pending.discard(key)
        if kind == "error":
            if key in answered_any:
                # What it sent stands; what it did not send (part of its subtree) is missing.
                log.warning("%s stopped answering part-way: %s", key, payload)
            else:
                item = failed(key, str(payload))
                if item is not None:
                    batch.append(item)

    while pending:
        left = deadline - time.monotonic()
        if left <= 0:
            break
        try:
            message = inbox.get(timeout=left)
        except queue.Empty:
            break
        batch: list[T] = []
        take(*message, batch)
        while pending:  # and whatever else has arrived meanwhile
            try:
                message = inbox.get_nowait()
            except queue.Empty:
                break
            take(*message, batch)
        if batch:
            yield batch
    late = [failed(key, f"no answer within {timeout:.1f} s")
            for key in sorted(pending) if key not in answered_any]
    if any(item is not None for item in late):
        yield [item for item in late if item is not None]
