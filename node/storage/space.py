"""Disk usage against the watermarks, and the storage guard the C-STORE path asks first.

Watermarks are percentages of a filesystem in use, as `df` shows them (space reserved for root
counts as used, since the node cannot write to it). Each filesystem that holds the storage root
or a partition's folder is measured on its own: a partition mounted on its own disk fills and is
suspended and purged on its own.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)


# Within this many percentage points of the critical watermark, every admission measures the
# disk (one statvfs, about 1.3 us): each association process has a guard of its own, blind to
# what the others admit, and they can write a few percent of a small disk within `max_age`.
NEAR_CRITICAL = 10.0


@dataclass(frozen=True)
class Usage:
    total: int  # bytes
    available: int  # bytes the node can still write
    block: int = 4096  # the filesystem's allocation unit

    @property
    def used(self) -> int:
        return self.total - self.available

    @property
    def percent_used(self) -> float:
        return 100.0 * self.used / self.total if self.total else 100.0

    def after_writing(self, nbytes: int) -> Usage:
        """What a file of `nbytes` leaves: whole blocks, and one more for its directory entry
        and inode (a disk of small files fills up to a quarter faster than their sizes)."""
        blocks = -(-nbytes // self.block) + 1
        return Usage(self.total, max(0, self.available - blocks * self.block), self.block)


def measure(path: Path) -> Usage:
    st = os.statvfs(path)
    return Usage(st.f_blocks * st.f_frsize, st.f_bavail * st.f_frsize, st.f_frsize or 4096)


def device_of(path: Path) -> int:
    """The filesystem a path is on; a folder not created yet is on its parent's."""
    while not path.exists() and path != path.parent:
        path = path.parent
    return os.stat(path).st_dev


def bytes_above(usage: Usage, watermark: float) -> int:
    """How many bytes must go for usage to be at or below `watermark` percent (0 if it is)."""
    allowed_used = int(usage.total * watermark / 100.0)
    return max(0, usage.used - allowed_used)


def is_critical(usage: Usage, critical: float) -> bool:
    return usage.percent_used >= critical


class StorageGuard:
    """Whether a partition's filesystem may take another instance.

    The guard keeps an estimate per filesystem (the last measurement minus what was admitted
    since), so the common case costs a subtraction under a lock. It measures again (one
    statvfs) when the estimate is older than `max_age` seconds (other programs write to the
    disk too), at every store within NEAR_CRITICAL points of the critical watermark (each
    association process has a guard of its own, which does not see what the others admit), and
    at every store while suspended (so storage resumes as soon as space is freed).
    """

    def __init__(self, storage_root: Path, critical: float, max_age: float = 1.0) -> None:
        self.root = storage_root
        self.critical = critical
        self.max_age = max_age
        self._measured_at: dict[int, float] = {}
        self._lock = threading.Lock()
        self._device_by_folder: dict[str, int] = {}
        self._estimate: dict[int, Usage] = {}
        self._path_of: dict[int, Path] = {}
        self._suspended: set[int] = set()
        # Called (under the guard's lock: do not block) when a filesystem is suspended/resumed.
        self.on_change: list[Callable[[int, bool, Usage, Path], None]] = []

    def folder_path(self, folder: str) -> Path:
        return self.root / folder

    def _device(self, folder: str) -> int:
        device = self._device_by_folder.get(folder)
        if device is None:
            path = self.folder_path(folder)
            device = device_of(path)
            self._device_by_folder[folder] = device
            self._path_of.setdefault(device, path if path.exists() else self.root)
        return device

    def admit(self, folder: str, nbytes: int) -> tuple[bool, str]:
        """(True, '') when `nbytes` may be stored in the partition folder `folder`."""
        with self._lock:
            device = self._device(folder)
            estimate = self._estimate.get(device)
            if (estimate is None or device in self._suspended
                    or time.monotonic() - self._measured_at.get(device, 0.0) > self.max_age
                    or estimate.after_writing(nbytes).percent_used
                    >= self.critical - NEAR_CRITICAL):
                estimate = self._measure_locked(device)
            after = estimate.after_writing(nbytes)
            suspended = is_critical(estimate, self.critical)
            self._set_suspended_locked(device, suspended, estimate)
            if suspended:
                return False, (f"storage suspended: disk {estimate.percent_used:.1f}% full "
                               f"(critical watermark {self.critical:g}%)")
            if is_critical(after, self.critical):
                # Only this instance is refused: a smaller one may still fit.
                return False, (f"out of disk space: {nbytes} bytes would take the disk past "
                               f"the critical watermark ({self.critical:g}%)")
            self._estimate[device] = after
            return True, ""

    def disk_full(self, folder: str) -> None:
        """A write failed with ENOSPC: measure now, so the next store is refused up front."""
        with self._lock:
            device = self._device(folder)
            usage = self._measure_locked(device)
            self._set_suspended_locked(device, True, usage)

    def refresh(self, folders: list[str]) -> dict[int, tuple[Path, Usage, bool]]:
        """Measure every filesystem holding the root or one of `folders` (the monitor's check)."""
        with self._lock:
            self._device_by_folder.clear()
            self._path_of = {device_of(self.root): self.root}
            for folder in folders:
                self._device(folder)
            result = {}
            for device in self._path_of:
                usage = self._measure_locked(device)
                self._set_suspended_locked(device, is_critical(usage, self.critical), usage)
                result[device] = (self._path_of[device], usage, device in self._suspended)
            return result

    def folders_on(self, device: int) -> list[str]:
        with self._lock:
            return [f for f, d in self._device_by_folder.items() if d == device]

    def suspended(self) -> dict[int, Path]:
        with self._lock:
            return {d: self._path_of.get(d, self.root) for d in self._suspended}

    def _measure_locked(self, device: int) -> Usage:
        usage = measure(self._path_of.get(device, self.root))
        self._estimate[device] = usage
        self._measured_at[device] = time.monotonic()
        return usage

    def _set_suspended_locked(self, device: int, suspended: bool, usage: Usage) -> None:
        if suspended == (device in self._suspended):
            return
        if suspended:
            self._suspended.add(device)
        else:
            self._suspended.discard(device)
        path = self._path_of.get(device, self.root)
        for callback in self.on_change:
            try:
                callback(device, suspended, usage, path)
            except Exception:
                log.exception("storage state callback failed")
