"""Start-up check: remove the files a crash left placed but never indexed, and put back the
files of indexed instances whose directory entry a crash took.

A store links its temporary file into the archive and then commits the index row; a crash
between the two leaves a file no row points to. Its temporary file is still in `.incoming/`
(pynetdicom removes it only after the handler returns, and the store keeps it while it works),
so the temporary files name every instance that can have such an orphan. Checking only those
costs nothing at run time and nothing in proportion to the archive at start-up: no storage scan.

The direct receiver answers before the new link's directory is fsynced, and keeps the
temporary file until it is (files.DeferredSync); a power loss in between can leave an indexed
instance without its link. Its temporary file, fsynced and of the indexed size, is linked back.

Run after `deletion.recover` (a file an interrupted delete held aside is back, not missing)
and before `files.sweep_incoming`, which then removes the temporary files themselves.

While the node runs, a process can die the same way (an association process killed): the
storage monitor's sweep settles what the temporary files of a dead process name (`settle`)
before it removes them, and keeps those that name a file it cannot settle yet, so nothing is
lost track of until the next start-up check.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from pydicom import dcmread
from sqlalchemy import select

from node.db.database import Database
from node.db.models import Instance, Partition
from node.storage import files
from node.storage.paths import inside, instance_relpath

log = logging.getLogger(__name__)

_UID_TAGS = ["StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"]


@dataclass(frozen=True)
class Reconciled:
    """What the check found; paths are relative to the storage root."""

    temporary: int = 0  # temporary files examined
    unreadable: int = 0  # of those, without a SOP Instance UID (partial transfers, garbage)
    removed: list[str] = field(default_factory=list)  # orphan files removed
    restored: list[str] = field(default_factory=list)  # indexed files put back from .incoming
    missing: list[str] = field(default_factory=list)  # indexed, but the file is not there

    def __str__(self) -> str:
        return (f"{self.temporary} temporary file(s) examined ({self.unreadable} unreadable), "
                f"{len(self.removed)} unindexed file(s) removed, {len(self.restored)} indexed "
                f"file(s) restored, {len(self.missing)} indexed instance(s) without a file")


def reconcile(db: Database, root: Path) -> Reconciled:
    """Remove archive files of the instances named in `.incoming/` that no index row points
    to, and restore from there the missing files of those that are indexed.

    Must run while nothing stores (at start, before the listeners open): a store in progress
    has placed its file before committing its row and would look the same.
    """
    incoming = root / files.INCOMING
    temporary = unreadable = 0
    # (study, series, SOP instance) -> the temporary files holding it: a coerced copy names
    # the same instance as its original.
    instances: dict[tuple[str, str, str], list[Path]] = {}
    for entry in files.temporary_files(root):
        if not entry.is_file():
            continue
        temporary += 1
        uids = _read_uids(entry)
        if uids is None:
            unreadable += 1
        else:
            instances.setdefault(uids, []).append(entry)
    result = Reconciled(temporary, unreadable)
    if instances:
        with db.session() as session:
            partitions = [(pid, folder) for pid, folder in
                          session.execute(select(Partition.id, Partition.folder))]
        for uids, copies in sorted(instances.items()):
            _reconcile_one(db, root, partitions, uids, copies, result)
    if temporary:
        log.info("start-up check of %s: %s", incoming, result)
    for path in result.restored:
        log.warning("start-up check: %s was indexed but missing; restored from %s", path,
                    incoming)
    for path in result.missing:
        # Never expected (the file is fsynced before the row commits, and kept in .incoming
        # until its link is durable); reported, not repaired: only the sender has the data.
        log.error("start-up check: %s is indexed but missing from the storage", path)
    return result


def settle(db: Database, root: Path, stale: Sequence[files.Stale]) -> set[Path]:
    """The running node's sweep: remove the archive files that stale temporary files of dead
    processes placed and no index row points to; returns the temporary files to keep.

    Only a file that is a link of the dead process's own temporary file is removed: a store
    of the same instance may be placing its own meanwhile. Nothing is restored, since at run
    time an indexed file that is missing is a delete in progress. A temporary file is kept
    (the evidence for the start-up check) while an archive file it names is not indexed and
    cannot be removed yet: its process may still be storing, or the file is not its link.
    """
    keep: set[Path] = set()
    instances: dict[tuple[str, str, str], list[files.Stale]] = {}
    for each in stale:
        uids = _read_uids(each.path)
        if uids is not None:
            instances.setdefault(uids, []).append(each)
        elif each.linked:
            keep.add(each.path)  # placed somewhere, yet unreadable now: not ours to judge
    if not instances:
        return keep
    with db.session() as session:
        partitions = [(pid, folder) for pid, folder in
                      session.execute(select(Partition.id, Partition.folder))]
    for uids, copies in instances.items():
        if not _settle_one(db, root, partitions, uids, copies):
            keep.update(each.path for each in copies)
    return keep


def _settle_one(db: Database, root: Path, partitions: list[tuple[int, str]],
                uids: tuple[str, str, str], copies: list[files.Stale]) -> bool:
    """False when an unindexed archive file of this instance must wait (see `settle`)."""
    placed = []
    for relpath in _candidates(partitions, uids):
        try:
            placed.append((relpath, (root / relpath).stat()))
        except OSError:
            continue
    if not placed:
        return True
    # Read after the files were seen: a store indexes only after its file is in place.
    indexed = _indexed(db, partitions, uids[2])
    writers_gone = all(files.writer_gone(each.path) for each in copies)
    ours = {(each.status.st_dev, each.status.st_ino) for each in copies}
    settled = True
    for relpath, seen in placed:
        if relpath in indexed:
            continue
        if writers_gone and (seen.st_dev, seen.st_ino) in ours \
                and files.remove_if_unchanged(root / relpath, seen):
            log.warning("removed %s: placed by a store whose process ended before indexing it",
                        relpath)
            continue
        settled = False
    return settled


def _candidates(partitions: list[tuple[int, str]], uids: tuple[str, str, str]) -> list[str]:
    """Where each partition would keep this instance."""
    study, series, sop = uids
    candidates: list[str] = []
    for _, folder in partitions:
        try:
            candidates.append(instance_relpath(folder, study, series, sop))
        except ValueError:
            continue  # not valid UIDs: the store refused it before placing anything
    return candidates


def _indexed(db: Database, partitions: list[tuple[int, str]], sop: str) -> dict[str, int]:
    """Path -> size of this SOP instance's rows in any partition: a row of another partition,
    or one whose partition's folder was renamed since, keeps the file it points to."""
    with db.session() as session:
        return {path: size for path, size in session.execute(
            select(Instance.path, Instance.size).where(
                Instance.partition_id.in_([pid for pid, _ in partitions]),
                Instance.sop_instance_uid == sop))}


