"""The storage monitor: every check interval, measure each filesystem, suspend or resume
storage at the critical watermark, purge between the high and low watermarks, prune the
activity log, and leave a report in node_meta for `pacsnode status`.
"""

from __future__ import annotations

import functools
import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from sqlalchemy import func, select
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

from node import activity
from node.clock import StepWatch
from node.config import Settings
from node.db.database import Database
from node.db.models import NodeMeta, Partition, Study
from node.notify import Notifier
from node.policy.purge import Candidate
from node.policy.purge import choose as choose_purge
from node.statuses import OUT_OF_RESOURCES
from node.storage import cpu, deletion, files, purge, reconcile
from node.storage.space import StorageGuard, Usage, bytes_above, measure

log = logging.getLogger(__name__)

STATE_KEY = "storage_state"
_PRUNE_EVERY = 3600.0  # seconds, monotonic (a clock stepped back must not put it off)


@dataclass
class FilesystemReport:
    path: str
    total: int
    available: int
    percent_used: float
    suspended: bool
    purging: bool
    partitions: list[str]
    waiting: str = ""  # why purging is not running although it should


@dataclass
class PurgeReport:
    at: str
    path: str
    studies: int
    bytes: int
    stopped: str  # why it stopped


@dataclass
class StorageState:
    checked_at: str = ""
    check_interval_seconds: float = 0.0
    watermarks: dict[str, float] = field(default_factory=dict)
    filesystems: list[FilesystemReport] = field(default_factory=list)
    last_purge: PurgeReport | None = None


def load_state(session: Session) -> StorageState | None:
    """What the node's monitor last reported (None: it never ran)."""
    raw = session.scalar(select(NodeMeta.value).where(NodeMeta.key == STATE_KEY))
    if not raw:
        return None
    data = json.loads(raw)
    last = data.get("last_purge")
    return StorageState(
        checked_at=data.get("checked_at", ""),
        check_interval_seconds=data.get("check_interval_seconds", 0.0),
        watermarks=data.get("watermarks", {}),
        filesystems=[FilesystemReport(**f) for f in data.get("filesystems", [])],
        last_purge=PurgeReport(**last) if last else None)


