"""Storage commitment as SCU: which delivered jobs a destination is asked to commit, and when.

A job delivered to a device that asks for storage commitment is owed a commitment until the
device reports it committed (or turns out not to do commitment at all: `unsupported`).
`commitment_due_at` is when the node asks (again):
- delivered: the request follows at once on the same association; the due time set with
  `done` only covers a node that stops in between;
- asked (the N-ACTION answered success): when the report is overdue
  (`forwarding.commitment_timeout`, or the backoff when that is longer), so a report that
  never comes is asked for again rather than forgotten, as dcm4chee re-requests;
- not asked (no association, no or a failed N-ACTION answer): after the forwarding backoff,
  `retry_base_seconds` doubling up to `retry_max_seconds`, without end;
- reported failed: at the time set when it was asked.
`queue retry`, `queue commit` and switching commitment on for a device make it due now.
The N-EVENT-REPORT itself is recorded by record_report.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from pydicom.dataset import Dataset
from pynetdicom import evt
from sqlalchemy import ColumnElement, and_, func, or_, select, update

from node.config import ForwardingSettings
from node.db.database import Database
from node.db.models import Device, ForwardJob, Instance, JobState, utcnow
from node.forwarding import queue
from node.forwarding.queue import backoff_seconds
from node.statuses import SUCCESS

log = logging.getLogger(__name__)

# The Storage Commitment Push Model SOP Instance every request and report names (PS3.4 J.3).
WELL_KNOWN_INSTANCE = "1.2.840.10008.1.20.1.1"

REQUESTED, COMMITTED, FAILED, UNSUPPORTED = "requested", "committed", "failed", "unsupported"
REQUESTING = "requesting"  # the N-ACTION is on its way (or the association being opened)
SETTLED = (COMMITTED, UNSUPPORTED)  # nothing more to ask


def wait_after(attempts: int, asked: bool, f: ForwardingSettings) -> float:
    """Seconds until jobs are asked again after their `attempts`-th request: the forwarding
    backoff, and when the request was made, at least the time a report may take."""
    backoff = backoff_seconds(attempts, f.retry_base_seconds, f.retry_max_seconds)
    return max(backoff, f.commitment_timeout) if asked else backoff


def due_window(now: datetime, f: ForwardingSettings) -> tuple[datetime, datetime]:
    """A job owed a commitment is asked now when its due time is at or before the first
    bound, or after the second: further ahead than any wait the node sets, which only a wall
    clock stepped back leaves (the job would otherwise wait as long as the step)."""
    longest = max(f.retry_max_seconds, f.commitment_timeout, f.lease_seconds)
    return now, now + timedelta(seconds=longest)


def fallback_due(f: ForwardingSettings) -> datetime:
    """When delivered jobs are asked for should the request that follows at once not be
    made (the node stopped in between)."""
    return utcnow() + timedelta(seconds=f.commitment_timeout)


@dataclass(frozen=True)
class Outcome:
    """What a request's result makes of its jobs."""

    commitment: str
    due_at: datetime | None
    error: str


def after_request(attempts: int, refused: tuple[str, str] | None, now: datetime,
                  f: ForwardingSettings) -> Outcome:
    """The jobs' state after their `attempts`-th request (`refused`: None when the N-ACTION
    was answered success, else (unsupported or failed, why))."""
    if refused is None:
        return Outcome(REQUESTED, now + timedelta(seconds=wait_after(attempts, True, f)), "")
    state, error = refused
    if state == UNSUPPORTED:  # the destination cannot commit: purging relies on delivery
        return Outcome(UNSUPPORTED, None, error)
    return Outcome(FAILED, now + timedelta(seconds=wait_after(attempts, False, f)),
                   f"storage commitment not requested: {error}")


@dataclass(frozen=True)
class Owed:
    """A delivered job to ask commitment for."""

    id: int
    sop_class: str
    sop_instance: str
    attempts: int  # requests made since the last reset


def _due(now: datetime, f: ForwardingSettings) -> ColumnElement[bool]:
    first, last = due_window(now, f)
    return and_(ForwardJob.state == JobState.DONE, ForwardJob.commitment.notin_(SETTLED),
                or_(ForwardJob.commitment_due_at <= first, ForwardJob.commitment_due_at > last))


def due_devices(db: Database, f: ForwardingSettings) -> dict[int, int]:
    """Enabled devices that ask for commitment and have jobs to ask it for now, how many."""
    now = utcnow()
    with db.session() as session:
        rows = session.execute(
            select(ForwardJob.device_id, func.count())
            .join(Device, Device.id == ForwardJob.device_id)
            .where(_due(now, f), Device.storage_commitment.is_(True), Device.enabled.is_(True))
            .group_by(ForwardJob.device_id))
        return {device_id: n for device_id, n in rows}


