"""The activity log's pure parts and its recorder, against a real (SQLite) database."""

from __future__ import annotations

import dataclasses
import logging
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import event, select

from node import activity
from node.activity import ActivityLog, Event
from node.cli.activity import parse_time
from node.db import migrate
from node.db.database import Database
from node.db.models import Activity
from tests.conftest import wait_for

NOW = datetime(2026, 3, 10, 12, 0, 0, tzinfo=UTC)


@pytest.fixture
def db(sqlite_db: Database) -> Database:
    return sqlite_db


def rows(db: Database) -> list[Activity]:
    with db.session() as session:
        return list(session.scalars(select(Activity).order_by(Activity.id)))


# Time parsing --------------------------------------------------------------------------------
@pytest.mark.parametrize(("value", "expected"), [
    ("2h", NOW - timedelta(hours=2)),
    ("30m", NOW - timedelta(minutes=30)),
    ("15min", NOW - timedelta(minutes=15)),
    ("3d", NOW - timedelta(days=3)),
    (" 1W ", NOW - timedelta(weeks=1)),
    ("45s", NOW - timedelta(seconds=45)),
    ("2026-01-31", datetime(2026, 1, 31, tzinfo=UTC)),
    ("2026-01-31T08:00", datetime(2026, 1, 31, 8, 0, tzinfo=UTC)),
    ("2026-01-31 08:00:30", datetime(2026, 1, 31, 8, 0, 30, tzinfo=UTC)),
    ("2026-01-31T08:00+01:00", datetime(2026, 1, 31, 7, 0, tzinfo=UTC)),
    ("2026-01-31T08:00Z", datetime(2026, 1, 31, 8, 0, tzinfo=UTC)),
])
def test_parse_time_relative_and_iso(value: str, expected: datetime) -> None:
    assert parse_time(value, now=NOW, local=UTC) == expected


def test_parse_time_reads_a_naive_time_as_local_wall_clock() -> None:
    plus2 = timezone(timedelta(hours=2))
    assert parse_time("2026-01-31T08:00", now=NOW, local=plus2) == datetime(
        2026, 1, 31, 6, 0, tzinfo=UTC)
    # An explicit offset wins over the local zone.
    assert parse_time("2026-01-31T08:00+00:00", local=plus2) == datetime(
        2026, 1, 31, 8, 0, tzinfo=UTC)
    assert parse_time("2026-01-31", now=NOW).tzinfo is UTC


@pytest.mark.parametrize("value", ["garbage", "", "2x", "-2h", "h", "2026-13-01", "yesterday"])
def test_parse_time_refuses_other_text_naming_the_forms(value: str) -> None:
    with pytest.raises(ValueError, match="ISO date/time nor an age") as err:
        parse_time(value, now=NOW)
    assert "2h" in str(err.value)


# Event ---------------------------------------------------------------------------------------
def test_event_defaults_and_immutability() -> None:
    e = Event("store")
    assert (e.partition, e.calling_ae, e.called_ae, e.peer, e.study_instance_uid) == ("",) * 5
    assert (e.count, e.failed, e.outcome, e.detail, e.at) == (0, 0, "ok", "", None)
    with pytest.raises(dataclasses.FrozenInstanceError):
        e.count = 1  # type: ignore[misc]
    assert "store" in activity.KINDS and set(activity.OUTCOMES) == {"ok", "warning", "failed"}


