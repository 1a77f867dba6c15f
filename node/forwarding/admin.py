"""What administrators see and do with the forwarding queue (behind `pacsnode queue`)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import ColumnElement, distinct, func, select, update
from sqlalchemy.orm import Session

from node.db.models import Device, ForwardJob, Instance, JobState, Study, utcnow
from node.db.tables import rowcount
from node.forwarding.commitment import COMMITTED, SETTLED
from node.partitions import AdminError
from node.storage import purge

STATES = [s.value for s in JobState]


def _device_id(session: Session, name: str | None) -> int | None:
    if name is None:
        return None
    device_id = session.scalar(select(Device.id).where(Device.name == name))
    if device_id is None:
        raise AdminError(f"no device named {name!r}")
    return device_id


def listing(session: Session, *, state: str | None = None, device: str | None = None,
            limit: int = 100) -> list[dict[str, Any]]:
    if state is not None and state not in STATES:
        raise AdminError(f"state {state!r} is not one of {', '.join(STATES)}")
    query = (select(ForwardJob, Device.name, Instance.sop_instance_uid)
             .join(Device, Device.id == ForwardJob.device_id)
             .join(Instance, Instance.id == ForwardJob.instance_pk)
             .order_by(ForwardJob.id.desc()).limit(limit))
    if state is not None:
        query = query.where(ForwardJob.state == state)
    device_id = _device_id(session, device)
    if device_id is not None:
        query = query.where(ForwardJob.device_id == device_id)
    return [as_dict(job, name, sop) for job, name, sop in session.execute(query)]


def show(session: Session, job_id: int) -> dict[str, Any]:
    row = session.execute(
        select(ForwardJob, Device.name, Instance.sop_instance_uid)
        .join(Device, Device.id == ForwardJob.device_id)
        .join(Instance, Instance.id == ForwardJob.instance_pk)
        .where(ForwardJob.id == job_id)).first()
    if row is None:
        raise AdminError(f"no forward job {job_id}")
    return as_dict(*row)


def as_dict(job: ForwardJob, device: str, sop: str) -> dict[str, Any]:
    return {"id": job.id, "device": device, "state": job.state,
            "study_instance_uid": job.study_instance_uid, "sop_instance_uid": sop,
            "attempts": job.attempts, "next_attempt_at": job.next_attempt_at,
            "last_error": job.last_error, "created_at": job.created_at, "done_at": job.done_at,
            "commitment": job.commitment, "committed_at": job.committed_at,
            "commitment_attempts": job.commitment_attempts,
            "next_commitment_request": job.commitment_due_at}


def _select_jobs(session: Session, ids: list[int], device: str | None, states: list[str]
                 ) -> list[ColumnElement[bool]]:
    if not ids and device is None:
        raise AdminError("give job ids or --device")
    where: list[ColumnElement[bool]] = [ForwardJob.state.in_(states)]
    if ids:
        where.append(ForwardJob.id.in_(ids))
    device_id = _device_id(session, device)
    if device_id is not None:
        where.append(ForwardJob.device_id == device_id)
    return where


def retry(session: Session, ids: list[int], device: str | None) -> tuple[int, int]:
    """Failed or cancelled jobs (and pending ones waiting for a backoff) go again now, and
    delivered ones still owed a storage commitment are asked for it again now.

    Returns (jobs queued again, jobs whose commitment is asked again)."""
    where = _select_jobs(session, ids, device, [JobState.FAILED, JobState.CANCELLED,
                                                JobState.PENDING])
    result = session.execute(update(ForwardJob).where(*where).values(
        state=JobState.PENDING, attempts=0, next_attempt_at=utcnow(), last_error=""))
    owed = _select_jobs(session, ids, device, [JobState.DONE])
    asked = _ask_commitment(session, [*owed, ForwardJob.commitment.notin_(SETTLED)])
    return rowcount(result) or 0, asked[0]


def ask_commitment(session: Session, device: str, study: str | None = None
                   ) -> tuple[int, int]:
    """Ask `device` to commit what was delivered to it (of one study) and is not committed,
    whatever it answered before; returns (instances, studies)."""
    row = session.execute(select(Device.id, Device.storage_commitment)
                          .where(Device.name == device)).first()
    if row is None:
        raise AdminError(f"no device named {device!r}")
    if not row.storage_commitment:
        raise AdminError(f"device {device} does not ask for storage commitment (device edit"
                         f" {device} --storage-commitment)")
    where = [ForwardJob.device_id == row.id, ForwardJob.state == JobState.DONE,
             ForwardJob.commitment != COMMITTED]
    if study is not None:
        where.append(ForwardJob.study_instance_uid == study)
    return _ask_commitment(session, where)


def _ask_commitment(session: Session, where: list[Any]) -> tuple[int, int]:
    """Make delivered jobs `where` selects due for a commitment request now (attempts start
    over), on devices that ask for commitment; returns (jobs, studies)."""
    where = [*where, ForwardJob.device_id.in_(
        select(Device.id).where(Device.storage_commitment.is_(True)))]
    studies = session.scalar(select(func.count(distinct(ForwardJob.study_instance_uid)))
                             .where(*where)) or 0
    result = session.execute(update(ForwardJob).where(*where).values(
        commitment_due_at=utcnow(), commitment_attempts=0))
    return rowcount(result) or 0, studies


def cancel(session: Session, ids: list[int], device: str | None) -> int:
    where = _select_jobs(session, ids, device, [JobState.PENDING, JobState.FAILED])
    result = session.execute(update(ForwardJob).where(*where).values(state=JobState.CANCELLED))
    return rowcount(result) or 0


@dataclass(frozen=True)
class DestinationStats:
    device: str
    counts: dict[str, int]

    @property
    def waiting(self) -> int:
        return self.counts.get(JobState.PENDING, 0) + self.counts.get(JobState.SENDING, 0)

    @property
    def total(self) -> int:
        return sum(self.counts.values())


def stats(session: Session) -> list[DestinationStats]:
    rows = session.execute(
        select(Device.name, ForwardJob.state, func.count())
        .join(Device, Device.id == ForwardJob.device_id)
        .group_by(Device.name, ForwardJob.state).order_by(Device.name))
    by_device: dict[str, dict[str, int]] = {}
    for name, state, n in rows:
        by_device.setdefault(name, {})[state] = n
    return [DestinationStats(name, counts) for name, counts in by_device.items()]


def depth(session: Session) -> tuple[int, int]:
    """(jobs waiting to be sent, jobs that gave up): counted through the state index."""
    rows = {state: n for state, n in session.execute(
        select(ForwardJob.state, func.count())
        .where(ForwardJob.state.in_([JobState.PENDING, JobState.SENDING, JobState.FAILED]))
        .group_by(ForwardJob.state))}
    waiting = rows.get(JobState.PENDING, 0) + rows.get(JobState.SENDING, 0)
    return waiting, rows.get(JobState.FAILED, 0)


def stored_elsewhere(session: Session, study_pk: int,
                     archive_types: Sequence[str] = ("PARENT", "BACKUP_TARGET")) -> bool:
    """The study may be purged: the rule of node.storage.purge, for one study."""
    uid, partition_id = session.execute(
        select(Study.study_instance_uid, Study.partition_id).where(Study.id == study_pk)).one()
    [candidate] = purge.describe(session, [(study_pk, uid, partition_id)], archive_types)
    return candidate.stored_elsewhere
