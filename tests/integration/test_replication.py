"""Applying hierarchy-wide device records on a real database (SQLite and PostgreSQL):
last writer wins, no loops, tombstones, and convergence whatever the order of arrival."""

from __future__ import annotations

import itertools
import json
import random
from collections.abc import Iterator

import pytest
from sqlalchemy import select

from node import devices, replication
from node.db import migrate
from node.db.database import Database
from node.db.models import Device, DeviceChange, Partition
from node.partitions import AdminError
from node.replication import Record, format_version


@pytest.fixture
def make_db(new_db: object) -> Iterator[object]:
    opened: list[Database] = []

    def make(name: str) -> Database:
        db = Database(new_db(name))  # type: ignore[operator]
        migrate.upgrade(db.engine)
        with db.transaction() as session:
            replication.set_node_id(session, name)
        opened.append(db)
        return db

    yield make
    for db in opened:
        db.dispose()


def record(name: str, version: str, *, deleted: bool = False, port: int = 104,
           origin: str = "x") -> Record:
    payload = "" if deleted else json.dumps({"ae_title": name[:16], "host": "127.0.0.1",
                                             "port": port, "device_type": "VIEWER"})
    return Record(name, origin, version, deleted, payload)


def state(db: Database) -> tuple[list[Record], dict[str, int]]:
    with db.session() as s:
        return (replication.snapshot(s),
                {d.name: d.port for d in s.scalars(select(Device))})


def test_newer_applies_older_and_equal_are_ignored_and_not_logged(make_db: object) -> None:
    db = make_db("n1")  # type: ignore[operator]
    v1, v2 = format_version(1000, 0, "a"), format_version(2000, 0, "b")
    with db.transaction() as s:
        assert replication.apply(s, record("CT", v2, port=2), "a")
        assert not replication.apply(s, record("CT", v1, port=1), "b")  # older
        assert not replication.apply(s, record("CT", v2, port=2), "c")  # the same: a loop
    with db.session() as s:
        assert s.scalar(select(Device.port).where(Device.name == "CT")) == 2
        assert len(s.scalars(select(DeviceChange)).all()) == 1
        device = s.scalar(select(Device).where(Device.name == "CT"))
        assert (device.scope, device.ip, device.partition_id) == ("hierarchy", "127.0.0.1", None)


def test_tombstone_removes_the_replicated_device_but_never_a_local_one(make_db: object) -> None:
    db = make_db("n1")  # type: ignore[operator]
    with db.transaction() as s:
        devices.add(s, name="LOCAL", ae_title="LOCAL", host="127.0.0.1")
        replication.apply(s, record("SHARED", format_version(1, 0, "a")), "a")
        replication.apply(s, record("SHARED", format_version(2, 0, "a"), deleted=True), "a")
        replication.apply(s, record("LOCAL", format_version(3, 0, "a"), deleted=True), "a")
        # A late, older re-creation of the deleted record does not bring it back.
        assert not replication.apply(s, record("SHARED", format_version(1, 5, "b")), "b")
    with db.session() as s:
        assert set(s.scalars(select(Device.name))) == {"LOCAL"}


def test_local_edits_are_logged_with_versions_newer_than_anything_received(
        make_db: object) -> None:
    db = make_db("site")  # type: ignore[operator]
    future = format_version(9_999_999_999_999, 0, "other")  # a node whose clock runs ahead
    with db.transaction() as s:
        replication.apply(s, record("VIEW", future, port=1), "other")
        devices.edit(s, "VIEW", port=7)
    with db.session() as s:
        held = replication.held(s, "VIEW")
        assert held is not None and held.version > future and held.version.endswith(".site")
        assert json.loads(held.payload)["port"] == 7
        logged = s.scalars(select(DeviceChange).order_by(DeviceChange.seq)).all()
        assert [(c.received_from, c.seq) for c in logged] == [("other", 1), ("", 2)]


def test_scope_rules_are_checked(make_db: object) -> None:
    db = make_db("n")  # type: ignore[operator]
    with db.transaction() as s:
        s.add(Partition(ae_title="PACSNODE", port=11112, folder="PACSNODE"))
    with db.transaction() as s, pytest.raises(AdminError, match="every partition"):
        devices.add(s, name="A", ae_title="A", scope="hierarchy", partition="PACSNODE")
    with db.transaction() as s, pytest.raises(AdminError, match="stay local"):
        devices.add(s, name="P", ae_title="P", scope="hierarchy", device_type="PARENT")
    with db.transaction() as s, pytest.raises(AdminError, match="scope must be"):
        devices.add(s, name="Q", ae_title="Q", scope="everywhere")