# Recorder ------------------------------------------------------------------------------------
def test_record_buffers_and_flush_writes_them_in_bulk(db: Database) -> None:
    log = ActivityLog(db)
    statements: list[str] = []

    def count(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        if statement.lstrip().upper().startswith("INSERT"):
            statements.append(statement)

    event.listen(db.engine, "before_cursor_execute", count)
    before = datetime.now(UTC)
    for n in range(500):
        log.record(Event("store", partition="PACSNODE", calling_ae="CT1",
                         study_instance_uid=f"1.2.{n}", count=n))
    assert rows(db) == []  # nothing reaches the database before a flush
    assert log.flush() == 500
    assert log.flush() == 0
    event.remove(db.engine, "before_cursor_execute", count)
    written = rows(db)
    assert [r.count for r in written] == list(range(500))
    assert len(statements) == 1  # one bulk INSERT (executemany), not one per event
    # `at` is the time of record(), not of the flush.
    first = written[0].at.replace(tzinfo=UTC)
    assert before - timedelta(seconds=1) <= first <= datetime.now(UTC)
    assert (written[0].outcome, written[0].detail, written[0].failed) == ("ok", "", 0)


def test_explicit_time_and_oversized_values_are_kept_and_clipped(db: Database) -> None:
    log = ActivityLog(db)
    at = datetime(2025, 5, 1, 10, 0, tzinfo=UTC)
    log.record(Event("forward", peer="p" * 300, calling_ae="A" * 40,
                     study_instance_uid="1" * 90, detail="d" * 5000, at=at))
    assert log.flush() == 1
    [row] = rows(db)
    assert row.at.replace(tzinfo=UTC) == at
    assert (len(row.peer), len(row.calling_ae), len(row.study_instance_uid)) == (128, 16, 64)
    assert len(row.detail) == activity.DETAIL_MAX


def test_full_buffer_drops_counts_and_warns_once(db: Database,
                                                 caplog: pytest.LogCaptureFixture) -> None:
    log = ActivityLog(db, max_buffer=10)
    with caplog.at_level(logging.WARNING, logger="node.activity"):
        for n in range(25):
            log.record(Event("echo", count=n))
    assert log.dropped == 15
    assert sum("buffer full" in r.message for r in caplog.records) == 1
    assert log.flush() == 10
    assert [r.count for r in rows(db)] == list(range(10))  # the first ten were kept
    log.record(Event("echo", count=99))  # room again after the flush
    assert log.flush() == 1 and log.dropped == 15


def test_disabled_log_records_nothing(db: Database) -> None:
    log = ActivityLog(db, enabled=False)
    log.record(Event("store"))
    log.start()
    log.stop()
    assert log.flush() == 0
    assert rows(db) == []


def test_record_never_raises_on_bad_values(db: Database) -> None:
    log = ActivityLog(db)
    log.record(Event("store", count="many"))  # type: ignore[arg-type]
    log.record(Event("store", count=2))
    assert log.flush() == 1


def test_background_thread_flushes_and_survives_a_database_error(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    db = Database(f"sqlite:///{tmp_path / 'late.db'}")  # no schema yet: every write fails
    log = ActivityLog(db, flush_seconds=0.05)
    log.start()
    try:
        with caplog.at_level(logging.ERROR, logger="node.activity"):
            log.record(Event("store", count=1))
            assert wait_for(lambda: any("dropped" in r.message for r in caplog.records))
        migrate.upgrade(db.engine)
        log.record(Event("store", count=2))
        assert wait_for(lambda: [r.count for r in rows(db)] == [2])  # the thread lives on
        log.record(Event("store", count=3))
    finally:
        log.stop()  # writes what is left
    assert [r.count for r in rows(db)] == [2, 3]
    db.dispose()


def test_write_inserts_in_the_callers_transaction(db: Database) -> None:
    with db.transaction() as session:
        activity.write(session, [Event("delete", study_instance_uid="1.2.3", count=4),
                                 Event("restore", study_instance_uid="1.2.3")])
    assert [(r.kind, r.count) for r in rows(db)] == [("delete", 4), ("restore", 0)]


# Prune ---------------------------------------------------------------------------------------
def test_prune_deletes_in_chunks_and_zero_keeps_everything(
        db: Database, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(activity, "PRUNE_CHUNK", 100)
    deletes: list[str] = []

    def count(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        if statement.lstrip().upper().startswith("DELETE"):
            deletes.append(statement)

    with db.transaction() as session:
        activity.write(session, [Event("echo", at=NOW - timedelta(days=40, minutes=n))
                                 for n in range(250)])
        activity.write(session, [Event("echo", count=1, at=NOW - timedelta(days=29))])
    assert activity.prune(db, 0, now=NOW) == 0
    event.listen(db.engine, "before_cursor_execute", count)
    assert activity.prune(db, 30, now=NOW) == 250
    event.remove(db.engine, "before_cursor_execute", count)
    assert len(deletes) == 3  # 100 + 100 + 50
    assert [r.count for r in rows(db)] == [1]


# Query ---------------------------------------------------------------------------------------
@pytest.fixture
def filled(db: Database) -> Database:
    events = [
        Event("association", partition="PACSNODE", calling_ae="CT1", called_ae="PACSNODE",
              at=NOW - timedelta(minutes=50)),
        Event("store", partition="PACSNODE", calling_ae="CT1", called_ae="PACSNODE",
              study_instance_uid="1.1", count=3, at=NOW - timedelta(minutes=40)),
        Event("find", partition="PACSNODE", calling_ae="WS1", called_ae="PACSNODE",
              count=2, at=NOW - timedelta(minutes=30)),
        Event("move", partition="PACSNODE", calling_ae="WS1", called_ae="PACSNODE",
              study_instance_uid="1.1", count=3, failed=1, outcome="warning",
              at=NOW - timedelta(minutes=20)),
        Event("forward", calling_ae="PACSNODE", called_ae="ARCHIVE", peer="archive",
              study_instance_uid="1.2", count=5, at=NOW - timedelta(minutes=10)),
        Event("reject", called_ae="NOSUCH", calling_ae="CT9", outcome="failed",
              at=NOW - timedelta(minutes=5)),
    ]
    with db.transaction() as session:
        activity.write(session, events)
    return db


def kinds(db: Database, **filters: Any) -> list[str]:
    with db.session() as session:
        return [r.kind for r in activity.query(session, **filters)]


def test_query_filters_newest_first(filled: Database) -> None:
    assert kinds(filled) == ["reject", "forward", "move", "find", "store", "association"]
    assert kinds(filled, limit=2) == ["reject", "forward"]
    assert kinds(filled, kinds=["store", "move", "reject"]) == ["reject", "move", "store"]
    assert kinds(filled, kinds=["store", "move", "reject"], limit=2) == ["reject", "move"]
    assert kinds(filled, kinds=["find"]) == ["find"]
    assert kinds(filled, ae_title="WS1") == ["move", "find"]
    assert kinds(filled, ae_title="ARCHIVE") == ["forward"]
    assert kinds(filled, ae_title="PACSNODE") == ["forward", "move", "find", "store",
                                                  "association"]
    assert kinds(filled, study_instance_uid="1.1") == ["move", "store"]
    assert kinds(filled, outcome="failed") == ["reject"]
    assert kinds(filled, since=NOW - timedelta(minutes=25)) == ["reject", "forward", "move"]
    assert kinds(filled, since=NOW - timedelta(minutes=45),
                 until=NOW - timedelta(minutes=15)) == ["move", "find", "store"]
    assert kinds(filled, kinds=["store"], since=NOW - timedelta(minutes=35)) == []


def test_query_reads_through_indexes(filled: Database) -> None:
    """No statement of query() sorts the table: each reads an index in `at` order, or starts
    from the study UID index (and then sorts only that study's rows)."""
    statements: list[tuple[str, Any]] = []

    def capture(_conn: Any, _cursor: Any, statement: str, parameters: Any, *_args: Any
                ) -> None:
        if statement.lstrip().upper().startswith("SELECT"):
            statements.append((statement, parameters))

    cases: list[dict[str, Any]] = [
        {}, {"kinds": ["store"]}, {"kinds": ["store", "move"]},
        {"since": NOW - timedelta(days=1)}, {"ae_title": "WS1"}, {"outcome": "failed"},
        {"kinds": ["find"], "since": NOW - timedelta(days=1), "until": NOW},
        {"study_instance_uid": "1.1"},
    ]
    for filters in cases:
        statements.clear()
        event.listen(filled.engine, "before_cursor_execute", capture)
        try:
            kinds(filled, **filters)
        finally:
            event.remove(filled.engine, "before_cursor_execute", capture)
        assert statements
        with filled.engine.connect() as conn:
            for statement, parameters in statements:
                plan = " | ".join(row[-1] for row in conn.exec_driver_sql(
                    f"EXPLAIN QUERY PLAN {statement}", parameters))
                assert "USING INDEX" in plan or "USING COVERING INDEX" in plan, (filters, plan)
                if "study_instance_uid" not in filters:
                    assert "TEMP B-TREE" not in plan, (filters, plan)
                else:
                    assert "ix_activity_study_instance_uid" in plan, plan
