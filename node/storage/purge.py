"""The studies auto-purge may delete, read from the index in purge order, a chunk at a time.

What makes a study purgeable, and how many go in a batch, is decided by policy/purge.py over
the `Candidate`s read here.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from datetime import datetime

from sqlalchemy import ColumnElement, and_, distinct, func, or_, select
from sqlalchemy.orm import InstrumentedAttribute, Session

from node.db.models import Device, ForwardJob, Instance, JobState, Series, Study
from node.policy.purge import Candidate

_CHUNK = 200  # candidate studies read per query, in purge order
_OPEN_STATES = (JobState.PENDING, JobState.SENDING, JobState.FAILED)


def _order_column(order: str) -> InstrumentedAttribute[datetime]:
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


def _committed_where_asked() -> ColumnElement[bool]:
    # A device that asks for commitment: the job must be committed there, or the device turned
    # out not to support commitment. Otherwise a done job is enough, whatever a request made
    # while the device still asked for commitment left (nothing asks it again).
    return or_(ForwardJob.commitment.in_(("committed", "unsupported")),
               Device.storage_commitment.is_(False))
