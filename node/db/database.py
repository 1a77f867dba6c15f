"""Engine and session handling for SQLite (embedded default) and PostgreSQL."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from typing import Any

from sqlalchemy import Connection, create_engine, event
from sqlalchemy.engine import Engine
from sqlalchemy.exc import ArgumentError
from sqlalchemy.orm import Session, sessionmaker


class Database:
    """One engine per node process, and the write discipline its backend needs.

    SQLite allows one writer at a time; the node's own writers queue on a process lock (so they
    never fail with "database is locked" between threads) and other processes, such as the CLI,
    wait on the busy timeout.
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
        self._write_lock: threading.Lock | None = threading.Lock() if self.is_sqlite else None
        self._writer: Connection | None = None  # SQLite: write()'s connection, under the lock

    @contextlib.contextmanager
    def session(self) -> Iterator[Session]:
        """A read session (no commit)."""
        with self._sessions() as session:
            yield session

    @contextlib.contextmanager
    def transaction(self) -> Iterator[Session]:
        """A write transaction, committed on success and rolled back on error."""
        lock = self._write_lock or contextlib.nullcontext()
        with lock, self._sessions() as session, session.begin():
            yield session

    @contextlib.contextmanager
    def write(self) -> Iterator[Connection]:
        """A write transaction on a Core connection (no ORM session: the ingest path)."""
        if self._write_lock is None:
            with self.engine.begin() as conn:
                yield conn
            return
        # SQLite has one writer at a time anyway: it keeps one connection rather than take
        # one from the pool and give it back (with its reset) for every instance.
        with self._write_lock:
            if self._writer is None or self._writer.invalidated or self._writer.closed:
                self._writer = self.engine.connect()
            with self._writer.begin():
                yield self._writer

    def dispose(self) -> None:
        if self._write_lock is not None:
            with self._write_lock:
                if self._writer is not None:
                    self._writer.close()
                    self._writer = None
        self.engine.dispose()


def _sqlite_on_connect(dbapi_connection: Any, _record: Any) -> None:
    # Let SQLAlchemy emit BEGIN itself (see _sqlite_on_begin) instead of pysqlite's implicit one.
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    # FULL: a commit is on disk before it returns; an acknowledged C-STORE must survive power loss.
    cursor.execute("PRAGMA synchronous=FULL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA busy_timeout=30000")
    # LIKE is case-sensitive on PostgreSQL; make SQLite agree, so case-insensitive matching is
    # always spelled upper(column) LIKE upper(pattern) and means the same on both.
    cursor.execute("PRAGMA case_sensitive_like=ON")
    cursor.close()


def _sqlite_on_begin(conn: Any) -> None:
    # IMMEDIATE takes the write lock up front, so two writers never deadlock on an upgrade.
    conn.exec_driver_sql("BEGIN IMMEDIATE")
