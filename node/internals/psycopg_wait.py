"""A psycopg connection whose every wait can be bounded: psycopg's `Connection.wait` overridden,
its private `errors._WaitTimeout` caught (node/internals/README.md).

Each statement, fetch and commit waits through it; db/timeouts.py says why the waits are
bounded and how long they may take.
"""

from __future__ import annotations

from typing import Any

import psycopg


class BoundedWaitConnection(psycopg.Connection[Any]):
    """Each wait ends after `wait_limit()` seconds (None: psycopg's own unbounded wait); when
    one expires, the connection is closed (what was under way is in an unknown state, so it
    cannot be reused) and `wait_expired` raises."""

    def wait_limit(self) -> float | None:
        return None

    def wait_expired(self, timeout: float) -> None:
        """Called after a wait of `timeout` seconds expired and the connection was closed;
        must raise."""
        raise psycopg.OperationalError(f"no answer within {timeout:.3g} s")

    def wait_succeeded(self) -> None:
        """Called after each bounded wait that ended in time."""

    def wait(self, gen: Any, interval: float = 0.1, timeout: float | None = None) -> Any:
        if timeout is None:
            timeout = self.wait_limit()
        if timeout is None:
            return super().wait(gen, interval)
        try:
            result = super().wait(gen, interval, max(timeout, 0.0))
        except psycopg.errors._WaitTimeout:
            self.pgconn.finish()
            self.wait_expired(max(timeout, 0.0))
            raise  # (wait_expired raises; this only if an override forgets to)
        self.wait_succeeded()
        return result
