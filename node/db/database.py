"""Engine and session handling for SQLite (embedded default) and PostgreSQL."""

from __future__ import annotations

import contextlib
import fcntl
import os
import sqlite3
import threading
from collections.abc import Iterator
from typing import Any

import psycopg
from sqlalchemy import Connection, create_engine, event
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.exc import ArgumentError, DBAPIError, OperationalError, SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from node.config import NodeSettings
from node.db import timeouts
from node.syncgroup import SyncGroup

READ_ONLY = "pacsnode_read_only"  # execution option of the read sessions' engine
_BUSY_MS = "pacsnode_busy_ms"  # a SQLite connection's busy timeout (its pool record's info)
_UNLIMITED_BUSY_SECONDS = 30.0  # SQLite's busy timeout without a database timeout (the CLI)


class DatabaseTimeout(SQLAlchemyError):
    """A write could not begin in time: another writer held the database that long."""


class CommitUncertain(SQLAlchemyError):
    """The connection was lost while the server committed: the transaction may or may not
    have been committed (PostgreSQL: a server that stopped answering during COMMIT)."""


def unavailable(exc: BaseException) -> bool:
    """The database did not answer in time, was locked or could not be reached: trying again
    later may succeed (unlike a statement it refuses)."""
    if isinstance(exc, (DatabaseTimeout, CommitUncertain)):
        return True
    if not isinstance(exc, DBAPIError):
        return False
    if exc.connection_invalidated:
        return True
    orig = exc.orig
    if isinstance(orig, psycopg.Error):
        # Connection failures and timeouts, statement_timeout and lock_timeout included.
        return isinstance(orig, psycopg.OperationalError)
    return "locked" in str(orig) or "busy" in str(orig)


