"""The node's forwarding service: sender tasks over the durable queue, within device limits."""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from pynetdicom import evt
from sqlalchemy import select
from sqlalchemy.exc import SQLAlchemyError

from node.activity import ActivityLog, Event
from node.clock import StepWatch
from node.config import Settings
from node.db.database import Database
from node.db.models import Category, Device, Partition
from node.forwarding import commitment, queue
from node.forwarding.commitment import on_report
from node.forwarding.sender import Connection, Result, Target
from node.tls import endpoint

log = logging.getLogger(__name__)

# Seconds between looks for jobs due later than any backoff (a clock stepped back while this
# process did not watch, or another machine's clock ahead): one index probe each.
CEILING_CHECK_SECONDS = 10.0


def may_start_task(busy: int, limit: int | None, waiting: int, batch_size: int) -> bool:
    """Whether a device with `busy` sender tasks running gets another: below its limit (None:
    not known yet), and beyond the first only for a backlog, a batch or more of due jobs that
    no task holds. A trickle of stores keeps one association; a burst that outruns it opens
    the next."""
    if limit is not None and busy >= limit:
        return False
    return busy == 0 or waiting >= batch_size


class Forwarder:
    """Claims due jobs per destination and sends them, never exceeding a device's
    max_outbound_tasks or its category's max_connections (open associations, in this node)."""

    def __init__(self, db: Database, settings: Settings, storage_root: Path, owner: str,
                 activity: ActivityLog | None = None) -> None:
        """`activity`: where one row per study of each batch sent goes (None: not recorded)."""
        self.db = db
        self.activity = activity
        self.settings = settings
        self.root = storage_root
        self.owner = owner
        self.f = settings.forwarding
        self._connections: dict[int, list[Connection]] = {}  # device id -> open or idle
        self._busy: set[int] = set()  # id() of connections a task is using
        self._category_of: dict[int, int | None] = {}  # device id -> its category now
        self._max_tasks: dict[int, int] = {}  # device id -> its sender task limit, as last read
        self._owed_checked = 0.0  # monotonic time commitments owed were last looked for
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._pool = ThreadPoolExecutor(max_workers=self.f.workers,
                                        thread_name_prefix="forward")
        self._threads: list[threading.Thread] = []
        self._clock = StepWatch()
        self._ceiling_checked = 0.0  # monotonic
        self._stepped: set[str] = set()  # steps of the clock not yet dealt with

    # Life cycle ---------------------------------------------------------------------------
    def start(self) -> None:
        released = queue.release_claims(self.db, self.owner)
        if released:
            log.info("%d forward job(s) interrupted at the last stop go back to the queue",
                     released)
        # The clock may have been put back while the node was down.
        self._clamp("at start", always_log=False)
        for target, name in ((self._dispatch_loop, "forward-dispatch"),
                             (self._heartbeat_loop, "forward-heartbeat")):
            thread = threading.Thread(target=target, name=name, daemon=True)
            thread.start()
            self._threads.append(thread)

    def wake(self) -> None:
        """New jobs were queued: look now rather than at the next poll."""
        self._wake.set()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        for thread in self._threads:
            thread.join()
        self._pool.shutdown(wait=True)
        with self._lock:
            for connections in self._connections.values():
                for connection in connections:
                    connection.close()
            self._connections.clear()

    # Dispatch -----------------------------------------------------------------------------
    def _dispatch_loop(self) -> None:
        while not self._stop.is_set():
            try:
                self._dispatch()
            except SQLAlchemyError as exc:
                log.error("forwarding queue unavailable: %s", exc)
            self._wake.wait(self.f.poll_seconds)
            self._wake.clear()

    def _watch_clock(self) -> None:
        """Due times and leases are wall-clock times in the database: after a step of the
        clock, retries wait at most their backoff and batches on their way stay claimed."""
        jump = self._clock.step()
        if jump:
            log.warning("wall clock stepped %s %.0f s", "forward" if jump > 0 else "back",
                        abs(jump))
            self._stepped.add("forward" if jump > 0 else "back")
        # Until done: a database that is unavailable now must not make the step forgotten.
        if "forward" in self._stepped:
            renewed = queue.renew_claims(self.db, self.owner)
            self._stepped.discard("forward")
            if renewed:
                log.info("%d forward job(s) being sent keep their claim", renewed)
        if "back" in self._stepped:
            self._clamp("after the step back")
            self._stepped.discard("back")
        elif time.monotonic() - self._ceiling_checked >= CEILING_CHECK_SECONDS:
            self._ceiling_checked = time.monotonic()
            if queue.beyond_ceiling(self.db, self.f):
                self._clamp("jobs due beyond retry_max_seconds")

    def _clamp(self, why: str, *, always_log: bool = True) -> None:
        moved = queue.clamp_due_times(self.db, self.f)
        if moved or always_log:
            log.warning("%s: %d forward job(s) due later than their backoff allows are due "
                        "within it", why, moved)

    def _dispatch(self) -> None:
        self._watch_clock()
        with self._lock:
            if len(self._busy) >= self.f.workers:
                return  # a task that ends wakes this loop again
        due = queue.due_devices(self.db, self.f.lease_seconds)
        # Commitment requests alone never open a second association (may_start_task counts
        # jobs to send): a task asks for them after its batch. Looked for once a poll, not at
        # every wake (each store wakes this loop).
        owed: dict[int, int] = {}
        if time.monotonic() - self._owed_checked >= self.f.poll_seconds:
            self._owed_checked = time.monotonic()
            owed = commitment.due_devices(self.db, self.f)
        # Every store queues jobs and wakes this loop; a device that gets no new task now
        # (see may_start_task) gets its next one when a running one ends (which wakes the
        # loop), so its settings are not read again for each store meanwhile. (A limit raised
        # meanwhile is seen then.)
        ready = [device_id for device_id in dict.fromkeys([*due, *owed])
                 if may_start_task(self._busy_tasks(device_id), self._max_tasks.get(device_id),
                                   due.get(device_id, 0), self.f.batch_size)]
        if not ready:
            return
        targets = self._targets(ready)
        for device_id in ready:
            target_limits = targets.get(device_id)
            if target_limits is None:
                continue  # disabled or deleted: its jobs wait
            target, max_tasks, category = target_limits
            connection = self._acquire(target, max_tasks, category, due.get(device_id, 0))
            if connection is None:
                continue
            self._pool.submit(self._run, connection)

    def _targets(self, device_ids: list[int]
                 ) -> dict[int, tuple[Target, int, tuple[int, int] | None]]:
        d = self.settings.dicom
        out: dict[int, tuple[Target, int, tuple[int, int] | None]] = {}
        with self.db.session() as session:
            first_ae = session.scalar(select(Partition.ae_title).order_by(Partition.id))
            categories = {c.id: c.max_connections for c in session.scalars(select(Category))}
            for device in session.scalars(select(Device).where(Device.id.in_(device_ids))):
                if not device.enabled:
                    continue
                calling = device.partition.ae_title if device.partition else first_ae
                where = endpoint(self.settings, host=device.host, ip=device.ip,
                                 port=device.port, tls_port=device.tls_port)
                target = Target(
                    device_id=device.id, name=device.name, ae_title=device.ae_title,
                    address=where.address, port=where.port, tls_args=where.tls_args,
                    calling_ae=calling or "PACSNODE",
                    max_pdu=device.max_pdu_size or d.max_pdu_size,
                    acse_timeout=device.acse_timeout or d.acse_timeout,
                    dimse_timeout=device.dimse_timeout or d.dimse_timeout,
                    network_timeout=device.network_timeout or d.network_timeout,
                    connection_timeout=d.connection_timeout,
                    extra_syntaxes=tuple(ts for ts in device.transfer_syntaxes.split(",") if ts),
                    heartbeat=(device.heartbeat if device.heartbeat is not None
                               else self.f.heartbeat),
                    remove_private_tags=(device.remove_private_tags
                                         if device.remove_private_tags is not None
                                         else self.f.remove_private_tags),
                    storage_commitment=device.storage_commitment,
                )
                category = ((device.category_id, categories[device.category_id])
                            if device.category_id in categories else None)
                out[device.id] = (target, max(1, device.max_outbound_tasks), category)
        return out

    def _busy_tasks(self, device_id: int) -> int:
        with self._lock:
            return sum(1 for c in self._connections.get(device_id, []) if id(c) in self._busy)

    def _acquire(self, target: Target, max_tasks: int, category: tuple[int, int] | None,
                 waiting: int) -> Connection | None:
        """An idle connection of the device, or a new one if its limits allow and `waiting`
        (its due jobs no task holds) calls for it; else None."""
        with self._lock:
            self._max_tasks[target.device_id] = max_tasks
            if len(self._busy) >= self.f.workers:
                return None
            self._category_of[target.device_id] = category[0] if category else None
            mine = self._connections.setdefault(target.device_id, [])
            # Limits can be lowered, or a device moved into a category, while connections are
            # open: close idle ones until the device and its category are within bounds.
            self._shed(mine, max_tasks)
            in_category = 0
            if category is not None:
                members = [d for d, c in self._category_of.items() if c == category[0]]
                for member in members:
                    over = sum(len(self._connections.get(m, [])) for m in members) - category[1]
                    if over > 0:
                        self._shed(self._connections.get(member, []),
                                   len(self._connections.get(member, [])) - over)
                in_category = sum(len(self._connections.get(m, [])) for m in members)
            for connection in mine:
                if id(connection) not in self._busy:
                    connection.target = target  # settings may have changed
                    self._busy.add(id(connection))
                    return connection
            if not may_start_task(len(mine), max_tasks, waiting, self.f.batch_size):
                return None
            if category is not None and in_category >= category[1]:
                # Full: an idle connection of another member makes room (idle heartbeat
                # associations must not starve the category's other devices).
                others = [c for d, c_id in self._category_of.items()
                          if c_id == category[0] and d != target.device_id
                          for c in self._connections.get(d, []) if id(c) not in self._busy]
                if not others:
                    return None
                victim = others[0]
                with victim.lock:
                    victim.close()
                self._connections[victim.target.device_id].remove(victim)
            connection = Connection(target, on_report=self._on_report)
            mine.append(connection)
            self._busy.add(id(connection))
            return connection

    def _shed(self, connections: list[Connection], keep: int) -> None:
        """Close idle connections (never a busy one) until at most `keep` remain."""
        for connection in [c for c in connections if id(c) not in self._busy]:
            if len(connections) <= max(keep, 0):
                return
            with connection.lock:
                connection.close()
            connections.remove(connection)

    def _run(self, connection: Connection) -> None:
        target = connection.target
        try:
            jobs = queue.claim(self.db, target.device_id, self.f.batch_size, self.owner,
                               self.f.lease_seconds, self.root)
            if jobs:
                result = connection.send(jobs)
                self._record(target, jobs, result)
                queue.mark_done(self.db, result.done, commitment_due=(
                    commitment.fallback_due(self.f) if target.storage_commitment else None))
                for job, error in result.retry:
                    log.warning("forward of %s to %s failed (attempt %d): %s",
                                job.sop_instance, target.name, job.attempts + 1, error)
                    queue.mark_failed_attempt(self.db, job, error, self.f)
                for job, error in result.failed:
                    log.error("forward of %s to %s failed for good: %s", job.sop_instance,
                              target.name, error)
                    queue.mark_failed_attempt(self.db, job, error, self.f, final=True)
                if result.untried:
                    queue.release_jobs(self.db, [job.id for job in result.untried])
                if result.done:
                    log.info("forwarded %d instance(s) to %s", len(result.done), target.name)
                    if target.storage_commitment:
                        done = set(result.done)
                        self._request_commitment(connection, [
                            commitment.Owed(job.id, job.sop_class, job.sop_instance, 0)
                            for job in jobs if job.id in done])
            # Commitment owed from before is asked for unless the destination just failed.
            if target.storage_commitment and (not jobs or connection.is_open):
                owed = commitment.claim(self.db, target.device_id, self.f.batch_size, self.f)
                if owed:
                    log.info("asking %s again to commit %d instance(s)", target.name,
                             len(owed))
                    self._request_commitment(connection, owed)
            if not target.heartbeat:
                with connection.lock:
                    connection.close()
        except SQLAlchemyError as exc:
            log.error("forwarding to %s: queue unavailable: %s", target.name, exc)
        except Exception:
            log.exception("forwarding to %s failed", target.name)
        finally:
            with self._lock:
                self._busy.discard(id(connection))
                if not connection.is_open:
                    # Closed (no heartbeat, or dropped): it no longer counts against limits.
                    mine = self._connections.get(target.device_id, [])
                    if connection in mine:
                        mine.remove(connection)
            self._wake.set()  # more may be due for this device

    def _record(self, target: Target, jobs: list[queue.Job], result: Result) -> None:
        """One activity row per study of the batch: sent, failed, and why."""
        if self.activity is None:
            return
        done = set(result.done)
        failures = [*result.retry, *result.failed]
        untried = {job.id for job in result.untried}
        for study in dict.fromkeys(job.study_instance_uid for job in jobs):
            mine = [job for job in jobs if job.study_instance_uid == study]
            sent = sum(1 for job in mine if job.id in done)
            errors = Counter(error for job, error in failures if job.study_instance_uid == study)
            failed = sum(errors.values())
            waiting = sum(1 for job in mine if job.id in untried)
            summary = [f"{n} x {error}" if n > 1 else error for error, n in errors.items()]
            if waiting:
                summary.append(f"{waiting} not tried (connection lost), queued again")
            self.activity.record(Event(
                "forward", calling_ae=target.calling_ae, called_ae=target.ae_title,
                peer=target.name, study_instance_uid=study, count=sent, failed=failed,
                outcome="ok" if not failed and not waiting else "warning" if sent else "failed",
                detail="; ".join(summary)))

    def _request_commitment(self, connection: Connection, owed: list[commitment.Owed]
                            ) -> None:
        transaction = generate_uid()
        commitment.begin(self.db, [o.id for o in owed], transaction)
        refused = connection.request_commitment(
            transaction, [(o.sop_class, o.sop_instance) for o in owed])
        if refused is not None:
            log.error("storage commitment from %s not requested (%d instance(s)): %s",
                      connection.target.name, len(owed), refused[1])
        commitment.record(self.db, owed, transaction, refused, self.f)

    def _on_report(self, event: evt.Event) -> tuple[int, Dataset | None]:
        return on_report(self.db, event)

    # Heartbeat ----------------------------------------------------------------------------
    def _heartbeat_loop(self) -> None:
        tick = min(self.f.heartbeat_interval, self.f.heartbeat_idle_seconds, 5.0)
        while not self._stop.wait(tick):
            with self._lock:
                idle = [c for cs in self._connections.values() for c in cs
                        if id(c) not in self._busy]
            for connection in idle:
                connection.keepalive(self.f.heartbeat_interval, self.f.heartbeat_idle_seconds)
            with self._lock:
                for device_id, connections in self._connections.items():
                    self._connections[device_id] = [
                        c for c in connections if c.is_open or id(c) in self._busy]

    def open_connections(self) -> dict[int, int]:
        """Open associations per device (for status displays and tests)."""
        with self._lock:
            return {device_id: sum(1 for c in cs if c.is_open)
                    for device_id, cs in self._connections.items()}
