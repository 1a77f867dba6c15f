"""What the sync loop pushes for changes it was just handed, without reading the database:
only when every neighbour already had everything before them."""

from __future__ import annotations

from hierarchy.plane import ControlPlane, Target
from node.config import Settings
from node.replication import Logged, Record


def record(name: str) -> Record:
    return Record(name, "origin", f"0000000000001.000000.{name}", False, "{}")


def plane_with(known: list[Target] | None, top: int) -> ControlPlane:
    plane = ControlPlane(Settings())
    plane._known, plane._top = known, top
    return plane


def test_what_was_just_received_goes_to_every_neighbour_but_its_sender() -> None:
    known = [Target("parent", "p:1", 7), Target("child", "c:1", 7)]
    plan = plane_with(known, 7)._plan([Logged(8, [record("A"), record("B")], "child"),
                                       Logged(10, [record("C")], "parent")])
    assert plan is not None
    top, targets, pushes = plan
    assert top == 10 and targets == known
    sent = {push.target.node_id: ([r.name for r in push.records], push.upto) for push in pushes}
    assert sent == {"parent": (["A", "B"], 10), "child": (["C"], 10)}


def test_the_database_is_read_when_the_fast_way_cannot_be_sure() -> None:
    known = [Target("child", "c:1", 7)]
    fresh = [Logged(8, [record("A")], "x")]
    assert plane_with(known, 7)._plan(fresh) is not None
    assert plane_with(None, 7)._plan(fresh) is None  # a neighbour registered, a push failed
    assert plane_with(known, 6)._plan(fresh) is None  # seq 7 came from elsewhere (the CLI)
    assert plane_with(known, 7)._plan([]) is None
    assert plane_with(known, 7)._plan([Logged(9, [record("B")], "x")]) is None  # a gap


def test_the_first_change_after_start_takes_the_fast_way_too() -> None:
    """Everyone had everything up to seq 0 (nothing): the first change needs no snapshot."""
    plan = plane_with([Target("child", "c:1", 0)], 0)._plan([Logged(1, [record("A")], "")])
    assert plan is not None
    assert [([r.name for r in p.records], p.upto) for p in plan[2]] == [(["A"], 1)]
