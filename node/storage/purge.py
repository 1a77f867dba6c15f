"""Which studies auto-purge deletes: a pure choice over candidates the index describes.

A study may be purged only when it is stored elsewhere: every instance reached an archive
device (storage.archive_device_types) and, where that device asks for storage commitment, was
committed there; and no forward job of the study is still waiting, sending or failed (purging
would take away what that destination has not got). Purged studies are not kept in the
deleted folder.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import and_, distinct, func, or_, select
from sqlalchemy.orm import Session

from node.db.models import Device, ForwardJob, Instance, JobState, Series, Study

_CHUNK = 200  # candidate studies read per query, in purge order
# A batch looks at most this many studies, oldest first: a filesystem full of studies not yet
# stored elsewhere must not cost a read of the whole index at every check.
SCAN_LIMIT = 10_000
_OPEN_STATES = (JobState.PENDING, JobState.SENDING, JobState.FAILED)


@dataclass(frozen=True)
class Candidate:
    study_pk: int
    study_instance_uid: str
    partition_id: int
    size: int
    instances: int
    archived_instances: int  # instances stored (and committed where asked) on an archive
    open_jobs: int  # forward jobs pending, sending or failed

    @property
    def stored_elsewhere(self) -> bool:
        return self.instances > 0 and self.archived_instances >= self.instances \
            and self.open_jobs == 0


@dataclass(frozen=True)
class Batch:
    studies: list[Candidate]
    bytes: int
    reason: str  # why the batch is smaller than asked ('' when the target was met)


def choose(candidates: Iterable[Candidate], *, bytes_needed: int, batch_size: int,
           studies_held: int, protected: int) -> Batch:
    """Studies to delete now, in the candidates' (purge) order.

    Takes studies stored elsewhere until their size covers `bytes_needed` (so purging stops at
    the low watermark, not a batch later), at most `batch_size`, and never so many that fewer
    than `protected` studies would remain.
    """
    chosen: list[Candidate] = []
    freed = 0
    may_delete = max(0, studies_held - protected)
    if may_delete == 0:
        return Batch([], 0, f"only {studies_held} studies held, {protected} protected")
    for seen, candidate in enumerate(candidates, start=1):
        if freed >= bytes_needed or len(chosen) >= batch_size:
            break
        if seen > SCAN_LIMIT:
            return Batch(chosen, freed, f"none of the {SCAN_LIMIT} oldest studies left is"
                         " stored elsewhere" if not chosen else "")
        if len(chosen) >= may_delete:
            return Batch(chosen, freed, f"{protected} studies are protected")
        if candidate.stored_elsewhere:
            chosen.append(candidate)
            freed += candidate.size
    reason = ""
    if freed < bytes_needed and len(chosen) < batch_size:
        reason = "no more studies stored elsewhere"
    return Batch(chosen, freed, reason)


def _order_column(order: str) -> object:
    return Study.accessed_at if order == "accessed" else Study.received_at


def candidates(session: Session, partition_ids: Sequence[int], order: str,
               archive_types: Sequence[str]) -> Iterator[Candidate]:
    """Studies of these partitions in purge order, with what `Candidate` needs.

    Reads the studies table through its received_at/accessed_at index a chunk at a time, and
    aggregates instances and jobs only for that chunk (never the whole table).
    """
    column = _order_column(order)
    after: tuple[datetime, int] | None = None
    while True:
        stmt = (select(Study.id, Study.study_instance_uid, Study.partition_id, column)
                .where(Study.partition_id.in_(partition_ids))
                .order_by(column, Study.id).limit(_CHUNK))
        if after is not None:
            stmt = stmt.where(or_(column > after[0], and_(column == after[0],
                                                         Study.id > after[1])))
        rows = session.execute(stmt).all()
        if not rows:
            return
        yield from describe(session, [(pk, uid, pid) for pk, uid, pid, _ in rows],
                            archive_types)
        after = (rows[-1][3], rows[-1][0])


def describe(session: Session, studies: Sequence[tuple[int, str, int]],
             archive_types: Sequence[str]) -> list[Candidate]:
    """Sizes and forwarding state of `studies` (pk, uid, partition id), in the given order."""
    pks = [pk for pk, _, _ in studies]
    sizes = {pk: (n, size) for pk, n, size in session.execute(
        select(Series.study_pk, func.count(Instance.id), func.coalesce(func.sum(Instance.size), 0))
        .join(Instance, Instance.series_pk == Series.id)
        .where(Series.study_pk.in_(pks)).group_by(Series.study_pk))}
    archived = dict(session.execute(
        select(Series.study_pk, func.count(distinct(ForwardJob.instance_pk)))
        .join(Instance, Instance.series_pk == Series.id)
        .join(ForwardJob, ForwardJob.instance_pk == Instance.id)
        .join(Device, Device.id == ForwardJob.device_id)
        .where(Series.study_pk.in_(pks), ForwardJob.state == JobState.DONE,
               Device.device_type.in_(archive_types), _committed_where_asked())
        .group_by(Series.study_pk)).all())
    open_jobs = dict(session.execute(
        select(Series.study_pk, func.count(ForwardJob.id))
        .join(Instance, Instance.series_pk == Series.id)
        .join(ForwardJob, ForwardJob.instance_pk == Instance.id)
        .where(Series.study_pk.in_(pks), ForwardJob.state.in_(_OPEN_STATES))
        .group_by(Series.study_pk)).all())
    return [Candidate(pk, uid, pid, int(sizes.get(pk, (0, 0))[1]), sizes.get(pk, (0, 0))[0],
                      archived.get(pk, 0), open_jobs.get(pk, 0))
            for pk, uid, pid in studies]


def _committed_where_asked() -> object:
    # A device that asks for commitment: the job must be committed there, or the device turned
    # out not to support commitment. Otherwise a done job is enough, whatever a request made
    # while the device still asked for commitment left (nothing asks it again).
    return or_(ForwardJob.commitment.in_(("committed", "unsupported")),
               Device.storage_commitment.is_(False))
