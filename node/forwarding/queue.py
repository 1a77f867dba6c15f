"""The durable forwarding queue: claim due jobs, record outcomes, retry with backoff."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

from sqlalchemy import and_, func, or_, select, update

from node.config import ForwardingSettings
from node.db.database import Database
from node.db.models import ForwardJob, Instance, JobState, utcnow


def backoff_seconds(attempts: int, base: float, cap: float) -> float:
    """Delay before the next try after `attempts` failed ones: base, 2 base, 4 base ... cap."""
    return float(min(cap, base * (2 ** max(0, attempts - 1))))


@dataclass(frozen=True)
class Job:
    id: int
    device_id: int
    path: Path
    sop_class: str
    sop_instance: str
    transfer_syntax: str
    attempts: int
    study_instance_uid: str = ""


def _claimable(now: datetime, lease_seconds: float) -> object:
    # Due pending jobs, and jobs a crashed sender claimed longer ago than the lease.
    return or_(
        and_(ForwardJob.state == JobState.PENDING, ForwardJob.next_attempt_at <= now),
        and_(ForwardJob.state == JobState.SENDING,
             ForwardJob.claimed_at < now - timedelta(seconds=lease_seconds)),
    )


def due_devices(db: Database, lease_seconds: float) -> dict[int, int]:
    """Devices with jobs to send now, and how many each has."""
    now = utcnow()
    with db.session() as session:
        rows = session.execute(
            select(ForwardJob.device_id, func.count()).where(_claimable(now, lease_seconds))
            .group_by(ForwardJob.device_id))
        return {device_id: n for device_id, n in rows}


def claim(db: Database, device_id: int, limit: int, owner: str, lease_seconds: float,
          storage_root: Path) -> list[Job]:
    """Take up to `limit` due jobs of one device for `owner`.

    PostgreSQL: FOR UPDATE SKIP LOCKED, so senders in several processes never take the same
    job. SQLite: the node's single writer lock makes the select-and-mark atomic.
    """
    now = utcnow()
    with db.transaction() as session:
        query = (select(ForwardJob.id).where(ForwardJob.device_id == device_id,
                                             _claimable(now, lease_seconds))
                 .order_by(ForwardJob.id).limit(limit))
        if not db.is_sqlite:
            query = query.with_for_update(skip_locked=True)
        ids = list(session.scalars(query))
        if not ids:
            return []
        session.execute(update(ForwardJob).where(ForwardJob.id.in_(ids)).values(
            state=JobState.SENDING, claimed_by=owner, claimed_at=now))
        rows = session.execute(
            select(ForwardJob.id, ForwardJob.attempts, Instance.path, Instance.sop_class_uid,
                   Instance.sop_instance_uid, Instance.transfer_syntax_uid,
                   ForwardJob.study_instance_uid)
            .join(Instance, Instance.id == ForwardJob.instance_pk)
            .where(ForwardJob.id.in_(ids)).order_by(ForwardJob.id))
        return [Job(job_id, device_id, storage_root / path, sop_class, sop, ts, attempts, study)
                for job_id, attempts, path, sop_class, sop, ts, study in rows]


def mark_done(db: Database, job_ids: list[int], *,
              commitment_due: datetime | None = None) -> None:
    """`commitment_due`: the destination asks for storage commitment; when to ask it should
    the request that follows not be made (node.forwarding.commitment)."""
    if not job_ids:
        return
    owed = ({"commitment_due_at": commitment_due, "commitment_attempts": 0}
            if commitment_due is not None else {})
    with db.transaction() as session:
        session.execute(update(ForwardJob).where(ForwardJob.id.in_(job_ids)).values(
            state=JobState.DONE, done_at=utcnow(), last_error="", claimed_by="",
            claimed_at=None, **owed))


def mark_failed_attempt(db: Database, job: Job, error: str, settings: ForwardingSettings,
                        *, final: bool = False) -> None:
    """Record a failed try: retry after a backoff, or give up after max_attempts (or now)."""
    attempts = job.attempts + 1
    give_up = final or attempts >= settings.max_attempts
    delay = backoff_seconds(attempts, settings.retry_base_seconds, settings.retry_max_seconds)
    with db.transaction() as session:
        session.execute(update(ForwardJob).where(ForwardJob.id == job.id).values(
            state=JobState.FAILED if give_up else JobState.PENDING, attempts=attempts,
            next_attempt_at=utcnow() + timedelta(seconds=delay), last_error=error[:2000],
            claimed_by="", claimed_at=None))


def release_claims(db: Database, owner: str) -> int:
    """At start-up: what this node was sending when it stopped goes back to the queue."""
    with db.transaction() as session:
        result = session.execute(
            update(ForwardJob).where(ForwardJob.state == JobState.SENDING,
                                     ForwardJob.claimed_by == owner)
            .values(state=JobState.PENDING, claimed_by="", claimed_at=None))
        return result.rowcount or 0


def release_jobs(db: Database, job_ids: list[int]) -> None:
    """Jobs claimed but not tried (the connection broke first): back to the queue as they were."""
    if not job_ids:
        return
    with db.transaction() as session:
        session.execute(update(ForwardJob).where(ForwardJob.id.in_(job_ids)).values(
            state=JobState.PENDING, claimed_by="", claimed_at=None))
