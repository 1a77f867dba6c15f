"""The database's time limits as decisions: what a thread may still wait, which errors mean
"try again later" (no database needed)."""

from __future__ import annotations

import sqlite3
import time

import psycopg
import pytest
from sqlalchemy.exc import IntegrityError, OperationalError

from node.db import timeouts
from node.db.database import CommitUncertain, DatabaseTimeout, unavailable


def test_time_left_is_the_limit_or_what_remains_of_a_deadline() -> None:
    assert timeouts.time_left(10.0) == 10.0
    assert timeouts.time_left(None) is None
    with timeouts.deadline(2.0):
        left = timeouts.time_left(10.0)
        assert left is not None and 1.5 < left <= 2.0
        with timeouts.deadline(60.0):  # an inner, later deadline does not extend it
            inner = timeouts.time_left(None)
            assert inner is not None and inner <= 2.0
        with timeouts.unlimited():  # a migration
            assert timeouts.time_left(10.0) is None
    assert timeouts.time_left(10.0) == 10.0


def test_a_passed_deadline_leaves_no_time() -> None:
    with timeouts.deadline(0.01):
        time.sleep(0.02)
        left = timeouts.time_left(10.0)
        assert left is not None and left < 0


@pytest.mark.parametrize("exc, expected", [
    (DatabaseTimeout("held"), True),
    (CommitUncertain("lost"), True),
    (OperationalError("BEGIN", None, sqlite3.OperationalError("database is locked")), True),
    (OperationalError("SELECT", None, psycopg.errors.QueryCanceled("statement timeout")), True),
    (OperationalError("SELECT", None, timeouts.DatabaseTimeout("no answer")), True),
    (OperationalError("INSERT", None, sqlite3.OperationalError("no such table: x")), False),
    (IntegrityError("INSERT", None, sqlite3.IntegrityError("UNIQUE")), False),
    (ValueError("not a database error"), False),
])
def test_which_errors_mean_the_database_is_unavailable(exc: BaseException,
                                                        expected: bool) -> None:
    assert unavailable(exc) is expected


def test_server_side_limits_keep_the_urls_own_options() -> None:
    args = timeouts.connect_args({"options": "-c search_path=x"}, 5.0, 10.0)
    assert args["connect_timeout"] == 5
    assert args["options"].startswith("-c search_path=x ")
    assert "statement_timeout=10000" in args["options"]
    assert "lock_timeout=10000" in args["options"]
    assert "options" not in timeouts.connect_args({}, 0.5, None)  # the CLI: none
    assert timeouts.connect_args({}, 0.5, None)["connect_timeout"] == 2  # libpq's minimum
