"""Deferred directory fsyncs: one per directory and batch, the kept temporary files removed
only once their directory's fsync succeeded."""

from __future__ import annotations

import errno
import os
import time
from pathlib import Path

import pytest

from node.storage import files
from node.storage.dirsync import DirectorySyncs


def deferred(tmp_path: Path, directory: str, name: str) -> files.DeferredSync:
    """A file linked into `directory` from a kept temporary file, as a direct store leaves it."""
    incoming = tmp_path / ".incoming"
    incoming.mkdir(exist_ok=True)
    kept = incoming / name
    kept.write_bytes(b"data of " + name.encode())
    (tmp_path / directory).mkdir(exist_ok=True)
    os.link(kept, tmp_path / directory / f"{name}.dcm")
    return files.DeferredSync(tmp_path / directory, (kept,))


def test_a_batch_fsyncs_each_directory_once_then_removes_what_was_kept(
        tmp_path: Path, synced_directories: list[Path]) -> None:
    synced = synced_directories
    syncs = DirectorySyncs(delay=0.2)
    batch = [deferred(tmp_path, "a", "1"), deferred(tmp_path, "a", "2"),
             deferred(tmp_path, "b", "3"), deferred(tmp_path, "a", "4")]
    for each in batch:
        syncs.add(each)
    assert synced == []  # not before the batch's delay
    deadline = time.monotonic() + 5
    while any(kept.exists() for each in batch for kept in each.keep):
        assert time.monotonic() < deadline, synced
        time.sleep(0.01)
    assert synced == [tmp_path / "a", tmp_path / "b"]
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["1.dcm", "2.dcm", "4.dcm"]
    syncs.close()


def test_a_failed_fsync_keeps_the_temporary_files_of_that_directory_only(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
        ) -> None:
    original = files.fsync_dir

    def failing(path: Path) -> None:
        if path.name == "bad":
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        original(path)

    monkeypatch.setattr(files, "fsync_dir", failing)
    bad, good = deferred(tmp_path, "bad", "1"), deferred(tmp_path, "good", "2")
    syncs = DirectorySyncs(delay=30)
    syncs.add(bad)
    syncs.add(good)
    syncs.flush()
    assert bad.keep[0].exists() and not good.keep[0].exists()
    assert "could not make the entries of stored instances" in caplog.text
    syncs.close()


def test_close_makes_what_is_pending_durable_and_later_ones_at_once(
        tmp_path: Path, synced_directories: list[Path]) -> None:
    synced = synced_directories
    syncs = DirectorySyncs(delay=30)
    first = deferred(tmp_path, "a", "1")
    syncs.add(first)
    syncs.close()
    assert synced == [tmp_path / "a"] and not first.keep[0].exists()
    late = deferred(tmp_path, "b", "2")
    syncs.add(late)  # a store that outlived the server's grace period
    assert synced == [tmp_path / "a", tmp_path / "b"] and not late.keep[0].exists()


def test_an_instance_deleted_before_its_batch_is_not_an_error(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    gone = deferred(tmp_path, "gone", "1")
    for path in gone.directory.iterdir():
        path.unlink()
    gone.directory.rmdir()
    syncs = DirectorySyncs(delay=30)
    syncs.add(gone)
    syncs.flush()
    assert not gone.keep[0].exists()
    assert "could not" not in caplog.text
    syncs.close()


def test_the_sweep_syncs_before_it_removes_a_kept_copy_a_dead_process_left(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A process that died before its batch leaves temporary files still linked into the
    archive: the storage monitor's sweep makes the filesystem durable before removing them."""
    order: list[str] = []
    original_sync, original_remove = os.sync, files.remove_quietly
    monkeypatch.setattr(os, "sync", lambda: (order.append("sync"), original_sync())[1])
    monkeypatch.setattr(files, "remove_quietly",
                        lambda path: (order.append(path.name), original_remove(path))[1])
    left = deferred(tmp_path, "a", "kept")
    (tmp_path / ".incoming" / "partial").write_bytes(b"cut short")
    assert files.sweep_incoming(tmp_path, idle_seconds=None) == 2
    assert order[0] == "sync" and sorted(order[1:]) == ["kept", "partial"]
    assert (tmp_path / "a" / "kept.dcm").exists()

    order.clear()
    (tmp_path / ".incoming" / "partial").write_bytes(b"cut short")
    assert files.sweep_incoming(tmp_path, idle_seconds=None) == 1
    assert order == ["partial"]  # nothing linked elsewhere: no sync
    assert not left.keep[0].exists()
