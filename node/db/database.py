"""Engine and session handling for SQLite (embedded default) and PostgreSQL."""

from __future__ import annotations

import contextlib
import fcntl
import os
import threading
from collections.abc import Iterator
from typing import Any

from sqlalchemy import Connection, create_engine, event
from sqlalchemy.engine import Engine
from sqlalchemy.exc import ArgumentError
from sqlalchemy.orm import Session, sessionmaker

from node.syncgroup import SyncGroup

READ_ONLY = "pacsnode_read_only"  # execution option of the read sessions' engine


class Database:
    """One engine per node process, and the write discipline its backend needs.

    SQLite allows one writer at a time; writers queue on a thread lock and then on a file lock
    next to the database (`<file>.writer-lock`), shared by every process that opens it through
    this class: the node's association processes and the CLI. SQLite's own busy handler would
    also serialise them, but it polls, sleeping 1, 2, 5, 10... ms between tries, where a file
    lock wakes the next writer as soon as the last one commits.
    """

    def __init__(self, url: str) -> None:
        self.url = url
        self.is_sqlite = url.startswith("sqlite")
        kwargs: dict[str, Any] = {}
        if self.is_sqlite:
            kwargs["connect_args"] = {"check_same_thread": False, "timeout": 30}
        else:
            kwargs["pool_pre_ping"] = True
            kwargs["pool_size"] = 10
            kwargs["max_overflow"] = 20
        try:
            self.engine: Engine = create_engine(url, **kwargs)
        except ValueError as exc:  # e.g. a port that is not a number
            raise ArgumentError(f"the database URL is not valid: {exc}") from None
        if self.is_sqlite:
            event.listen(self.engine, "connect", _sqlite_on_connect)
            event.listen(self.engine, "begin", _sqlite_on_begin)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)
        # Reads begin DEFERRED on SQLite (see _sqlite_on_begin): a snapshot of the WAL, which
        # neither waits for a writer nor makes one wait.
        self._read_sessions = sessionmaker(self.engine.execution_options(**{READ_ONLY: True}),
                                           expire_on_commit=False)
        self._write_lock: threading.Lock | None = threading.Lock() if self.is_sqlite else None
        database = self.engine.url.database if self.is_sqlite else None
        self._lock_path = (f"{database}.writer-lock"
                           if database and database != ":memory:"
                           and not database.startswith("file:") else None)
        self._lock_fd: int | None = None
        self._wal_path = f"{database}-wal" if self._lock_path is not None else None
        self._wal_fd: int | None = None
        self._wal_lock = threading.Lock()
        self._wal_syncs = SyncGroup()  # commits are its changes
        self._writer: Connection | None = None  # SQLite: write()'s connection, under the lock

    @contextlib.contextmanager
    def session(self) -> Iterator[Session]:
        """A read session (no commit; on SQLite it takes no write lock, so it must not
        write)."""
        with self._read_sessions() as session:
            yield session

    @contextlib.contextmanager
    def _writing(self) -> Iterator[None]:
        """SQLite: hold the thread lock, then the file lock; other backends: nothing."""
        if self._write_lock is None:
            yield
            return
        with self._write_lock:
            if self._lock_path is None:
                yield
                return
            if self._lock_fd is None:
                self._lock_fd = os.open(self._lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC,
                                        0o600)
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(self._lock_fd, fcntl.LOCK_UN)

    @contextlib.contextmanager
    def transaction(self, *, durable: bool = True) -> Iterator[Session]:
        """A write transaction, committed on success and rolled back on error.

        `durable=False` for bookkeeping that may be lost to a power cut (a neighbour's
        last_seen, a sync cursor whose loss only means sending again): committed without
        waiting for the disk, and made durable by the next durable commit or checkpoint.
        """
        with self._writing():
            with self._sessions() as session, session.begin():
                yield session
            committed = self._wal_syncs.changed()
        if durable:
            self.make_durable(committed)

    @contextlib.contextmanager
    def write(self) -> Iterator[Connection]:
        """A write transaction on a Core connection (no ORM session: the ingest path)."""
        if self._write_lock is None:
            with self.engine.begin() as conn:
                yield conn
            return
        # SQLite has one writer at a time anyway: it keeps one connection rather than take
        # one from the pool and give it back (with its reset) for every instance.
        with self._writing():
            if self._writer is None or self._writer.invalidated or self._writer.closed:
                self._writer = self.engine.connect()
            with self._writer.begin():
                yield self._writer
            committed = self._wal_syncs.changed()
        self.make_durable(committed)

    def make_durable(self, commit: int | None = None) -> None:
        """Make what was committed so far (or up to `commit`, a number from the WAL's
        SyncGroup) survive a power loss: fdatasync SQLite's WAL.

        SQLite runs with synchronous=NORMAL, so a commit writes the WAL without waiting for
        the disk, under its write lock; the sync is done here, after the lock is released.
        A writer no longer waits for the one before it to reach the disk, and one sync
        covers every commit written before it began, from any thread or process. So the
        syncs are grouped: while one is under way, the writers that committed meanwhile
        wait for it to end, and then one sync covers them all instead of one each (each
        costs about 0.1 ms of CPU and 0.3 ms here). A checkpoint fsyncs the WAL before it
        copies it into the database and the database before the WAL is reused, so a commit
        already checkpointed is durable as well.
        """
        if self._wal_path is not None:
            self._wal_syncs.sync(commit, self._sync_wal)

    def _sync_wal(self) -> None:
        assert self._wal_path is not None
        with self._wal_lock:
            fd = self._wal_fd
            if fd is not None and os.fstat(fd).st_nlink == 0:
                os.close(fd)  # SQLite removed the WAL (its last connection closed)
                fd = self._wal_fd = None
            if fd is None:
                try:
                    fd = os.open(self._wal_path, os.O_RDONLY | os.O_CLOEXEC)
                except FileNotFoundError:
                    return  # nothing committed through a WAL (yet)
                # The WAL's directory entry must survive a power loss too.
                files_dir = os.open(os.path.dirname(self._wal_path) or ".",
                                    os.O_RDONLY | os.O_CLOEXEC)
                try:
                    os.fsync(files_dir)
                finally:
                    os.close(files_dir)
                self._wal_fd = fd
        os.fdatasync(fd)  # as SQLite itself syncs it: the WAL's size rarely changes

    def dispose(self) -> None:
        if self._write_lock is not None:
            with self._write_lock:
                if self._writer is not None:
                    self._writer.close()
                    self._writer = None
                if self._lock_fd is not None:
                    os.close(self._lock_fd)
                    self._lock_fd = None
            with self._wal_lock:
                if self._wal_fd is not None:
                    os.close(self._wal_fd)
                    self._wal_fd = None
        self.engine.dispose()


