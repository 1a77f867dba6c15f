"""One node's processes at a time on a storage: the lock a node holds from before its start-up
check until its last process has exited.

The start-up check (storage/reconcile.py) and the sweep of `.incoming` take every temporary
file there for a crash's leftover. That holds only while no process of an earlier node still
stores: an association process whose main process was killed finishes the instance in hand
before it stops, and a node restarted at once would remove, or undo the placing of, what that
process is about to acknowledge. So the main process takes an exclusive `flock` on
`.incoming/.node.lock` before the check, and its association processes inherit the open lock
(one open file description): the kernel releases it when the last of them exits, however it
ends. A node that finds it held waits, saying so, and gives up with an error naming the
storage when it stays held (another node runs on it).
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import time
from pathlib import Path

from node.storage import files

log = logging.getLogger(__name__)

LOCK_NAME = ".node.lock"  # a dot name: never a transfer's temporary file (files.temporary)


class StorageInUse(OSError):
    """Another node's processes hold the storage; the message says which storage."""


def acquire(storage_root: Path, wait_seconds: float) -> int:
    """The open, locked lock file's descriptor (to close at the node's end, and to pass to
    its association processes); waits up to `wait_seconds` for earlier holders to exit."""
    incoming = storage_root / files.INCOMING
    files.ensure_dir(incoming)
    path = incoming / LOCK_NAME
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    deadline = time.monotonic() + wait_seconds
    waited = False
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if time.monotonic() >= deadline:
                holder = _holder(fd)
                os.close(fd)
                raise StorageInUse(
                    f"the storage {storage_root} is in use by another node's processes"
                    f"{f' (pid {holder})' if holder else ''}: stop that node, or give this "
                    "one a storage of its own") from None
            if not waited:
                log.warning("the storage %s is still held by the processes of an earlier node "
                            "(pid %s); waiting up to %.0f s for them to finish", storage_root,
                            _holder(fd) or "?", wait_seconds)
                waited = True
            time.sleep(0.1)
            continue
        except BaseException:
            os.close(fd)
            raise
        if waited:
            log.info("the earlier node's processes have finished; starting")
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        return fd


def release(fd: int) -> None:
    with contextlib.suppress(OSError):
        os.close(fd)


def _holder(fd: int) -> str:
    """The pid the holding node wrote, if any."""
    with contextlib.suppress(OSError, ValueError):
        return str(int(os.pread(fd, 32, 0).decode().strip()))
    return ""
