"""SQLite writes from several processes of one node: they queue on a file lock, and a commit
reaches the disk (its WAL fsynced) before the write returns."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from sqlalchemy import select, text

from node.db.database import Database
from node.db.models import Partition
from tests.conftest import wait_for


@pytest.fixture
def db(sqlite_db: Database) -> Database:
    return sqlite_db


@pytest.fixture
def synced(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The paths of the files fdatasync'ed from now on, in order (they are still synced)."""
    paths: list[str] = []
    real_fdatasync = os.fdatasync

    def recording_fdatasync(fd: int) -> None:
        paths.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fdatasync(fd)

    monkeypatch.setattr(os, "fdatasync", recording_fdatasync)
    return paths


def add_partition(db: Database, title: str) -> None:
    with db.transaction() as session:
        session.add(Partition(ae_title=title, port=104, folder=title))


def test_a_writer_waits_while_another_process_holds_the_write_lock(
        db: Database, tmp_path: Path) -> None:
    lock = tmp_path / "node.db.writer-lock"
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import fcntl, os, sys\n"
         f"fd = os.open({str(lock)!r}, os.O_RDWR | os.O_CREAT)\n"
         "fcntl.flock(fd, fcntl.LOCK_EX)\n"
         "print('held', flush=True)\n"
         "sys.stdin.read()\n"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "held\n"
        done = threading.Event()
        writer = threading.Thread(target=lambda: (add_partition(db, "WAITED"), done.set()))
        writer.start()
        assert not done.wait(0.5)  # queued behind the other process
        assert holder.stdin is not None
        holder.stdin.close()  # the other process ends, and its lock with it
        assert done.wait(10)
        writer.join()
    finally:
        holder.kill()
        holder.wait()
    with db.session() as session:
        assert session.scalar(select(Partition.ae_title)) == "WAITED"


def test_a_read_session_neither_waits_for_writers_nor_makes_them_wait(db: Database) -> None:
    """A C-FIND or a control-plane lookup reads in a session: on SQLite it must not hold the
    write lock while it runs (ingest in every process would wait for it)."""
    add_partition(db, "FIRST")
    done = threading.Event()
    with db.session() as session:
        assert session.scalars(select(Partition.ae_title)).all() == ["FIRST"]
        writer = threading.Thread(target=lambda: (add_partition(db, "SECOND"), done.set()))
        writer.start()
        assert done.wait(5), "the writer waited for the read session"
        # The session reads the snapshot it started with.
        assert session.scalars(select(Partition.ae_title)).all() == ["FIRST"]
    writer.join()
    with db.session() as session:
        assert sorted(session.scalars(select(Partition.ae_title))) == ["FIRST", "SECOND"]


def test_a_commit_is_on_disk_when_the_write_returns(
        db: Database, tmp_path: Path, synced: list[str]) -> None:
    for title in ("FIRST", "SECOND"):
        synced.clear()
        add_partition(db, title)
        # SQLite itself does not wait for the disk at commit (synchronous=NORMAL) ...
        with db.engine.connect() as connection:
            assert connection.execute(text("PRAGMA synchronous")).scalar() == 1
        # ... the write does, before it returns.
        assert str(tmp_path / "node.db-wal") in synced
    synced.clear()
    with db.write() as connection:
        connection.execute(text("UPDATE partitions SET description = 'x'"))
    assert synced == [str(tmp_path / "node.db-wal")]


def test_bookkeeping_is_committed_without_a_sync_and_the_next_durable_write_covers_it(
        db: Database, tmp_path: Path, synced: list[str]) -> None:
    """Heartbeats and sync cursors write with durable=False: an idle parent does not flush
    the disk for every child's heartbeat."""
    add_partition(db, "FIRST")  # the WAL exists and is open
    synced.clear()
    with db.transaction(durable=False) as session:
        session.add(Partition(ae_title="BOOKKEEPING", port=105, folder="b"))
    assert synced == []
    with db.engine.connect() as other:  # committed: another connection sees it
        assert other.execute(text("SELECT count(*) FROM partitions WHERE ae_title = "
                                  "'BOOKKEEPING'")).scalar() == 1
    add_partition(db, "DURABLE")
    assert synced == [str(tmp_path / "node.db-wal")]  # one sync, covering both commits


def test_writers_that_commit_during_a_sync_share_the_next_one(
        db: Database, monkeypatch: pytest.MonkeyPatch) -> None:
    """Group commit: while one WAL sync is under way, the writers that commit wait for it,
    then one sync covers them all; none returns before a sync that began after its commit."""
    add_partition(db, "FIRST")  # the WAL exists and is open
    syncs: list[int] = []  # commits made when each sync began
    commits = {"made": 0}
    first_sync_started, release_first = threading.Event(), threading.Event()
    real_fdatasync = os.fdatasync

    def slow_first_fdatasync(fd: int) -> None:
        syncs.append(commits["made"])
        if len(syncs) == 1:
            first_sync_started.set()
            assert release_first.wait(10)
        real_fdatasync(fd)

    monkeypatch.setattr(os, "fdatasync", slow_first_fdatasync)
    returned: dict[str, int] = {}

    def write(name: str) -> None:
        with db.write() as connection:
            connection.execute(text("UPDATE partitions SET description = :d"), {"d": name})
            commits["made"] += 1  # under the write lock: commits are numbered in order
            mine = commits["made"]
        returned[name] = mine

    first = threading.Thread(target=write, args=("first",))
    first.start()
    assert first_sync_started.wait(10)  # the first writer's sync is under way (and held)
    others = [threading.Thread(target=write, args=(name,)) for name in ("second", "third")]
    for thread in others:
        thread.start()
    assert wait_for(lambda: commits["made"] == 3, 10)  # both committed, both wait
    time.sleep(0.1)
    assert set(returned) == set()  # nobody returns before its commit is synced
    release_first.set()
    for thread in (first, *others):
        thread.join(10)
    assert set(returned) == {"first", "second", "third"}
    # The first sync covered commit 1; the next began after commits 2 and 3 and covered both.
    assert syncs == [1, 3]
