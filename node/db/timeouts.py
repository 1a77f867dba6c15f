"""Bounded waits on the database: a stalled database never stalls a thread of the node for
longer than the node's database timeout.

A live PostgreSQL server ends what it cannot finish in time itself (statement_timeout,
lock_timeout, given to every connection). A server that does not run at all (SIGSTOP, a hung
host) answers nothing, not even a cancel request, while its kernel goes on acknowledging what
is sent, so neither TCP keepalives nor tcp_user_timeout fire. Only the client can end that
wait: every psycopg wait (statement, fetch, commit, the pool's ping) is given the time left,
and a connection whose wait expired is closed, since its state is unknown; SQLAlchemy sees a
closed connection as a disconnect and drops it (and the pool's other connections, which the
next checkout's ping renews).

The time left is the connection's own limit, or less inside `deadline()` (a write
transaction, an admission look-up), or none inside `unlimited()` (migrations).
"""

from __future__ import annotations

import contextlib
import logging
import math
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import psycopg

from node.internals.psycopg_wait import BoundedWaitConnection

log = logging.getLogger(__name__)

_local = threading.local()
_MIN_CONNECT_SECONDS = 2  # psycopg's (libpq's) shortest connect_timeout


@contextlib.contextmanager
def deadline(seconds: float | None) -> Iterator[None]:
    """Everything this thread asks of the database in the block ends within `seconds`
    (None: no deadline of its own; an enclosing, earlier deadline still holds)."""
    outer = getattr(_local, "deadline", None)
    if seconds is None:
        yield
        return
    at = time.monotonic() + seconds
    _local.deadline = at if outer is None else min(outer, at)
    try:
        yield
    finally:
        _local.deadline = outer


@contextlib.contextmanager
def unlimited() -> Iterator[None]:
    """No client-side limit in the block (a migration may take its time)."""
    outer = getattr(_local, "unlimited", False)
    _local.unlimited = True
    try:
        yield
    finally:
        _local.unlimited = outer


def time_left(limit: float | None) -> float | None:
    """How long this thread may wait for one database operation whose own limit is `limit`
    (None: no limit): the deadline's remainder when that is shorter."""
    if getattr(_local, "unlimited", False):
        return None
    at = getattr(_local, "deadline", None)
    if at is None:
        return limit
    left = at - time.monotonic()
    return left if limit is None else min(limit, left)


class DatabaseTimeout(psycopg.OperationalError):
    """The server did not answer in time; the connection was closed."""


class Health:
    """Whether the database answers, as seen by this process: set down by a wait that
    expired or a connection that failed, up again by the next operation that succeeds (a
    probe tries one every second while it is down). Admission uses it to answer from what it
    remembers rather than wait for a database known not to answer."""

    def __init__(self, probe: Callable[[], None], interval: float = 1.0) -> None:
        self.down = False
        self._probe = probe
        self._interval = interval
        self._lock = threading.Lock()
        self._since = 0.0
        self._prober: threading.Thread | None = None

    def failed(self, why: str) -> None:
        with self._lock:
            if self.down:
                return
            self.down = True
            self._since = time.monotonic()
            if self._prober is None or not self._prober.is_alive():
                self._prober = threading.Thread(target=self._probing, name="database-probe",
                                                daemon=True)
                self._prober.start()
        log.error("the index database does not answer (%s): stores and queries fail until it"
                  " does; associations are admitted from the devices last looked up", why)

    def succeeded(self) -> None:
        with self._lock:
            if not self.down:
                return
            self.down = False
            since = self._since
        log.warning("the index database answers again (after %.1f s)", time.monotonic() - since)

    def _probing(self) -> None:
        while self.down:
            time.sleep(self._interval)
            if not self.down:
                return
            try:
                self._probe()
            except Exception as exc:  # the next try will tell
                log.debug("database probe failed: %s", exc)
            else:
                self.succeeded()


class TimedConnection(BoundedWaitConnection):
    """A psycopg connection whose every wait is bounded (see the module's docstring)."""

    limit: float | None = None  # seconds one operation may take; None: no limit
    health: Health | None = None

    def wait_limit(self) -> float | None:
        return time_left(self.limit)

    def wait_expired(self, timeout: float) -> None:
        why = f"no answer within {timeout:.3g} s"
        if self.health is not None:
            self.health.failed(why)
        raise DatabaseTimeout(f"the database server gave {why}") from None

    def wait_succeeded(self) -> None:
        if self.health is not None and self.health.down:
            self.health.succeeded()


def connect_args(query: dict[str, Any], connect_timeout: float, limit: float | None,
                 application_name: str = "pacsnode") -> dict[str, Any]:
    """psycopg connection parameters that bound every wait on the server's side too.

    `query`: the database URL's own parameters (an `options` there is kept, ours after it)."""
    args: dict[str, Any] = {
        "connect_timeout": max(2, math.ceil(connect_timeout)),
        "application_name": query.get("application_name", application_name),
        # A dead host or network (not a stopped server) is found by the kernel: keepalives on
        # idle connections, and unacknowledged data given up after the limit.
        "keepalives": 1, "keepalives_idle": 30, "keepalives_interval": 10,
        "keepalives_count": 3,
    }
    if limit is not None:
        ms = max(1, int(limit * 1000))
        server = (f"-c statement_timeout={ms} -c lock_timeout={ms}"
                  # A client that holds a transaction open without using it (a process
                  # stopped in the middle) releases its locks; generous, since a C-FIND
                  # keeps its transaction while the peer takes its answers.
                  f" -c idle_in_transaction_session_timeout={max(ms * 6, 60_000)}")
        own = query.get("options")
        args["options"] = f"{own} {server}" if own else server
        args["tcp_user_timeout"] = ms
    return args


def connector(connect_timeout: float, limit: float | None, health: Health
              ) -> Callable[..., TimedConnection]:
    """SQLAlchemy's do_connect: a TimedConnection, given no more than the time left."""

    def connect(cargs: tuple[Any, ...], cparams: dict[str, Any]) -> TimedConnection:
        # Connecting is one operation: within the limit, and what is left of a deadline,
        # but never less than psycopg's minimum of 2 s. A connection normally takes a few
        # ms, so a short deadline (admission's) still tries, unless the server was just
        # found not answering (the pool's ping that expired, before it reconnects).
        left = time_left(limit)
        params = dict(cparams)
        if left is not None:
            if left < _MIN_CONNECT_SECONDS and health.down:
                raise DatabaseTimeout("the database server does not answer: not connecting"
                                      f" with {max(left, 0.0):.3g} s left")
            params["connect_timeout"] = max(_MIN_CONNECT_SECONDS,
                                            min(math.ceil(connect_timeout), int(left)))
        try:
            conn = TimedConnection.connect(*cargs, **params)
        except psycopg.OperationalError as exc:
            health.failed(f"cannot connect: {str(exc).strip().splitlines()[0]}"
                          if str(exc).strip() else "cannot connect")
            raise
        conn.limit = limit
        conn.health = health
        return conn

    return connect
