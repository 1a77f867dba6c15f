"""The DICOM activity log: who did what, when, on which study, and how it went
(docs/how-to/activity-log.md).

Rows are aggregated by the code that records them (one per association, per study stored on an
association, per query or retrieve request, per forwarded batch), never one per instance. The
node's recorder keeps them in memory and writes them with one bulk INSERT about once a second:
C-STORE is the hot path, and a log row is not worth a database round trip there. A crash can
lose the last second of activity; that is accepted, since nothing here was acknowledged to a
peer. CLI processes (study delete/restore) call write() in their own transaction instead.
"""

from __future__ import annotations

import heapq
import logging
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import delete, insert, or_, select
from sqlalchemy.orm import Session

from node.db.database import Database, unavailable
from node.db.models import Activity, utcnow

log = logging.getLogger(__name__)

KINDS = ("association", "reject", "echo", "store", "import", "find", "move", "get",
         "commitment", "forward", "purge", "delete", "restore")
OUTCOMES = ("ok", "warning", "failed")

PRUNE_CHUNK = 5000  # rows per DELETE: a large backlog never holds a long lock
DETAIL_MAX = 2000


@dataclass(frozen=True)
class Event:
    kind: str  # one of KINDS
    partition: str = ""  # partition AE title
    calling_ae: str = ""
    called_ae: str = ""
    peer: str = ""  # "ip:port" or a device name
    study_instance_uid: str = ""
    count: int = 0  # instances / matches / sub-operations
    failed: int = 0
    outcome: str = "ok"  # ok | warning | failed
    detail: str = ""
    at: datetime | None = None  # None: now (UTC)


def _row(event: Event, now: datetime | None = None) -> dict[str, Any]:
    """The INSERT parameters of one event, cut to the column sizes.

    A value longer than its column would fail the whole batch on PostgreSQL (and lose every
    other event of the flush), so everything is clipped here rather than trusted.
    """
    at = event.at or now or utcnow()
    if at.tzinfo is None:
        at = at.replace(tzinfo=UTC)
    return {
        "at": at,
        "kind": str(event.kind)[:16],
        "partition": str(event.partition)[:16],
        "calling_ae": str(event.calling_ae)[:16],
        "called_ae": str(event.called_ae)[:16],
        "peer": str(event.peer)[:128],
        "study_instance_uid": str(event.study_instance_uid)[:64],
        "count": int(event.count),
        "failed": int(event.failed),
        "outcome": str(event.outcome)[:16],
        "detail": str(event.detail)[:DETAIL_MAX],
    }


class ActivityLog:
    """Buffers events in memory and writes them in bulk from a background thread."""

    def __init__(self, db: Database, enabled: bool = True, flush_seconds: float = 1.0,
                 max_buffer: int = 50_000) -> None:
        self.db = db
        self.enabled = enabled
        self.flush_seconds = flush_seconds
        self.max_buffer = max_buffer
        self.dropped = 0  # events lost to a full buffer, since the start
        self._buffer: list[dict[str, Any]] = []
        self._lock = threading.Lock()  # guards _buffer and the drop counters; never held on I/O
        self._flush_lock = threading.Lock()  # one flush at a time (thread, stop(), callers)
        self._dropping = 0  # dropped since the last flush: logged once per overflow
        self._waiting = False  # the last flush found the database unavailable
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def record(self, event: Event) -> None:
        """Queue one event; thread-safe, never touches the database, never raises."""
        if not self.enabled:
            return
        try:
            row = _row(event)
        except Exception:
            # A caller's bad value must not fail the DICOM operation it describes.
            log.exception("activity event %r not recorded", event)
            return
        with self._lock:
            if len(self._buffer) < self.max_buffer:
                self._buffer.append(row)
                return
            self.dropped += 1
            self._dropping += 1
            first = self._dropping == 1
        if first:
            log.warning("activity log buffer full (%d events, the database is not keeping up):"
                        " dropping events until the next write", self.max_buffer)

    def flush(self) -> int:
        """Write the buffered events now, in one bulk INSERT; returns how many were written."""
        with self._flush_lock:
            with self._lock:
                rows, self._buffer = self._buffer, []
                dropped, self._dropping = self._dropping, 0
            if dropped:
                log.warning("%d activity event(s) were dropped (buffer full)", dropped)
            if not rows:
                return 0
            try:
                with self.db.transaction() as session:
                    session.execute(insert(Activity), rows)
            except Exception as exc:
                if not unavailable(exc):
                    # Not put back: a batch the database refuses would be refused again.
                    log.error("activity log: %d event(s) dropped, cannot write them: %s",
                              len(rows), exc)
                    return 0
                # The database does not answer (or is locked) for now: the events wait for
                # the next flush, within the buffer's bound, so what happened during an
                # outage (the stores refused) is in the log once it is over.
                with self._lock:
                    kept = rows[max(0, len(rows) + len(self._buffer) - self.max_buffer):]
                    self._buffer[:0] = kept
                    self.dropped += len(rows) - len(kept)
                log.warning("activity log: %d event(s) not written yet (%d dropped): %s",
                            len(kept), len(rows) - len(kept), exc)
                return 0
            return len(rows)

    def start(self) -> None:
        if not self.enabled or self._thread is not None:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="activity-log", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.flush_seconds):
            try:
                self.flush()
            except Exception:
                log.exception("activity log flush failed")  # and try again next time

    def stop(self) -> None:
        """Stop the thread and write what is left."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        self.flush()


def write(session: Session, events: Iterable[Event]) -> None:
    """Insert events in the caller's transaction (CLI processes, which have no recorder)."""
    now = utcnow()
    rows = [_row(event, now) for event in events]
    if rows:
        session.execute(insert(Activity), rows)


