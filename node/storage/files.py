"""Durable file placement: an acknowledged instance is fsynced and renamed into place."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import re
import shutil
import stat
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

INCOMING = ".incoming"

_SYNC_FILE_RANGE_WRITE = 2


def _sync_file_range() -> Callable[[int, int, int, int], int] | None:
    if sys.platform != "linux":
        return None
    try:
        function = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    function.restype = ctypes.c_int
    return function


_start_writeback = _sync_file_range()


def start_writeback(fd: int, offset: int = 0, count: int = 0) -> None:
    """Start writing the file's dirty pages in [offset, offset + count) (0: to the end) to disk
    without waiting, so the fsync that makes the file durable later waits for less.

    Linux's sync_file_range (os does not offer it); elsewhere nothing. It promises nothing
    about durability: only the fsync does.
    """
    if _start_writeback is not None:
        _start_writeback(fd, offset, count, _SYNC_FILE_RANGE_WRITE)


@dataclass(frozen=True)
class ReceivedFile:
    """A received data set's temporary file, still open (`fd`, readable) and `size` bytes
    long: the store reads and fsyncs it through `fd`, where a path would cost an open, a
    stat and a close each time."""

    path: Path
    fd: int
    size: int


def path_of(file: Path | ReceivedFile) -> Path:
    return file.path if isinstance(file, ReceivedFile) else file


def fsync_file(file: Path | ReceivedFile) -> None:
    if isinstance(file, ReceivedFile):
        os.fsync(file.fd)
        return
    fd = os.open(file, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def ensure_dir(path: Path) -> None:
    """Create `path` and make each new directory entry durable in its parent."""
    missing: list[Path] = []
    current = path
    while not current.exists():
        missing.append(current)
        current = current.parent
    for directory in reversed(missing):
        with contextlib.suppress(FileExistsError):
            directory.mkdir(mode=0o755)
        fsync_dir(directory.parent)


def place_new(source: Path, target: Path, sync: bool = True) -> bool:
    """Durably put the already-fsynced `source` at `target` unless `target` exists.

    Returns False (and changes nothing) when `target` already exists. A hard link is an atomic
    create-if-absent, so two associations storing the same instance at once never overwrite
    each other; `source` is left for the caller (pynetdicom) to remove.

    `sync=False` leaves the new entry's fsync to the caller (a `DeferredSync`), who keeps
    `source` until then.
    """
    try:
        try:
            _link_new(source, target)
        except FileNotFoundError:
            # Tried first and the folder made only when missing: most stores go to a series
            # folder that exists, and checking for it cost a stat per store.
            ensure_dir(target.parent)
            _link_new(source, target)
    except FileExistsError:
        return False
    if sync:
        fsync_dir(target.parent)
    return True


def _link_new(source: Path, target: Path) -> None:
    try:
        os.link(source, target)
    except OSError as exc:
        if exc.errno not in (errno.EXDEV, errno.EPERM, errno.ENOTSUP):
            raise
        _copy_new(source, target)


@dataclass(frozen=True)
class DeferredSync:
    """A file linked into `directory` whose new entry is made durable after the store was
    answered, and the temporary files (`keep`) that hold its data until then.

    Acknowledging before the directory's fsync is safe because `keep` are fsynced files
    created in `.incoming`: the fsync of a new file makes its own name durable with it
    (ext4 with or without a journal, XFS, btrfs), and the start-up check (reconcile.py) puts
    an indexed instance whose file is missing back from a temporary file of the same size.
    """

    directory: Path
    keep: tuple[Path, ...]


def complete(deferred: list[DeferredSync]) -> list[tuple[Path, OSError]]:
    """fsync each directory once, then remove the temporary files kept for it; returns the
    directories whose fsync failed (their temporary files stay, for the start-up check)."""
    failed: dict[Path, OSError] = {}
    for directory in dict.fromkeys(each.directory for each in deferred):
        try:
            fsync_dir(directory)
        except FileNotFoundError:
            pass  # deleted meanwhile: nothing is left to make durable
        except OSError as exc:
            failed[directory] = exc
    for each in deferred:
        if each.directory not in failed:
            for path in each.keep:
                remove_quietly(path)
    return list(failed.items())


def _copy_new(source: Path, target: Path) -> None:
    """Fallback when the temporary file is on another filesystem: copy beside, fsync, link."""
    partial = target.with_name(f".{target.name}.{os.getpid()}.partial")
    try:
        with open(source, "rb") as src, open(partial, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
            dst.flush()
            os.fsync(dst.fileno())
        os.link(partial, target)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(partial)


def replace(source: Path, target: Path) -> None:
    """Durably put `source` at `target`, replacing an orphan left by an earlier crash."""
    ensure_dir(target.parent)
    os.replace(source, target)
    fsync_dir(target.parent)


def replace_keeping_source(source: Path, target: Path) -> None:
    """Like `replace`, but `source` stays where it is (a second link, or a copy)."""
    ensure_dir(target.parent)
    beside = target.with_name(f".{target.name}.{os.getpid()}.restore")
    try:
        os.link(source, beside)
    except OSError:
        shutil.copyfile(source, beside)
        fsync_file(beside)
    os.replace(beside, target)
    fsync_dir(target.parent)


def remove_if_unchanged(path: Path, seen: os.stat_result) -> bool:
    """Remove `path` if it is still the file `seen` describes; True if removed.

    A store may replace the file meanwhile (os.replace, inside its index transaction): the
    file is moved aside first and compared, so the store's file is put back, never removed.
    """
    aside = path.with_name(f".{path.name}.{os.getpid()}.orphan")
    try:
        os.rename(path, aside)
    except FileNotFoundError:
        return False
    moved = os.stat(aside)
    ours = (moved.st_dev, moved.st_ino) == (seen.st_dev, seen.st_ino)
    if not ours:
        with contextlib.suppress(FileExistsError):  # (a newer file took its place meanwhile)
            os.link(aside, path)
    os.unlink(aside)
    fsync_dir(path.parent)
    return ours


def same_file(a: Path, b: Path) -> bool:
    """Both names are links to one file (False if either is missing)."""
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def remove_quietly(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        path.unlink()


def temporary_files(storage_root: Path) -> list[Path]:
    """What `.incoming` holds of transfers, imports and coercions: every entry but the node's
    own, whose names begin with a dot (storagelock.LOCK_NAME)."""
    incoming = storage_root / INCOMING
    if not incoming.is_dir():
        return []
    return sorted(entry for entry in incoming.iterdir() if not entry.name.startswith("."))


def use_incoming_for_temporary_files(storage_root: Path) -> None:
    """Make this process's temporary files (pynetdicom streams each received data set to one)
    in `.incoming`, named after the process: on the storage filesystem, putting one into the
    archive is a link, not a copy; and the sweep can tell a dead writer's file (`writer_pid`)."""
    tempfile.tempdir = str(storage_root / INCOMING)
    tempfile.template = f"tmp{os.getpid()}-"


