"""The hybrid logical clock that orders versions of hierarchy-wide device records."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from node.replication import format_version, next_version, parse_version


def test_versions_compare_as_text_in_time_order() -> None:
    assert format_version(999, 5, "zzz") < format_version(1000, 0, "aaa")
    assert format_version(1000, 9, "zzz") < format_version(1000, 10, "aaa")
    # Same instant and counter: the node id breaks the tie the same way everywhere.
    assert format_version(1000, 0, "a") < format_version(1000, 0, "b")
    assert parse_version(format_version(1795378603849, 7, "site.a-1")) == (
        1795378603849, 7, "site.a-1")


def test_an_edit_after_receiving_wins_even_with_a_slow_clock() -> None:
    received = format_version(2_000_000, 3, "fast-clock-node")
    mine = next_version(received, "slow", now_ms=1_000_000)  # this node's clock is behind
    assert mine > received
    assert parse_version(mine) == (2_000_000, 4, "slow")
    assert next_version(None, "n", now_ms=5) == format_version(5, 0, "n")
    assert parse_version(next_version(received, "n", now_ms=3_000_000)) == (3_000_000, 0, "n")


@given(st.lists(st.tuples(st.integers(0, 10**12), st.sampled_from(["a", "b", "c"])),
                min_size=1, max_size=30))
def test_each_tick_is_greater_than_everything_seen(ticks: list[tuple[int, str]]) -> None:
    latest = None
    for now_ms, node in ticks:
        version = next_version(latest, node, now_ms)
        assert latest is None or version > latest
        latest = version