def claim(db: Database, device_id: int, limit: int, f: ForwardingSettings) -> list[Owed]:
    """Take up to `limit` jobs of one device due for a commitment request (PostgreSQL: SKIP
    LOCKED; SQLite: the single writer). They are not due again for `lease_seconds` unless
    their outcome is recorded first: a requester that dies gives them back then."""
    now = utcnow()
    with db.transaction() as session:
        ids = queue.take(session, select(ForwardJob.id).where(
            ForwardJob.device_id == device_id, _due(now, f))
            .order_by(ForwardJob.commitment_due_at, ForwardJob.id).limit(limit),
            not db.is_sqlite, commitment_due_at=now + timedelta(seconds=f.lease_seconds))
        if not ids:
            return []
        rows = session.execute(
            select(ForwardJob.id, Instance.sop_class_uid, Instance.sop_instance_uid,
                   ForwardJob.commitment_attempts)
            .join(Instance, Instance.id == ForwardJob.instance_pk)
            .where(ForwardJob.id.in_(ids)).order_by(ForwardJob.id))
        return [Owed(*row) for row in rows]


def begin(db: Database, job_ids: Sequence[int], transaction: str) -> None:
    """Name the request's transaction before it is sent: its report may come back (on
    another association) before the N-ACTION's answer has been recorded."""
    with db.transaction() as session:
        session.execute(update(ForwardJob).where(ForwardJob.id.in_(job_ids)).values(
            commitment=REQUESTING, commitment_uid=transaction))


def record(db: Database, owed: Sequence[Owed], transaction: str,
           refused: tuple[str, str] | None, f: ForwardingSettings) -> None:
    """The request's result: when each job is asked again, and why it was not asked."""
    now = utcnow()
    mine = and_(ForwardJob.commitment_uid == transaction, ForwardJob.commitment != COMMITTED)
    with db.transaction() as session:
        for attempts in sorted({o.attempts for o in owed}):
            ids = [o.id for o in owed if o.attempts == attempts]
            outcome = after_request(attempts + 1, refused, now, f)
            session.execute(update(ForwardJob).where(ForwardJob.id.in_(ids), mine).values(
                commitment_attempts=attempts + 1, commitment_due_at=outcome.due_at))
            # A report that arrived meanwhile has the last word on the state.
            session.execute(update(ForwardJob).where(
                ForwardJob.id.in_(ids), mine, ForwardJob.commitment == REQUESTING)
                .values(commitment=outcome.commitment, last_error=outcome.error[:2000]))


def record_report(db: Database, report: Dataset) -> tuple[int, int]:
    """Mark forward jobs of the report's transaction committed or failed; returns the counts.

    Committed jobs are owed nothing more; failed ones are asked again when their request set
    (the schedule above), with the reason in their last error.
    """
    transaction = str(report.get("TransactionUID", ""))
    committed = [str(i.ReferencedSOPInstanceUID) for i in report.get("ReferencedSOPSequence", [])]
    failed: dict[str, list[str]] = {}
    for item in report.get("FailedSOPSequence", []):
        reason = item.get("FailureReason")
        why = ("the destination reported it not committed"
               + (f" (failure reason 0x{int(reason):04X})" if reason is not None else ""))
        failed.setdefault(why, []).append(str(item.ReferencedSOPInstanceUID))
    # (SOP Instance UIDs, the values their jobs take)
    changes: list[tuple[list[str], dict[str, Any]]] = [
        (committed, {"commitment": "committed", "committed_at": utcnow(),
                     "commitment_due_at": None, "last_error": ""}),
        *((uids, {"commitment": "failed", "committed_at": None, "last_error": why})
          for why, uids in failed.items())]
    with db.transaction() as session:
        for uids, values in changes:
            if not uids:
                continue
            session.execute(
                update(ForwardJob)
                .where(ForwardJob.commitment_uid == transaction,
                       ForwardJob.instance_pk.in_(select(Instance.id).where(
                           Instance.sop_instance_uid.in_(uids))))
                .values(**values))
    return len(committed), sum(len(uids) for uids in failed.values())


def on_report(db: Database, event: evt.Event) -> tuple[int, Dataset | None]:
    """EVT_N_EVENT_REPORT handler, on the node's SCP or on a forwarding association."""
    committed, failed = record_report(db, event.event_information)
    log.info("storage commitment report: %d committed, %d failed", committed, failed)
    return SUCCESS, None


def reference(sop_class: str, sop_instance: str, reason: int | None = None) -> Dataset:
    item = Dataset()
    item.ReferencedSOPClassUID = sop_class
    item.ReferencedSOPInstanceUID = sop_instance
    if reason is not None:
        item.FailureReason = reason
    return item


def request_dataset(transaction: str, refs: list[tuple[str, str]]) -> Dataset:
    """The N-ACTION information of a commitment request for `refs` (class, instance)."""
    ds = Dataset()
    ds.TransactionUID = transaction
    ds.ReferencedSOPSequence = [reference(c, s) for c, s in refs]
    return ds