class StorageMonitor:
    def __init__(self, db: Database, settings: Settings, root: Path, guard: StorageGuard,
                 activity_log: activity.ActivityLog | None = None,
                 notifier: Notifier | None = None) -> None:
        self.db = db
        self.s = settings.storage
        # pynetdicom leaves the temporary file of a transfer it gave up on (a disk that filled
        # mid-write kills the association without a close event): swept once surely dead.
        self.incoming_idle_seconds = settings.dicom.network_timeout + 1.0
        self.root = root
        self.guard = guard
        self.activity = activity_log
        self.notifier = notifier
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._purging: set[str] = set()  # filesystems (by path) between high and low
        self._cpu = cpu.sample()
        self._last_prune: float | None = None  # monotonic
        # A step of the wall clock forward ages every file at once (the sweep goes by their
        # modification time): after one, no file counts as idle before it could have been.
        self._clock = StepWatch()
        self._sweep_from = 0.0  # monotonic
        self._last_purge: PurgeReport | None = None
        self._lock = threading.Lock()  # one check at a time (the thread, or a test's call)
        guard.on_change.append(self._on_storage_change)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="storage-monitor", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(30)
            self._thread = None

    def _loop(self) -> None:
        while True:
            try:
                self.check()
            except SQLAlchemyError as exc:
                log.error("storage check: index unavailable: %s", exc)
            except Exception:
                log.exception("storage check failed")
            if self._stop.wait(self.s.check_interval_seconds):
                return

    def check(self) -> StorageState:
        """One check of every filesystem; purges where needed. Returns what it reported."""
        with self._lock:
            with self.db.session() as session:
                partitions = [(p.id, p.ae_title, p.folder)
                              for p in session.scalars(select(Partition))]
            measured = self.guard.refresh([folder for _, _, folder in partitions])
            reports = []
            for device, (path, usage, suspended) in measured.items():
                folders = set(self.guard.folders_on(device))
                on_fs = [(pid, ae) for pid, ae, folder in partitions if folder in folders]
                reports.append(self._check_filesystem(path, usage, suspended, on_fs))
            self._prune_activity()
            if self._clock.step() > 0:
                self._sweep_from = time.monotonic() + self.incoming_idle_seconds
            swept = (files.sweep_incoming(
                self.root, self.incoming_idle_seconds,
                settle=functools.partial(reconcile.settle, self.db, self.root))
                if time.monotonic() >= self._sweep_from else 0)
            if swept:
                log.warning("removed %d abandoned temporary file(s) from %s", swept,
                            self.root / files.INCOMING)
            state = StorageState(
                checked_at=datetime.now(UTC).isoformat(timespec="seconds"),
                check_interval_seconds=self.s.check_interval_seconds,
                watermarks={"low": self.s.low_watermark, "high": self.s.high_watermark,
                            "critical": self.s.critical_watermark},
                filesystems=reports, last_purge=self._last_purge)
            self._save(state)
            return state

    def _check_filesystem(self, path: Path, usage: Usage, suspended: bool,
                          partitions: list[tuple[int, str]]) -> FilesystemReport:
        key = str(path)
        if usage.percent_used >= self.s.high_watermark:
            self._purging.add(key)
        elif usage.percent_used <= self.s.low_watermark:
            self._purging.discard(key)
        waiting = ""
        if key in self._purging and partitions:
            if not self.s.auto_purge:
                waiting = "auto-purge is off"
            else:
                waiting = self._purge(path, [pid for pid, _ in partitions], suspended)
                usage = measure(path)
                suspended = usage.percent_used >= self.s.critical_watermark
                if usage.percent_used <= self.s.low_watermark:
                    self._purging.discard(key)
        return FilesystemReport(key, usage.total, usage.available,
                                round(usage.percent_used, 2), suspended, key in self._purging,
                                [ae for _, ae in partitions], waiting)

    def _cpu_busy(self) -> str:
        """Why purging must wait for the CPU now ('' when it may run)."""
        if self.s.cpu_idle_threshold <= 0:
            return ""
        now = cpu.sample()
        before, self._cpu = self._cpu, now
        if before is None or now is None:
            return ""
        idle = cpu.idle_percent(before, now)
        if idle < self.s.cpu_idle_threshold:
            return f"CPU {idle:.0f}% idle, below the {self.s.cpu_idle_threshold:g}% threshold"
        return ""

    def _purge(self, path: Path, partition_ids: list[int], suspended: bool) -> str:
        """Delete batches of studies stored elsewhere until usage is at the low watermark.

        Returns why it stopped early ('' when the low watermark was reached). When storage is
        suspended the CPU threshold is not waited for: a full archive refusing images is worse
        than a busy one.
        """
        purged = freed = 0
        stopped = ""
        first_used: int | None = None
        while not self._stop.is_set():
            usage = measure(path)
            needed = bytes_above(usage, self.s.low_watermark)
            if first_used is None:
                first_used = usage.used
            # A deleted file's space is released only when nothing holds it any more (a
            # retrieve reading it, a link in .incoming until its directory's fsync): what this
            # purge deleted and the filesystem does not show free yet is counted as freed, or
            # the purge would go on deleting studies for space that is on its way.
            unreleased = max(0, freed - (first_used - usage.used))
            if needed == 0:
                break
            if needed <= unreleased:
                stopped = (f"usage has not fallen by the {unreleased} bytes deleted yet (files"
                           " still open or linked, or new images); the next check goes on")
                break
            needed -= unreleased
            busy = "" if usage.percent_used >= self.s.critical_watermark else self._cpu_busy()
            if busy:
                stopped = busy
                break
            with self.db.session() as session:
                held = session.scalar(select(func.count()).select_from(Study)
                                      .where(Study.partition_id.in_(partition_ids))) or 0
                batch = choose_purge(
                    purge.candidates(session, partition_ids, self.s.purge_order,
                                     self.s.archive_device_types),
                    bytes_needed=needed, batch_size=self.s.purge_batch_size,
                    studies_held=held, protected=self.s.protected_studies)
            for candidate in batch.studies:
                removed = deletion.delete_study(
                    self.db, self.root, candidate.study_pk, keep=False,
                    reason=f"auto-purge: {path} {usage.percent_used:.1f}% full",
                    still_wanted=self._still_purgeable(candidate))
                if removed is not None:
                    purged += 1
                    freed += removed.size
                    self._record(removed)
            if batch.reason:
                stopped = batch.reason
                break
        if purged or stopped:
            self._last_purge = PurgeReport(datetime.now(UTC).isoformat(timespec="seconds"),
                                           str(path), purged, freed,
                                           stopped or "low watermark reached")
            level = logging.WARNING if stopped and not purged else logging.INFO
            log.log(level, "purge of %s: %d studies, %d bytes freed; %s", path, purged, freed,
                    stopped or "low watermark reached")
        return stopped

    def _still_purgeable(self, candidate: Candidate) -> Callable[[Session], bool]:
        def check(session: Session) -> bool:
            [now] = purge.describe(session, [(candidate.study_pk, candidate.study_instance_uid,
                                              candidate.partition_id)],
                                   self.s.archive_device_types)
            return now.stored_elsewhere
        return check

    def _record(self, removed: deletion.Removed) -> None:
        if self.activity is not None:
            self.activity.record(activity.Event(
                kind="purge", partition=removed.partition,
                study_instance_uid=removed.study_instance_uid, count=removed.instances,
                detail=f"{removed.size} bytes freed"))

    def _prune_activity(self) -> None:
        now = time.monotonic()
        if self._last_prune is not None and now - self._last_prune < _PRUNE_EVERY:
            return
        self._last_prune = now
        removed = activity.prune(self.db, self.s.activity_retention_days)
        if removed:
            log.info("activity log: %d entries older than %d days removed", removed,
                     self.s.activity_retention_days)

    def _save(self, state: StorageState) -> None:
        value = json.dumps(asdict(state))
        with self.db.transaction() as session:
            row = session.get(NodeMeta, STATE_KEY)
            if row is None:
                session.add(NodeMeta(key=STATE_KEY, value=value))
            else:
                row.value = value

    def _on_storage_change(self, _device: int, suspended: bool, usage: Usage,
                           path: Path) -> None:
        # Called with the guard's lock held: log and hand the e-mail to the notifier thread.
        figures = (f"{path} is {usage.percent_used:.1f}% full ({usage.available} bytes free;"
                   f" critical watermark {self.s.critical_watermark:g}%)")
        if suspended:
            log.error("storage suspended: C-STORE answers 0x%04X (out of resources) until"
                      " space is freed: %s", OUT_OF_RESOURCES, figures)
            subject, body = "storage suspended", (
                f"The storage SCP is suspended: {figures}.\nQueries and retrieves keep working;"
                " storage resumes by itself when space is available again.")
        else:
            log.warning("storage resumed: %s", figures)
            subject, body = "storage resumed", f"The storage SCP accepts images again: {figures}."
        if self.notifier is not None:
            self.notifier.send(subject, body)