# Every writer of .incoming names its files after its process: the direct receiver
# (tmp<pid>-<n>.dcm), pynetdicom through tempfile.template, imports (import<pid>-<n>.dcm), and
# coerced copies (<name>.coerced).
_WRITER = re.compile(r"(?:tmp|import)(\d+)-")


def writer_pid(name: str) -> int | None:
    """The ID of the process that made a temporary file of this name (None: not known)."""
    match = _WRITER.match(name)
    return int(match.group(1)) if match else None


def writer_gone(path: Path) -> bool:
    """The process that made this temporary file has ended (False when not known): nothing
    can still be storing from it.

    A live process of the same ID counts as the writer, even one started later with a
    reused ID: telling them apart would compare its start with the file's time, and a step
    of the wall clock would make a live writer look gone. Its file is only kept longer.
    """
    pid = writer_pid(path.name)
    if pid is None or pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False  # a process of another user: not one of the node's
    return False  # alive, or a zombie not reaped yet


@dataclass(frozen=True)
class Stale:
    """A temporary file not written to for the sweep's idle time."""

    path: Path
    status: os.stat_result

    @property
    def linked(self) -> bool:
        """Linked into the archive as well (a store placed it)."""
        return self.status.st_nlink > 1


def sweep_incoming(storage_root: Path, idle_seconds: float | None = None,
                   settle: Callable[[list[Stale]], set[Path]] | None = None) -> int:
    """Remove temporary files a crash or an aborted transfer left; returns how many.

    `idle_seconds`: only files not written to for that long (a live transfer appends to its
    file with every PDU, so one idle longer than the network timeout has no live association).
    `settle`: given the stale files, deals with the archive files they name (a running node's
    orphans: reconcile.settle) and returns those to keep, the evidence of what it could not
    settle yet.
    """
    cutoff = time.time() - idle_seconds if idle_seconds is not None else None
    stale: list[Stale] = []
    for entry in temporary_files(storage_root):
        try:
            status = entry.stat()
        except FileNotFoundError:
            continue  # its store finished meanwhile
        if not stat.S_ISREG(status.st_mode) or (cutoff is not None and status.st_mtime > cutoff):
            continue
        stale.append(Stale(entry, status))
    if settle is not None and stale:
        kept = settle(stale)
        stale = [each for each in stale if each.path not in kept]
    if any(each.linked for each in stale):
        # Still linked into the archive: kept for a directory entry whose deferred fsync a
        # process that died never made (storage/dirsync.py). Make it durable first.
        os.sync()
    for each in stale:
        remove_quietly(each.path)
    return len(stale)