class Database:
    """One engine per node process, and the write discipline its backend needs.

    SQLite allows one writer at a time; writers queue on a thread lock and then on a file lock
    next to the database (`<file>.writer-lock`), shared by every process that opens it through
    this class: the node's association processes and the CLI. SQLite's own busy handler would
    also serialise them, but it polls, sleeping 1, 2, 5, 10... ms between tries, where a file
    lock wakes the next writer as soon as the last one commits.
    """

    def __init__(self, url: str, *,
                 connect_timeout: float = NodeSettings.database_connect_timeout,
                 timeout: float | None = None) -> None:
        """`timeout`: the longest one operation or write transaction may wait (a serving
        node's node.database_timeout); None: no limit of the node's own (the CLI: a person
        waits, and may press Ctrl-C), SQLite's busy timeout 30 s."""
        self.url = url
        self.is_sqlite = url.startswith("sqlite")
        self.timeout = timeout
        self.health: timeouts.Health | None = None
        kwargs: dict[str, Any] = {}
        busy = timeout if timeout is not None else _UNLIMITED_BUSY_SECONDS
        if self.is_sqlite:
            kwargs["connect_args"] = {"check_same_thread": False, "timeout": busy}
        else:
            kwargs["pool_pre_ping"] = True
            kwargs["pool_size"] = 10
            kwargs["max_overflow"] = 20
            kwargs["pool_timeout"] = busy
            try:
                query = dict(make_url(url).query)
            except (ArgumentError, ValueError):  # (create_engine below says what is wrong)
                query = {}
            kwargs["connect_args"] = timeouts.connect_args(query, connect_timeout, timeout)
        try:
            self.engine: Engine = create_engine(url, **kwargs)
        except ValueError as exc:  # e.g. a port that is not a number
            raise ArgumentError(f"the database URL is not valid: {exc}") from None
        if self.is_sqlite:
            busy_ms = int(busy * 1000)

            def on_connect(dbapi_connection: Any, record: Any) -> None:
                _sqlite_on_connect(dbapi_connection, record, busy_ms)

            event.listen(self.engine, "connect", on_connect)
            event.listen(self.engine, "begin", _sqlite_on_begin)
        elif self.engine.dialect.driver == "psycopg":
            self.health = timeouts.Health(self._probe)
            connect = timeouts.connector(connect_timeout, timeout, self.health)
            event.listen(self.engine, "do_connect",
                         lambda _dialect, _record, cargs, cparams: connect(cargs, cparams))
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

    def _probe(self) -> None:
        """One round trip on a new connection (Health's probe while the server is down)."""
        with timeouts.deadline(self.timeout), self.engine.connect() as conn:
            conn.exec_driver_sql("SELECT 1")

    def answering(self) -> bool:
        """False while this process has found the database not answering (PostgreSQL),
        until an operation succeeds again."""
        return self.health is None or not self.health.down

    def deadline(self, seconds: float | None) -> contextlib.AbstractContextManager[None]:
        """What this thread asks of the database in the block ends within `seconds`."""
        return timeouts.deadline(seconds)

    @contextlib.contextmanager
    def session(self) -> Iterator[Session]:
        """A read session (no commit; on SQLite it takes no write lock, so it must not
        write)."""
        with self._read_sessions() as session:
            yield session

    @contextlib.contextmanager
    def _writing(self) -> Iterator[None]:
        """SQLite: hold the thread lock, then the file lock; other backends: nothing.

        With a timeout, the thread lock is waited for until the transaction's deadline. The
        file lock is waited for without one: whoever holds it is a writer of this class whose
        own wait for SQLite's lock ends at its deadline (_sqlite_on_begin), an earlier one."""
        if self._write_lock is None:
            yield
            return
        left = timeouts.time_left(None)
        if not self._write_lock.acquire(timeout=-1 if left is None else max(left, 0.0)):
            raise DatabaseTimeout(f"another writer held the database for {left:.3g} s")
        with contextlib.ExitStack() as held:
            held.callback(self._write_lock.release)
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
        """A write transaction, committed on success and rolled back on error; with a
        timeout, it ends (DatabaseTimeout, or the driver's error) within it.

        `durable=False` for bookkeeping that may be lost to a power cut (a neighbour's
        last_seen, a sync cursor whose loss only means sending again): committed without
        waiting for the disk, and made durable by the next durable commit or checkpoint.
        """
        with timeouts.deadline(self.timeout), self._writing():
            with self._sessions() as session, session.begin():
                yield session
            committed = self._wal_syncs.changed()
        if durable:
            self.make_durable(committed)

    @contextlib.contextmanager
    def write(self) -> Iterator[Connection]:
        """A write transaction on a Core connection (no ORM session: the ingest path); with
        a timeout, it ends within it. A commit whose outcome cannot be known (the server
        stopped answering during it) raises CommitUncertain."""
        if self._write_lock is None:
            with timeouts.deadline(self.timeout), self.engine.connect() as conn:
                transaction = conn.begin()
                try:
                    yield conn
                except BaseException:
                    with contextlib.suppress(SQLAlchemyError):
                        transaction.rollback()
                    raise
                try:
                    transaction.commit()
                except DBAPIError as exc:
                    if exc.connection_invalidated:
                        raise CommitUncertain(str(exc.orig)) from exc
                    raise
            return
        # SQLite has one writer at a time anyway: it keeps one connection rather than take
        # one from the pool and give it back (with its reset) for every instance.
        with timeouts.deadline(self.timeout), self._writing():
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


def _sqlite_on_connect(dbapi_connection: Any, record: Any, busy_ms: int) -> None:
    # Let SQLAlchemy emit BEGIN itself (see _sqlite_on_begin) instead of pysqlite's implicit one.
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    # NORMAL: a commit does not fsync the WAL; Database.make_durable does, after the write
    # lock is released and before anything committed is acknowledged. Only connections made
    # by Database run with it.
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute(f"PRAGMA busy_timeout={busy_ms}")
    record.info[_BUSY_MS] = record.info["pacsnode_busy_default"] = busy_ms
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
    driver = conn.connection.driver_connection
    if not read:
        _bound_busy_wait(conn.connection.info, driver)
    statement = "BEGIN" if read else "BEGIN IMMEDIATE"
    try:
        driver.execute(statement)
    except sqlite3.Error as exc:
        # Raised here, in an event, it would reach the caller unwrapped: callers handle
        # SQLAlchemy's errors (a write that found the database locked past its deadline).
        raise OperationalError(statement, None, exc) from None


def _bound_busy_wait(info: dict[str, Any], driver: Any) -> None:
    """A writer that waited for the locks before it waits for SQLite's (another process
    holding the database) only for what is left of its deadline; the next one gets the
    whole timeout back. One PRAGMA, only when the wait changes by more than 10 ms."""
    default = info.get("pacsnode_busy_default")
    if default is None:
        return
    left = timeouts.time_left(None)
    wanted = default if left is None else max(0, min(default, int(left * 1000)))
    if abs(wanted - info[_BUSY_MS]) > 10:
        driver.execute(f"PRAGMA busy_timeout={wanted}")
        info[_BUSY_MS] = wanted
