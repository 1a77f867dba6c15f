"""The durable forwarding queue: claim due jobs, record outcomes, retry with backoff."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

from sqlalchemy import ColumnElement, Select, and_, func, or_, select, update
from sqlalchemy.orm import Session

from node.clock import STEP_TOLERANCE, latest_plausible
from node.config import ForwardingSettings
from node.db.database import Database
from node.db.models import ForwardJob, Instance, JobState, utcnow
from node.db.tables import rowcount


def backoff_seconds(attempts: int, base: float, cap: float) -> float:
    """Delay before the next try after `attempts` failed ones: base, 2 base, 4 base ... cap."""
    return float(min(cap, base * (2 ** max(0, attempts - 1))))


def longest_wait(attempts: int, settings: ForwardingSettings) -> float:
    """The furthest ahead a job that failed `attempts` times can have been scheduled: its
    backoff (a job never tried was due when it was queued)."""
    if attempts <= 0:
        return 0.0
    return backoff_seconds(attempts, settings.retry_base_seconds, settings.retry_max_seconds)


def wait_groups(settings: ForwardingSettings) -> list[tuple[int, int | None, float]]:
    """Attempt counts `first` to `last` (None: and every count above) and the longest wait of
    each: one per doubling of the backoff, then one for all that reached retry_max_seconds."""
    groups: list[tuple[int, int | None, float]] = []
    attempts = 0
    while True:
        wait = longest_wait(attempts, settings)
        if attempts > 0 and wait >= settings.retry_max_seconds:
            groups.append((attempts, None, wait))
            return groups
        groups.append((attempts, attempts, wait))
        attempts += 1


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


def _claimable(now: datetime, lease_seconds: float) -> ColumnElement[bool]:
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


def take(session: Session, query: Select[int], skip_locked: bool,
         **values: object) -> list[int]:
    """The job IDs `query` selects, set to `values` in the caller's transaction; with
    `skip_locked` (PostgreSQL), rows another transaction holds are passed over, so takers in
    several processes never take the same job."""
    if skip_locked:
        query = query.with_for_update(skip_locked=True)
    ids = list(session.scalars(query))
    if ids:
        session.execute(update(ForwardJob).where(ForwardJob.id.in_(ids)).values(**values))
    return ids


def claim(db: Database, device_id: int, limit: int, owner: str, lease_seconds: float,
          storage_root: Path) -> list[Job]:
    """Take up to `limit` due jobs of one device for `owner`.

    PostgreSQL: FOR UPDATE SKIP LOCKED, so senders in several processes never take the same
    job. SQLite: the node's single writer lock makes the select-and-mark atomic.
    """
    now = utcnow()
    with db.transaction() as session:
        ids = take(session, select(ForwardJob.id).where(
            ForwardJob.device_id == device_id, _claimable(now, lease_seconds))
            .order_by(ForwardJob.id).limit(limit), not db.is_sqlite,
            state=JobState.SENDING, claimed_by=owner, claimed_at=now)
        if not ids:
            return []
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


def beyond_ceiling(db: Database, settings: ForwardingSettings) -> bool:
    """Whether a pending job is due later than any backoff could have put it (one index probe:
    none ever is, unless the wall clock was stepped back or another machine's runs ahead)."""
    with db.session() as session:
        return session.scalar(select(ForwardJob.id).where(
            ForwardJob.state == JobState.PENDING,
            ForwardJob.next_attempt_at > latest_plausible(utcnow(), settings.retry_max_seconds))
            .limit(1)) is not None


def clamp_due_times(db: Database, settings: ForwardingSettings) -> int:
    """After the wall clock was stepped back: jobs due later than their backoff could have put
    them are due after that backoff from now (clock.clamped, one statement per wait group),
    and a claim stamped in the future counts its lease from now. Returns the jobs moved."""
    now = utcnow()
    moved = 0
    with db.transaction() as session:
        for first, last, wait in wait_groups(settings):
            attempts = (ForwardJob.attempts >= first if last is None
                        else ForwardJob.attempts.between(first, last))
            result = session.execute(update(ForwardJob).where(
                ForwardJob.state == JobState.PENDING, attempts,
                ForwardJob.next_attempt_at > latest_plausible(now, wait))
                .values(next_attempt_at=now + timedelta(seconds=wait)))
            moved += rowcount(result) or 0
        session.execute(update(ForwardJob).where(
            ForwardJob.state == JobState.SENDING,
            ForwardJob.claimed_at > now + timedelta(seconds=STEP_TOLERANCE))
            .values(claimed_at=now))
    return moved


def renew_claims(db: Database, owner: str) -> int:
    """After the wall clock was stepped forward: what `owner` is sending is not abandoned,
    whatever its claim's age now looks like (the lease counts from now)."""
    with db.transaction() as session:
        result = session.execute(
            update(ForwardJob).where(ForwardJob.state == JobState.SENDING,
                                     ForwardJob.claimed_by == owner)
            .values(claimed_at=utcnow()))
        return rowcount(result) or 0


def release_claims(db: Database, owner: str) -> int:
    """At start-up: what this node was sending when it stopped goes back to the queue."""
    with db.transaction() as session:
        result = session.execute(
            update(ForwardJob).where(ForwardJob.state == JobState.SENDING,
                                     ForwardJob.claimed_by == owner)
            .values(state=JobState.PENDING, claimed_by="", claimed_at=None))
        return rowcount(result) or 0


def release_jobs(db: Database, job_ids: list[int]) -> None:
    """Jobs claimed but not tried (the connection broke first): back to the queue as they were."""
    if not job_ids:
        return
    with db.transaction() as session:
        session.execute(update(ForwardJob).where(ForwardJob.id.in_(job_ids)).values(
            state=JobState.PENDING, claimed_by="", claimed_at=None))
