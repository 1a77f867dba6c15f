"""One node's processes at a time on a storage (storage/storagelock.py), with real files and
processes."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from node.storage import files, reconcile, storagelock


def test_a_second_node_on_the_storage_is_refused_naming_it(tmp_path: Path) -> None:
    held = storagelock.acquire(tmp_path, 1.0)
    try:
        started = time.monotonic()
        with pytest.raises(storagelock.StorageInUse, match=str(tmp_path)) as refused:
            storagelock.acquire(tmp_path, 0.5)
        assert 0.5 <= time.monotonic() - started < 3
        assert "another node's processes" in str(refused.value)
    finally:
        storagelock.release(held)
    storagelock.release(storagelock.acquire(tmp_path, 0.1))  # free again


def test_the_lock_lasts_while_a_process_that_inherited_it_lives(tmp_path: Path) -> None:
    """An association process keeps the node's lock after its main process is gone."""
    held = storagelock.acquire(tmp_path, 1.0)
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(1.5)"],
                             pass_fds=[held])
    storagelock.release(held)  # the main process goes; its child still holds the lock
    started = time.monotonic()
    again = storagelock.acquire(tmp_path, 10.0)
    waited = time.monotonic() - started
    storagelock.release(again)
    child.wait()
    assert 0.8 <= waited < 5, waited


def test_sweeps_and_the_start_up_check_leave_the_lock_alone(tmp_path: Path) -> None:
    held = storagelock.acquire(tmp_path, 1.0)
    try:
        lock = tmp_path / files.INCOMING / storagelock.LOCK_NAME
        leftover = tmp_path / files.INCOMING / "tmp123-1.dcm"
        leftover.write_bytes(b"partial")
        assert files.temporary_files(tmp_path) == [leftover]
        assert files.sweep_incoming(tmp_path, idle_seconds=0) == 1
        assert files.sweep_incoming(tmp_path) == 0
        assert lock.is_file()
        assert reconcile.reconcile(None, tmp_path).temporary == 0  # type: ignore[arg-type]
    finally:
        storagelock.release(held)
