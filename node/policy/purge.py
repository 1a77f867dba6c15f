"""Which studies auto-purge deletes: a pure choice over candidates the index describes.

A study may be purged only when it is stored elsewhere: every instance reached an archive
device (storage.archive_device_types) and, where that device asks for storage commitment, was
committed there; and no forward job of the study is still waiting, sending or failed (purging
would take away what that destination has not got). Purged studies are not kept in the
deleted folder. The candidates come from storage/purge.py (the index's side).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

# A batch looks at most this many studies, oldest first: a filesystem full of studies not yet
# stored elsewhere must not cost a read of the whole index at every check.
SCAN_LIMIT = 10_000


@dataclass(frozen=True)
class Candidate:
    study_pk: int
    study_instance_uid: str
    partition_id: int
    size: int
    instances: int
    archived_instances: int  # instances stored (and committed where asked) on an archive
    open_jobs: int  # forward jobs pending, sending or failed

    @property
    def stored_elsewhere(self) -> bool:
        return self.instances > 0 and self.archived_instances >= self.instances \
            and self.open_jobs == 0


@dataclass(frozen=True)
class Batch:
    studies: list[Candidate]
    bytes: int
    reason: str  # why the batch is smaller than asked ('' when the target was met)


def choose(candidates: Iterable[Candidate], *, bytes_needed: int, batch_size: int,
           studies_held: int, protected: int) -> Batch:
    """Studies to delete now, in the candidates' (purge) order.

    Takes studies stored elsewhere until their size covers `bytes_needed` (so purging stops at
    the low watermark, not a batch later), at most `batch_size`, and never so many that fewer
    than `protected` studies would remain.
    """
    chosen: list[Candidate] = []
    freed = 0
    may_delete = max(0, studies_held - protected)
    if may_delete == 0:
        return Batch([], 0, f"only {studies_held} studies held, {protected} protected")
    for seen, candidate in enumerate(candidates, start=1):
        if freed >= bytes_needed or len(chosen) >= batch_size:
            break
        if seen > SCAN_LIMIT:
            return Batch(chosen, freed, f"none of the {SCAN_LIMIT} oldest studies left is"
                         " stored elsewhere" if not chosen else "")
        if len(chosen) >= may_delete:
            return Batch(chosen, freed, f"{protected} studies are protected")
        if candidate.stored_elsewhere:
            chosen.append(candidate)
            freed += candidate.size
    reason = ""
    if freed < bytes_needed and len(chosen) < batch_size:
        reason = "no more studies stored elsewhere"
    return Batch(chosen, freed, reason)