def _read_uids(path: Path) -> tuple[str, str, str] | None:
    try:
        ds = dcmread(path, stop_before_pixels=True, specific_tags=_UID_TAGS, force=True)
        uids = tuple(str(ds.get(keyword, "")) for keyword in _UID_TAGS)
    except Exception:  # whatever a truncated or hostile file raises: it cannot stop the start
        return None
    study, series, sop = uids
    # A non-patient object has no Study and Series UIDs (paths.instance_relpath).
    return (study, series, sop) if sop else None


def _reconcile_one(db: Database, root: Path, partitions: list[tuple[int, str]],
                   uids: tuple[str, str, str], copies: list[Path], result: Reconciled) -> None:
    candidates = _candidates(partitions, uids)
    if not candidates:
        return
    indexed = _indexed(db, partitions, uids[2])
    for path, size in sorted(indexed.items()):
        if (root / path).exists():
            continue
        copy = _copy_of(copies, size)
        if copy is None:
            result.missing.append(path)
        else:
            files.replace_keeping_source(copy, inside(root, path))
            result.restored.append(path)
    for relpath in candidates:
        final = root / relpath
        series_dir = final.parent
        if not series_dir.is_dir():
            continue
        changed = False
        if relpath not in indexed and final.exists():
            files.remove_quietly(final)
            result.removed.append(relpath)
            changed = True
        # What a crash inside files.replace_keeping_source or the copy fallback of
        # files.place_new leaves beside the final name.
        for leftover in [*series_dir.glob(f".{final.name}.*.restore"),
                         *series_dir.glob(f".{final.name}.*.partial"),
                         *series_dir.glob(f".{final.name}.*.orphan")]:
            if leftover.suffix == ".orphan" and relpath in indexed and not final.exists():
                # files.remove_if_unchanged had moved a store's file aside, to put it back.
                files.replace(leftover, final)
                result.restored.append(relpath)
                continue
            files.remove_quietly(leftover)
            result.removed.append(str(leftover.relative_to(root)))
            changed = True
        # Empty series/study folders of the orphan, or of a crash inside files.ensure_dir.
        _prune(series_dir, stop=root / relpath.split("/", 1)[0])
        if changed and series_dir.is_dir():
            # Durable before the sweep removes the temporary file that names this instance.
            files.fsync_dir(series_dir)


def _copy_of(copies: list[Path], size: int) -> Path | None:
    """The temporary file an indexed instance of `size` bytes was placed from: its coerced
    copy if there is one of that size (what a store with coercion rules indexes)."""
    fits = [copy for copy in copies if _size(copy) == size]
    return max(fits, key=lambda copy: copy.name.endswith(".coerced"), default=None)


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return -1


def _prune(directory: Path, stop: Path) -> None:
    """Remove `directory` and its parents up to (not including) `stop` while they are empty."""
    while directory != stop:
        try:
            directory.rmdir()
        except OSError:
            return  # not empty (other instances), or gone
        with contextlib.suppress(OSError):
            files.fsync_dir(directory.parent)
        directory = directory.parent