def _sqlite_on_connect(dbapi_connection: Any, _record: Any) -> None:
    # Let SQLAlchemy emit BEGIN itself (see _sqlite_on_begin) instead of pysqlite's implicit one.
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    # NORMAL: a commit does not fsync the WAL; Database.make_durable does, after the write
    # lock is released and before anything committed is acknowledged. Only connections made
    # by Database run with it.
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA busy_timeout=30000")
    # LIKE is case-sensitive on PostgreSQL; make SQLite agree, so case-insensitive matching is
    # always spelled upper(column) LIKE upper(pattern) and means the same on both.
    cursor.execute("PRAGMA case_sensitive_like=ON")
    cursor.close()


def _sqlite_on_begin(conn: Any) -> None:
    # A write transaction begins IMMEDIATE: it takes the write lock up front, so two writers
    # never deadlock on an upgrade. A read session's begins DEFERRED: with IMMEDIATE every
    # read (a C-FIND, a control-plane lookup) held the write lock for as long as it ran,
    # so writers of every process waited for it in SQLite's sleeping busy handler.
    # On the DBAPI connection: through SQLAlchemy's execution machinery (exec_driver_sql) it
    # cost more CPU than the empty transaction's other steps together.
    read = conn.get_execution_options().get(READ_ONLY, False)
    conn.connection.driver_connection.execute("BEGIN" if read else "BEGIN IMMEDIATE")
