"""A running node: database, storage, DICOM listeners; started and stopped as one."""

from __future__ import annotations

import logging
import os
import signal
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from types import FrameType
from typing import Protocol

from sqlalchemy import select

from node import permissions, replication, serving, tls
from node.activity import ActivityLog
from node.config import Settings
from node.db import migrate
from node.db.database import Database
from node.db.models import Partition
from node.forwarding.service import Forwarder
from node.notify import Notifier
from node.policy.admission import Limits
from node.policy.handshake import ConnectionLimits
from node.processes.supervisor import AssociationProcesses
from node.processes.tuning import tune_process
from node.redact import redact_url
from node.scp.gate import Connections
from node.scp.registry import AssociationRegistry
from node.scp.server import DicomServer
from node.storage import deletion, files, reconcile, storagelock
from node.storage.monitor import StorageMonitor
from node.storage.space import StorageGuard

log = logging.getLogger(__name__)


def open_database(settings: Settings, *, serving: bool = False) -> Database:
    """The node's database, migrated to the current schema; `serving`: with the node's
    database timeout (a command's waits are a person's, who may press Ctrl-C)."""
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    db = Database(settings.database_url,
                  connect_timeout=settings.node.database_connect_timeout,
                  timeout=settings.node.database_timeout if serving else None)
    migrate.upgrade(db.engine)
    db.make_durable()  # alembic commits on its own connection, outside Database's writes
    # Read first: every CLI command opens the database, and a write transaction would take
    # SQLite's write lock each time for a value that rarely changes.
    with db.session() as session:
        current = replication.node_id(session)
    if current != settings.node_id:
        with db.transaction() as session:
            replication.set_node_id(session, settings.node_id)
    return db


def ensure_bootstrap_partition(db: Database, settings: Settings) -> None:
    """First start: a node with no partition gets the default one, accepting any device."""
    with db.transaction() as session:
        if session.scalar(select(Partition.id).limit(1)) is not None:
            return
        b = settings.bootstrap_partition
        session.add(Partition(ae_title=b.ae_title, port=b.port, tls_port=b.tls_port,
                              folder=b.folder, description=b.description,
                              accept_any_device=True))
        log.info("created partition %s on port %d, TLS port %d", b.ae_title, b.port,
                 b.tls_port)


class Extension(Protocol):
    """A service started with the node and stopped before it (the hierarchy's control plane)."""

    def start(self, node: Node) -> None: ...

    def stop(self) -> None: ...


