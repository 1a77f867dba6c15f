"""The directory fsyncs the direct receiver defers past its answers, made in batches.

A store answered by the direct receiver has its file and its index row on disk, but not yet
the new directory entry that links the file into its series folder; until that entry is
durable the fsynced temporary file is kept, for the start-up check to restore the link from
(files.DeferredSync). Those fsyncs are made here, on a thread of the process's own, one
batch at a time: the stores that arrived within `delay` of the batch's first one, from all
the process's associations, with one fsync per directory. A series' images go into one
directory, so that is one fsync for many stores instead of one each (each costs the guest
about 0.1 ms of CPU here), and none of it is on the path a peer waits on.
"""

from __future__ import annotations

import logging
import threading
import time

from node.affinity import unpin_current_thread
from node.storage import files

log = logging.getLogger(__name__)

# Long enough to gather a burst's stores of one series; far shorter than the storage
# monitor's idle time for temporary files (the network timeout plus a second), so it never
# sweeps a file kept here.
BATCH_DELAY = 0.25


class DirectorySyncs:
    """Deferred directory fsyncs of one process, made by a thread started on first use."""

    def __init__(self, delay: float = BATCH_DELAY) -> None:
        self.delay = delay
        self._pending: list[files.DeferredSync] = []
        self._first_at = 0.0  # when the oldest pending one was added
        self._closed = False
        self._changed = threading.Condition()
        self._thread: threading.Thread | None = None

    def add(self, deferred: files.DeferredSync) -> None:
        with self._changed:
            if self._closed:  # the server is stopping: this one is made at once
                self._complete([deferred])
                return
            self._pending.append(deferred)
            if len(self._pending) > 1:
                return  # the thread is waiting for this batch's delay already
            self._first_at = time.monotonic()
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="directory-syncs",
                                                daemon=True)
                self._thread.start()
            self._changed.notify()

    def flush(self) -> None:
        """Make everything added so far durable now, in the caller's thread."""
        with self._changed:
            batch, self._pending = self._pending, []
        self._complete(batch)

    def close(self) -> None:
        """Flush, and stop the thread (what is added later is made durable at once)."""
        with self._changed:
            self._closed = True
            self._changed.notify()
            thread = self._thread
        if thread is not None:
            thread.join()
        self.flush()

    def _run(self) -> None:
        # Started by the first store's thread, whose CPUs it inherited: that thread may be
        # kept on one CPU (affinity.py), this one need not be.
        unpin_current_thread()
        while True:
            with self._changed:
                while not self._pending and not self._closed:
                    self._changed.wait()
                if self._closed:
                    return
                wait = self._first_at + self.delay - time.monotonic()
                if wait > 0:
                    self._changed.wait(wait)  # closing wakes it early: close() flushes
                    continue
                batch, self._pending = self._pending, []
            self._complete(batch)

    @staticmethod
    def _complete(batch: list[files.DeferredSync]) -> None:
        for directory, exc in files.complete(batch):
            # Answered and indexed already: nothing to undo. The temporary files are left in
            # .incoming, where the start-up check would restore the links from them.
            log.error("could not make the entries of stored instances in %s durable: %s",
                      directory, exc)