def prune(db: Database, retention_days: int, now: datetime | None = None) -> int:
    """Delete rows older than `retention_days` (0: keep forever); returns how many went."""
    if retention_days <= 0:
        return 0
    cutoff = (now or utcnow()) - timedelta(days=retention_days)
    removed = 0
    while True:
        # One short transaction per chunk: ingest (SQLite's single writer) and the recorder
        # get the database between chunks however large the backlog is.
        with db.transaction() as session:
            ids = list(session.scalars(select(Activity.id).where(Activity.at < cutoff)
                                       .order_by(Activity.at).limit(PRUNE_CHUNK)))
            if ids:
                session.execute(delete(Activity).where(Activity.id.in_(ids)))
        removed += len(ids)
        if len(ids) < PRUNE_CHUNK:
            return removed


def query(session: Session, *, since: datetime | None = None, until: datetime | None = None,
          kinds: Sequence[str] = (), ae_title: str = "", study_instance_uid: str = "",
          outcome: str = "", limit: int = 100) -> list[Activity]:
    """Matching rows, newest first, at most `limit`.

    Every statement is ORDER BY at DESC LIMIT n over an index that yields rows in that order
    (at, or kind+at per kind), or starts from the study UID index, so the answer never needs
    a sort of the whole table. Several kinds are read one index range each and merged here.
    """
    conditions: list[Any] = []
    if since is not None:
        conditions.append(Activity.at >= since)
    if until is not None:
        conditions.append(Activity.at <= until)
    if ae_title:
        conditions.append(or_(Activity.calling_ae == ae_title, Activity.called_ae == ae_title,
                              Activity.partition == ae_title))
    if study_instance_uid:
        conditions.append(Activity.study_instance_uid == study_instance_uid)
    if outcome:
        conditions.append(Activity.outcome == outcome)

    def newest(*extra: Any) -> list[Activity]:
        stmt = (select(Activity).where(*conditions, *extra)
                .order_by(Activity.at.desc()).limit(limit))
        return list(session.scalars(stmt))

    wanted = list(dict.fromkeys(kinds))
    if len(wanted) <= 1:
        return newest(*(Activity.kind == k for k in wanted))
    merged = heapq.merge(*(newest(Activity.kind == k) for k in wanted),
                         key=lambda a: _aware(a.at), reverse=True)
    return [row for _, row in zip(range(limit), merged, strict=False)]


def _aware(at: datetime) -> datetime:
    # SQLite hands back naive datetimes (stored as UTC); PostgreSQL aware ones.
    return at if at.tzinfo is not None else at.replace(tzinfo=UTC)
