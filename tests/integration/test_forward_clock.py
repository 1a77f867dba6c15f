"""Forward jobs whose stored due times a step of the wall clock made wrong (queue.clamp_due_times).

The node's own clock is stepped in tests/interop/test_clock_step.py; here the queue is given the
due times a step leaves behind, on SQLite and PostgreSQL.
"""

from __future__ import annotations

from datetime import timedelta

from sqlalchemy import select, update

from node.db.models import ForwardJob, JobState, utcnow
from node.forwarding import queue
from tests.conftest import RunningNode, free_port, wait_for
from tests.dicomgen import make_instance
from tests.scu import statuses, store

SLOW_RETRIES = "[forwarding]\npoll_seconds = 0.1\nretry_base_seconds = 5\nretry_max_seconds = 60\n"


def test_due_times_beyond_their_backoff_are_clamped_and_the_rest_kept(
        make_node: object) -> None:
    node: RunningNode = make_node(SLOW_RETRIES)  # type: ignore[operator]
    assert node.cli("device", "add", "DOWN", "--type", "BACKUP_TARGET", "--host", "127.0.0.1",
                    "--port", str(free_port())).exit_code == 0  # nothing listens there
    assert set(statuses(store(node.port, [make_instance() for _ in range(7)]))) == {0}
    assert wait_for(lambda: all(j.attempts >= 1 for j in jobs(node)), timeout=20)
    assert node.node.forwarder is not None
    node.node.forwarder.stop()  # the queue holds still (and nothing clamps but this test)
    now = utcnow()
    # (attempts, state, seconds ahead of now) as a clock stepped back an hour, or not, left them
    given = [(1, JobState.PENDING, 3605), (1, JobState.PENDING, 4), (0, JobState.PENDING, 100),
             (9, JobState.PENDING, 59), (9, JobState.PENDING, 4000), (1, JobState.FAILED, 9000),
             (1, JobState.SENDING, 3600)]
    ids = [job.id for job in jobs(node)]
    with node.db.transaction() as session:
        for job_id, (attempts, state, ahead) in zip(ids, given, strict=True):
            at = now + timedelta(seconds=ahead)
            session.execute(update(ForwardJob).where(ForwardJob.id == job_id).values(
                attempts=attempts, state=state, next_attempt_at=at,
                claimed_at=at if state == JobState.SENDING else None))
    assert queue.beyond_ceiling(node.db, node.settings.forwarding)

    assert queue.clamp_due_times(node.db, node.settings.forwarding) == 3
    after = {job.id: job for job in jobs(node)}

    def ahead(job_id: int, column: str = "next_attempt_at") -> float:
        return (getattr(after[job_id], column).replace(tzinfo=now.tzinfo) - now).total_seconds()

    assert 5 <= ahead(ids[0]) <= 7  # an hour ahead after one failure: its backoff, 5 s
    assert ahead(ids[1]) == 4  # plausible: kept
    assert 0 <= ahead(ids[2]) <= 2  # never tried yet due later: due now
    assert ahead(ids[3]) == 59  # within the 60 s ceiling of nine failures: kept
    assert 60 <= ahead(ids[4]) <= 62  # beyond it: the ceiling from now
    assert ahead(ids[5]) == 9000  # failed for good: not a due time
    assert 0 <= ahead(ids[6], "claimed_at") <= 2  # a lease stamped in the future counts from now
    assert not queue.beyond_ceiling(node.db, node.settings.forwarding)
    assert queue.clamp_due_times(node.db, node.settings.forwarding) == 0  # idempotent


def jobs(node: RunningNode) -> list[ForwardJob]:
    with node.db.session() as session:
        return list(session.scalars(select(ForwardJob).order_by(ForwardJob.id)))
