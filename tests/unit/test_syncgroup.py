"""SyncGroup: one sync covers every change made before it began; none is skipped."""

from __future__ import annotations

import threading
import time

import pytest

from node.syncgroup import SyncGroup
from tests.conftest import wait_for


class HeldSyncs:
    """do_sync for the tests: records the changes made when each sync began; the first is
    held until released."""

    def __init__(self, group: SyncGroup) -> None:
        self.group = group
        self.began: list[int] = []
        self.first_started = threading.Event()
        self.release_first = threading.Event()
        self.fail_first = False

    def __call__(self) -> None:
        self.began.append(self.group._changes)
        if len(self.began) == 1:
            self.first_started.set()
            assert self.release_first.wait(10)
            if self.fail_first:
                raise OSError("disk gone")


def change_and_sync(group: SyncGroup, syncs: HeldSyncs, done: list[int],
                    errors: list[OSError]) -> None:
    change = group.changed()
    try:
        group.sync(change, syncs)
    except OSError as exc:
        errors.append(exc)
        return
    done.append(change)


def start(group: SyncGroup, syncs: HeldSyncs, done: list[int], errors: list[OSError]
          ) -> threading.Thread:
    thread = threading.Thread(target=change_and_sync, args=(group, syncs, done, errors))
    thread.start()
    return thread


@pytest.mark.parametrize("first_fails", [False, True])
def test_changes_made_during_a_sync_share_the_next_one(first_fails: bool) -> None:
    group = SyncGroup()
    syncs = HeldSyncs(group)
    syncs.fail_first = first_fails
    done: list[int] = []
    errors: list[OSError] = []
    threads = [start(group, syncs, done, errors)]
    assert syncs.first_started.wait(10)
    threads += [start(group, syncs, done, errors) for _ in range(3)]
    assert wait_for(lambda: group._changes == 4, 10)
    time.sleep(0.05)
    assert done == [] and errors == []  # nobody returns while its change is not synced
    syncs.release_first.set()
    for thread in threads:
        thread.join(10)
    # The held sync began with change 1 only; the next began after changes 2-4 and covered
    # them all, whether or not the first succeeded.
    assert syncs.began == [1, 4]
    if first_fails:
        assert [str(e) for e in errors] == ["disk gone"] and sorted(done) == [2, 3, 4]
    else:
        assert errors == [] and sorted(done) == [1, 2, 3, 4]


def test_a_change_already_covered_returns_without_a_sync() -> None:
    group = SyncGroup()
    calls: list[int] = []
    first, second = group.changed(), group.changed()
    group.sync(first, lambda: calls.append(1))  # covers both changes
    group.sync(second, lambda: calls.append(2))
    assert calls == [1]
    third = group.changed()
    group.sync(third, lambda: calls.append(3))
    assert calls == [1, 3]


def test_none_always_syncs() -> None:
    group = SyncGroup()
    calls: list[str] = []
    group.sync(group.changed(), lambda: calls.append("counted"))
    group.sync(None, lambda: calls.append("everything"))  # e.g. commits made elsewhere
    assert calls == ["counted", "everything"]