class Node:
    def __init__(self, settings: Settings, extensions: Sequence[Extension] = ()) -> None:
        self.settings = settings
        self.db: Database | None = None
        self.server: DicomServer | None = None
        self.processes: AssociationProcesses | None = None
        self.forwarder: Forwarder | None = None
        self.guard: StorageGuard | None = None
        self.monitor: StorageMonitor | None = None
        self.notifier: Notifier | None = None
        self.activity: ActivityLog | None = None
        self.extensions = list(extensions)
        self._started: list[Extension] = []
        self._stopped = threading.Event()
        self._storage_lock: int | None = None  # storagelock.acquire's, held until stopped

    def start(self) -> None:
        settings = self.settings
        # Before anything is created: whatever umask the node inherited, nothing it makes is
        # world-writable.
        permissions.tighten_umask()
        permissions.warn_about_key_files(settings)
        # Certificates that cannot be loaded stop the start, not the first TLS association.
        tls.server_context(settings)
        tls.client_context(settings)
        self.db = open_database(settings, serving=True)
        ensure_bootstrap_partition(self.db, settings)
        storage = settings.storage_dir
        files.ensure_dir(storage / files.INCOMING)
        # Before the start-up check: no process of an earlier node may still be storing.
        self._storage_lock = storagelock.acquire(
            storage, settings.node.shutdown_grace_seconds + 30.0)
        deletion.recover(self.db, storage)
        # After an interrupted delete has put its files back (so no indexed file looks missing),
        # before the sweep: the temporary files a crash left name the instances that may have
        # been placed but not indexed.
        reconcile.reconcile(self.db, storage)
        swept = files.sweep_incoming(storage)
        if swept:
            log.warning("removed %d incomplete temporary file(s) from %s", swept,
                        storage / files.INCOMING)
        self.guard = StorageGuard(storage, settings.storage.critical_watermark)
        serving.prepare_process(storage)
        self.activity = ActivityLog(self.db, settings.storage.activity_log)
        self.activity.start()
        self.forwarder = Forwarder(self.db, settings, storage, owner=settings.node.name,
                                   activity=self.activity)
        d = settings.dicom
        registry = AssociationRegistry(
            Limits(d.maximum_associations, d.max_associations_per_device))
        connections = Connections(ConnectionLimits(d.max_connections_per_address,
                                                   d.max_handshakes))
        if d.processes() > 1:
            self.processes = AssociationProcesses(settings, registry, self.forwarder.wake,
                                                  d.processes() - 1,
                                                  inherit=(self._storage_lock,),
                                                  connections=connections)
        self.server = serving.dicom_server(
            settings, self.db, self.activity, guard=self.guard, on_queued=self.forwarder.wake,
            admissions=registry, dispatcher=self.processes, connections=connections)
        if self.processes is not None:
            # Before the listeners open, so the first connections are spread too.
            self.processes.start()
        self.server.start()
        self.forwarder.start()
        self.notifier = Notifier(settings.notify, settings.node.name)
        self.notifier.start()
        self.monitor = StorageMonitor(self.db, settings, storage, self.guard,
                                      getattr(self, "activity", None), self.notifier)
        self.monitor.start()
        for extension in self.extensions:
            extension.start(self)
            self._started.append(extension)
        log.info("node %s ready: database %s, storage %s", settings.node.name,
                 redact_url(settings.database_url), storage)

    def stop(self) -> None:
        started = time.monotonic()
        while self._started:
            self._started.pop().stop()
        if self.monitor is not None:
            self.monitor.stop()
            self.monitor = None
        if self.notifier is not None:
            self.notifier.stop()
            self.notifier = None
        if self.forwarder is not None:
            self.forwarder.stop()
            self.forwarder = None
            log.info("forwarding stopped (%.1f s)", time.monotonic() - started)
        grace = self.settings.node.shutdown_grace_seconds
        if self.processes is not None:
            # They finish their associations while this process finishes its own.
            self.processes.request_stop(grace)
        if self.server is not None:
            self.server.stop(grace)
            self.server = None
        if self.processes is not None:
            self.processes.join(grace + 15.0)
            self.processes = None
            log.info("DICOM listeners and associations stopped (%.1f s)",
                     time.monotonic() - started)
        if self.activity is not None:
            # Last: the server and forwarder record until they have stopped.
            self.activity.stop()
            self.activity = None
        if self.db is not None:
            self.db.dispose()
            self.db = None
        if self._storage_lock is not None:
            storagelock.release(self._storage_lock)
            self._storage_lock = None
        if self.settings.storage_dir / files.INCOMING == Path(tempfile.tempdir or "/"):
            # Process-wide: leave no pointer to a folder that may go away with this node
            # (several nodes share a process in tests and the benchmarks).
            tempfile.tempdir = None
        self._stopped.set()

    def run_until_signalled(self) -> None:
        """Serve until SIGINT or SIGTERM, then stop cleanly."""
        stop_requested = threading.Event()

        def request_stop(signum: int, _frame: FrameType | None) -> None:
            if stop_requested.is_set():
                # A second Ctrl-C/SIGTERM: the administrator will not wait. Nothing
                # acknowledged is lost (it is on disk and indexed); temporary files are swept
                # at the next start.
                log.warning("received %s again, exiting now", signal.Signals(signum).name)
                os._exit(1)
            log.info("received %s, stopping", signal.Signals(signum).name)
            stop_requested.set()

        previous = {s: signal.signal(s, request_stop) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            self.start()
            tune_process()
            # A timeout, not a bare wait: a signal the kernel delivers to another thread (gRPC's
            # and pynetdicom's threads do not block it) sets Python's flag but does not wake
            # this thread's lock wait, and the handler would only run at the next bytecode.
            while not stop_requested.wait(0.5):
                pass
        finally:
            self.stop()
            for sig, handler in previous.items():
                signal.signal(sig, handler)
