"""Which studies auto-purge takes: stops at the low watermark, never protected or un-forwarded."""

from __future__ import annotations

import pytest

from node.policy.purge import SCAN_LIMIT, Candidate, choose
from node.storage.space import Usage, bytes_above, is_critical

MB = 1_000_000


def study(n: int, size: int = 100, *, instances: int = 2, archived: int | None = None,
          open_jobs: int = 0) -> Candidate:
    return Candidate(n, f"1.2.{n}", 1, size, instances,
                     instances if archived is None else archived, open_jobs)


def test_takes_oldest_first_and_stops_once_enough_is_freed() -> None:
    batch = choose([study(i) for i in range(10)], bytes_needed=250, batch_size=10,
                   studies_held=10, protected=0)
    # 3 studies of 100 bytes cover 250: a fourth would go below the low watermark.
    assert [c.study_pk for c in batch.studies] == [0, 1, 2]
    assert batch.bytes == 300 and batch.reason == ""


def test_never_takes_a_study_not_stored_elsewhere() -> None:
    unsafe = [study(0, archived=0),  # never forwarded
              study(1, archived=1),  # one of two instances forwarded
              study(2, open_jobs=1),  # forwarded, but a job is still pending
              study(3, instances=0, archived=0)]  # no instances: nothing to count
    batch = choose([*unsafe, study(4), study(5)], bytes_needed=10_000, batch_size=10,
                   studies_held=6, protected=0)
    assert [c.study_pk for c in batch.studies] == [4, 5]
    assert batch.reason == "no more studies stored elsewhere"


def test_never_leaves_fewer_than_the_protected_studies() -> None:
    batch = choose([study(i) for i in range(10)], bytes_needed=10_000, batch_size=10,
                   studies_held=10, protected=7)
    assert [c.study_pk for c in batch.studies] == [0, 1, 2]
    assert "7 studies are protected" in batch.reason
    nothing = choose([study(i) for i in range(3)], bytes_needed=10_000, batch_size=10,
                     studies_held=3, protected=3)
    assert nothing.studies == [] and "protected" in nothing.reason


def test_a_batch_is_at_most_the_batch_size() -> None:
    batch = choose([study(i) for i in range(10)], bytes_needed=10_000, batch_size=4,
                   studies_held=10, protected=0)
    # A full batch that did not free enough yet is not a reason to stop: the next one follows.
    assert len(batch.studies) == 4 and batch.reason == ""


def test_nothing_needed_takes_nothing() -> None:
    assert choose([study(0)], bytes_needed=0, batch_size=10, studies_held=1,
                  protected=0).studies == []


def test_a_scan_without_any_purgeable_study_ends() -> None:
    endless = (study(i, archived=0) for i in range(SCAN_LIMIT + 50))
    batch = choose(endless, bytes_needed=10, batch_size=10, studies_held=10**6, protected=0)
    assert batch.studies == [] and str(SCAN_LIMIT) in batch.reason


def test_bytes_above_a_watermark() -> None:
    usage = Usage(total=100 * MB, available=15 * MB)  # 85% used
    assert usage.percent_used == pytest.approx(85.0)
    assert bytes_above(usage, 80.0) == 5 * MB
    assert bytes_above(usage, 90.0) == 0
    assert is_critical(usage, 85.0) and not is_critical(usage, 85.1)
    assert is_critical(usage.after_writing(2 * MB), 86.0)
    assert Usage(0, 0).percent_used == 100.0  # nothing to write to counts as full