def test_rename_and_unsharing_leave_tombstones(make_db: object) -> None:
    db = make_db("n")  # type: ignore[operator]
    with db.transaction() as s:
        devices.add(s, name="OLD", ae_title="OLD", scope="hierarchy")
        devices.edit(s, "OLD", name="NEW")
        devices.add(s, name="GONE", ae_title="GONE", scope="hierarchy")
        devices.edit(s, "GONE", scope="local")
    with db.session() as s:
        held = {r.name: r.deleted for r in replication.snapshot(s)}
        assert held == {"OLD": True, "NEW": False, "GONE": True}
        assert set(s.scalars(select(Device.name))) == {"NEW", "GONE"}  # GONE stays, locally


def test_any_arrival_order_converges_to_the_same_table(make_db: object) -> None:
    """Concurrent edits of the same records reach three nodes in different orders (with
    duplicates, as a tree delivers them): every node ends with the same records and devices."""
    rng = random.Random(5)
    nodes = ["a", "b", "c"]
    clock = itertools.count(1000)
    history = []
    for _ in range(40):
        name = rng.choice(["CT", "MR", "VIEWER"])
        origin = rng.choice(nodes)
        version = format_version(next(clock) // 2, rng.randint(0, 2), origin)  # clashes too
        history.append(record(name, version, deleted=rng.random() < 0.2,
                              port=rng.randint(1, 60000), origin=origin))
    results = []
    for i in range(3):
        db = make_db(f"r{i}")  # type: ignore[operator]
        arrivals = history + rng.sample(history, 10)
        rng.shuffle(arrivals)
        with db.transaction() as s:
            for r in arrivals:
                replication.apply(s, r, "neighbour")
        results.append(state(db))
    assert results[0] == results[1] == results[2]
    winners = {r.name: max((h for h in history if h.name == r.name), key=lambda h: h.version)
               for r in results[0][0]}
    assert results[0][0] == sorted(winners.values(), key=lambda r: r.name)


def test_a_batch_ends_as_applying_its_records_one_by_one(make_db: object) -> None:
    """What a neighbour pushes is applied in a few statements for the whole batch: the same
    records held, devices, and change log (in order, with consecutive seqs) as one by one."""
    v = [format_version(1000 + i, 0, "a") for i in range(6)]
    batch = [record("CT", v[0], port=1), record("CT", v[2], port=3),
             record("CT", v[1], port=2),  # older than what the batch already brought
             record("LOCAL", v[3], port=4), record("LOCAL", v[4], deleted=True),
             record("GONE", v[5], deleted=True), record("CT", v[2], port=3)]  # a duplicate
    results = []
    for name, one_by_one in (("batched", False), ("single", True)):
        db = make_db(name)  # type: ignore[operator]
        with db.transaction() as s:
            devices.add(s, name="LOCAL", ae_title="LOCAL", host="127.0.0.1")
            devices.add(s, name="KEEP", ae_title="KEEP", host="127.0.0.1")
        with db.transaction() as s:
            if one_by_one:
                applied = sum(replication.apply(s, r, "n") for r in batch)
            else:
                logged = replication.apply_all(s, batch, "n")
                assert (logged.first, logged.last) == (1, 5)
                applied = len(logged.records)
        with db.session() as s:
            logged = [(c.seq, c.name, c.version) for c in
                      s.scalars(select(DeviceChange).order_by(DeviceChange.seq))]
        results.append((applied, state(db), logged))
    assert results[0] == results[1]
    applied, (held, ports), logged = results[0]
    assert applied == 5 and [seq for seq, _n, _v in logged] == [1, 2, 3, 4, 5]
    assert ports == {"CT": 3, "KEEP": 104}  # LOCAL became shared, then was deleted
    assert {r.name: r.deleted for r in held} == {"CT": False, "LOCAL": True, "GONE": True}


def test_local_edits_and_received_records_share_one_counter(make_db: object) -> None:
    db = make_db("n")  # type: ignore[operator]
    with db.transaction() as s:
        devices.add(s, name="MINE", ae_title="MINE", scope="hierarchy")
        replication.apply_all(s, [record("A", format_version(1, 0, "x")),
                                  record("B", format_version(2, 0, "x"))], "x")
        devices.edit(s, "MINE", port=11)
    with db.session() as s:
        assert replication.last_seq(s) == 4
        assert [c.name for c in s.scalars(select(DeviceChange).order_by(DeviceChange.seq))] \
            == ["MINE", "A", "B", "MINE"]
    assert replication.peek_last_seq(db) == 4
