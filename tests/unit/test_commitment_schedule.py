"""When delivered jobs are asked (again) for storage commitment: pure decisions."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from node.config import ForwardingSettings
from node.forwarding.commitment import (
    FAILED,
    REQUESTED,
    UNSUPPORTED,
    after_request,
    due_window,
    wait_after,
)

F = ForwardingSettings(retry_base_seconds=10, retry_max_seconds=3600, commitment_timeout=600,
                       lease_seconds=600)
NOW = datetime(2026, 12, 14, 12, 0, tzinfo=UTC)


def test_a_request_that_failed_is_made_again_after_the_forwarding_backoff() -> None:
    assert [wait_after(n, False, F) for n in (1, 2, 3, 4)] == [10, 20, 40, 80]
    assert wait_after(9, False, F) == 2560
    assert wait_after(10, False, F) == 3600  # the retry ceiling, and never more
    assert wait_after(500, False, F) == 3600


def test_a_request_made_waits_for_its_report_at_least_the_timeout() -> None:
    assert wait_after(1, True, F) == 600
    assert wait_after(7, True, F) == 640  # the backoff once it is longer
    assert wait_after(50, True, F) == 3600
    slow = ForwardingSettings(retry_max_seconds=60, commitment_timeout=900)
    assert wait_after(50, True, slow) == 900


def test_outcome_of_a_request() -> None:
    made = after_request(1, None, NOW, F)
    assert (made.commitment, made.due_at, made.error) == (
        REQUESTED, NOW + timedelta(seconds=600), "")
    failed = after_request(3, ("failed", "no N-ACTION response"), NOW, F)
    assert (failed.commitment, failed.due_at) == (FAILED, NOW + timedelta(seconds=40))
    assert failed.error == "storage commitment not requested: no N-ACTION response"
    # A destination that cannot commit is not asked again: purging relies on delivery.
    unsupported = after_request(1, (UNSUPPORTED, "DEST does not support it"), NOW, F)
    assert (unsupported.commitment, unsupported.due_at) == (UNSUPPORTED, None)


def test_what_is_due_now() -> None:
    first, last = due_window(NOW, F)
    assert first == NOW
    assert last == NOW + timedelta(seconds=3600)
    # Every due time the node sets lies inside the window: never taken for a clock step.
    for settings in (F, ForwardingSettings(retry_max_seconds=5, commitment_timeout=900,
                                           lease_seconds=30)):
        first, last = due_window(NOW, settings)
        for attempts in range(1, 40):
            for refused in (None, ("failed", "x")):
                due = after_request(attempts, refused, NOW, settings).due_at
                assert due is not None and first < due <= last
        assert NOW + timedelta(seconds=settings.lease_seconds) <= last  # a claim's lease

