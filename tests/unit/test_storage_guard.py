"""The storage guard on this machine's real filesystem: suspend, resume, refuse one instance."""

from __future__ import annotations

from pathlib import Path

from node.storage.space import StorageGuard, Usage, measure


def guard_at(tmp_path: Path, critical: float) -> tuple[StorageGuard, list[bool]]:
    (tmp_path / "PART").mkdir()
    guard = StorageGuard(tmp_path, critical)
    changes: list[bool] = []
    guard.on_change.append(lambda _dev, suspended, _usage, _path: changes.append(suspended))
    return guard, changes


def test_suspended_at_the_critical_watermark_and_resumed_below_it(tmp_path: Path) -> None:
    used = measure(tmp_path).percent_used
    guard, changes = guard_at(tmp_path, critical=used / 2)
    admitted, why = guard.admit("PART", 100)
    assert not admitted and why.startswith("storage suspended")
    assert list(guard.suspended().values()) == [tmp_path / "PART"]
    guard.critical = 100.0  # as if space had been freed
    assert guard.admit("PART", 100) == (True, "")
    assert guard.suspended() == {}
    assert changes == [True, False]  # one notification each way, not one per store


def test_an_instance_that_would_cross_the_mark_is_refused_alone(tmp_path: Path) -> None:
    usage = measure(tmp_path)
    room = int(usage.total * 0.001)
    guard, changes = guard_at(tmp_path, critical=Usage(usage.total, usage.available - room)
                              .percent_used)
    admitted, why = guard.admit("PART", 4 * room)
    assert not admitted and why.startswith("out of disk space")
    assert guard.admit("PART", 1)[0]
    assert changes == []  # not suspended: smaller instances still fit


def test_refresh_groups_partition_folders_by_filesystem(tmp_path: Path) -> None:
    guard, _ = guard_at(tmp_path, critical=100.0)
    (tmp_path / "OTHER").mkdir()
    measured = guard.refresh(["PART", "OTHER", "NOT_CREATED_YET"])
    [(device, (_path, usage, suspended))] = measured.items()  # one filesystem here
    assert sorted(guard.folders_on(device)) == ["NOT_CREATED_YET", "OTHER", "PART"]
    assert usage.total > 0 and not suspended
