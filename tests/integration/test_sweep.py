"""The running node's sweep of .incoming: what a dead process placed but never indexed is
removed with its temporary file; what a live one may still be storing is kept, with the
temporary file that names it (issue 25, item 4)."""

from __future__ import annotations

import functools
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from pydicom.dataset import Dataset

from node.db.database import Database
from node.storage import files, reconcile
from tests.dicomgen import make_instance
from tests.integration.test_reconcile import _index, _relpath, _storage, _temporary


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


@pytest.fixture
def live_pid() -> Iterator[int]:
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    yield child.pid
    child.kill()
    child.wait()


def _sweep(db: Database, root: Path) -> int:
    return files.sweep_incoming(root, idle_seconds=0,
                                settle=functools.partial(reconcile.settle, db, root))


def _placed(root: Path, folder: str, incoming: Path, ds: Dataset, pid: int) -> tuple[Path, Path]:
    """A store of process `pid` linked its temporary file into the archive."""
    temporary = _temporary(incoming, ds, f"tmp{pid}-7.dcm")
    final = root / _relpath(folder, ds)
    assert files.place_new(temporary, final)
    return temporary, final


def test_the_orphan_of_a_dead_process_goes_with_its_temporary_file(
        tmp_path: Path, new_db: Callable[[str], str]) -> None:
    with _storage(tmp_path, new_db("node")) as (db, root, _partition_id, folder, incoming):
        temporary, orphan = _placed(root, folder, incoming, make_instance(), _dead_pid())
        assert _sweep(db, root) == 1
        assert not orphan.exists() and not temporary.exists()
        assert not list(orphan.parent.glob(".*"))  # nothing left beside it


def test_an_indexed_file_of_a_dead_process_stays(
        tmp_path: Path, new_db: Callable[[str], str]) -> None:
    with _storage(tmp_path, new_db("node")) as (db, root, partition_id, folder, incoming):
        ds = make_instance()
        temporary, final = _placed(root, folder, incoming, ds, _dead_pid())
        _index(db, partition_id, ds, _relpath(folder, ds))
        assert _sweep(db, root) == 1
        assert final.exists() and not temporary.exists()


def test_a_live_process_may_still_be_indexing_what_it_placed(
        tmp_path: Path, new_db: Callable[[str], str], live_pid: int) -> None:
    with _storage(tmp_path, new_db("node")) as (db, root, partition_id, folder, incoming):
        ds = make_instance()
        temporary, final = _placed(root, folder, incoming, ds, live_pid)
        assert _sweep(db, root) == 0
        assert final.exists() and temporary.exists()  # the evidence is kept
        # Its store commits: the temporary file is of no more use.
        _index(db, partition_id, ds, _relpath(folder, ds))
        assert _sweep(db, root) == 1
        assert final.exists() and not temporary.exists()


def test_the_orphan_of_a_process_that_died_later_goes_at_the_next_sweep(
        tmp_path: Path, new_db: Callable[[str], str]) -> None:
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    with _storage(tmp_path, new_db("node")) as (db, root, _partition_id, folder, incoming):
        temporary, orphan = _placed(root, folder, incoming, make_instance(), child.pid)
        assert _sweep(db, root) == 0
        child.kill()
        child.wait()
        assert _sweep(db, root) == 1
        assert not orphan.exists() and not temporary.exists()


def test_another_stores_file_is_never_removed(
        tmp_path: Path, new_db: Callable[[str], str]) -> None:
    """A dead process's temporary file names an instance whose archive file is another
    store's, not indexed yet (that store has placed it and is about to commit)."""
    with _storage(tmp_path, new_db("node")) as (db, root, _partition_id, folder, incoming):
        ds = make_instance()
        temporary = _temporary(incoming, ds, f"tmp{_dead_pid()}-7.dcm")
        final = root / _relpath(folder, ds)
        assert files.place_new(_temporary(incoming, ds, f"tmp{os.getpid()}-8.dcm"), final)
        assert _sweep(db, root) == 0
        assert final.exists() and temporary.exists()


def test_remove_if_unchanged_puts_back_a_file_replaced_meanwhile(tmp_path: Path) -> None:
    path = tmp_path / "x.dcm"
    path.write_bytes(b"orphan")
    seen = path.stat()
    replacement = tmp_path / "y.dcm"
    replacement.write_bytes(b"the store's")
    os.replace(replacement, path)  # a store replaced the orphan after it was looked at
    assert not files.remove_if_unchanged(path, seen)
    assert path.read_bytes() == b"the store's"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.dcm"]
    assert files.remove_if_unchanged(path, path.stat())
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize(("name", "pid"), [
    ("tmp123-4.dcm", 123), ("tmp99-abcdefgh.dcm", 99), ("tmp99-abcdefgh.dcm.coerced", 99),
    ("import5-1.dcm", 5), ("tmpabcdefgh.dcm", None), ("x.dcm", None)])
def test_writer_pid(name: str, pid: int | None) -> None:
    assert files.writer_pid(name) == pid
