"""Group sync: one fsync made durable for every change that was made before it began.

Every acknowledged C-STORE waits for the index's WAL to be synced after its commit, and the
associations of one process often commit within one sync's time. An fsync covers every change
made to the file before the call, so while one is under way the threads that made changes
meanwhile wait for it to end, and then one of them syncs for all. A change is numbered when it
is made (`changed`); `sync` returns once a sync that began after that change has ended,
making one itself if none did. (Grouping the series directories' fsyncs the same way was
measured too, and lost: 64x64 over 4 associations, 773-937 -> 687-904 img/s.)
"""

from __future__ import annotations

import threading
from collections.abc import Callable


class SyncGroup:
    """The changes to one file (the WAL) and the syncs that cover them."""

    def __init__(self) -> None:
        self._lock = threading.Condition()
        self._changes = 0  # changes numbered so far
        self._synced = 0  # every change up to this number is durable
        self._syncing = False

    def changed(self) -> int:
        """Number a change just made (it must be complete: written, linked, committed)."""
        with self._lock:
            self._changes += 1
            return self._changes

    def sync(self, change: int | None, do_sync: Callable[[], None]) -> None:
        """Return once `change` (a number from `changed`; None: every change so far, counted
        or not) is durable, calling `do_sync` unless a sync under way or just ended covers it.
        An error of `do_sync` is raised to the thread that called it; the waiting threads then
        try again themselves."""
        with self._lock:
            while self._syncing:
                self._lock.wait()
            if change is not None and self._synced >= change:
                return
            self._syncing = True
            covered = self._changes
        synced = False
        try:
            do_sync()
            synced = True
        finally:
            with self._lock:
                self._syncing = False
                if synced:
                    self._synced = max(self._synced, covered)
                self._lock.notify_all()
