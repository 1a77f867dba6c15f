"""The activity log of a running node: what real associations leave behind, pruning, the CLI."""

from __future__ import annotations

import json
from datetime import datetime, timedelta
from pathlib import Path

from pydicom.dataset import Dataset
from sqlalchemy import select

from node import activity
from node.activity import Event
from node.db import migrate
from node.db.database import Database
from node.db.models import Activity, Study, utcnow
from tests.conftest import RunningNode, wait_for
from tests.destination import CountingSCP
from tests.dicomgen import make_instance, uid
from tests.integration.test_find import find
from tests.integration.test_forward import FAST
from tests.integration.test_retrieve import get, move
from tests.scu import associate, statuses, store


def recorded(node: RunningNode, **where: str) -> list[Activity]:
    """Rows of the node's log (after writing what it buffers), oldest first."""
    assert node.node.activity is not None
    node.node.activity.flush()
    with node.db.session() as session:
        stmt = select(Activity).order_by(Activity.at, Activity.id)
        for column, value in where.items():
            stmt = stmt.where(getattr(Activity, column) == value)
        return list(session.scalars(stmt))


def accessed(node: RunningNode) -> dict[str, datetime]:
    with node.db.session() as session:
        return {s.study_instance_uid: s.accessed_at for s in session.scalars(select(Study))}


def study(uid_: str, n: int) -> list[Dataset]:
    series = uid()
    return [make_instance(study_uid=uid_, series_uid=series, instance_number=i + 1)
            for i in range(n)]


def test_stores_queries_and_retrieves_are_logged_per_study_and_request(
        node: RunningNode, tmp_path: Path) -> None:
    assert node.cli("partition", "edit", "PACSNODE", "--duplicate-policy",
                    "reject").exit_code == 0
    a, b = uid(), uid()
    first, second = study(a, 3), study(b, 2)
    # One association: 3 + 2 instances, then a duplicate the policy refuses (0x0111).
    answers = statuses(store(node.port, [*first, *second, first[0]], calling="MODALITY"))
    assert answers == [0, 0, 0, 0, 0, 0x0111]

    found, final = find(node, "STUDY", calling="FINDER", PatientID="PID001",
                        StudyInstanceUID="")
    assert (len(found), final) == (2, 0)

    before = accessed(node)
    folder = tmp_path / "got"
    folder.mkdir()
    assert int(get(node, "STUDY", folder, calling="GETTER", StudyInstanceUID=a)[-1].Status) == 0
    after = accessed(node)
    assert after[a] > before[a]  # retrieved: counts as accessed (purge order "accessed")
    assert after[b] == before[b]

    # The association rows are written when the connections close, on the node's side.
    assert wait_for(lambda: len(recorded(node, kind="association")) == 3)

    stores = {r.study_instance_uid: r for r in recorded(node, kind="store")}
    assert set(stores) == {a, b}
    assert (stores[a].count, stores[a].failed, stores[a].outcome) == (3, 1, "warning")
    assert "0x0111" in stores[a].detail
    assert (stores[b].count, stores[b].failed, stores[b].outcome) == (2, 0, "ok")
    for row in stores.values():
        assert (row.partition, row.calling_ae, row.called_ae) == ("PACSNODE", "MODALITY",
                                                                  "PACSNODE")
        assert row.peer.startswith("127.0.0.1:")

    [sent] = recorded(node, kind="association", calling_ae="MODALITY")
    assert (sent.count, sent.failed, sent.outcome) == (6, 1, "ok")
    assert sent.detail.startswith("5 stores, 1 failed store; released")
    [asked] = recorded(node, kind="association", calling_ae="FINDER")
    assert asked.detail.startswith("1 find; released")

    [query] = recorded(node, kind="find")
    assert (query.calling_ae, query.count, query.outcome) == ("FINDER", 2, "ok")
    assert query.detail == "STUDY PatientID=PID001"

    [retrieve] = recorded(node, kind="get")
    assert (retrieve.calling_ae, retrieve.study_instance_uid) == ("GETTER", a)
    assert (retrieve.count, retrieve.failed, retrieve.outcome) == (3, 0, "ok")
    assert f"StudyInstanceUID={a}" in retrieve.detail

    # The same through the CLI.
    result = node.cli("activity", "--kind", "store", "--json")
    assert result.exit_code == 0, result.output
    listed = json.loads(result.output)
    assert sorted((r["study_instance_uid"], r["count"], r["failed"]) for r in listed) == sorted(
        [(a, 3, 1), (b, 2, 0)])
    assert all(r["kind"] == "store" and r["calling_ae"] == "MODALITY" for r in listed)
    result = node.cli("activity", "--study", a, "--kind", "get", "--kind", "store", "--json")
    assert [r["kind"] for r in json.loads(result.output)] == ["get", "store"]  # newest first
    result = node.cli("activity", "--ae", "FINDER", "--since", "1h", "--json")
    assert {r["kind"] for r in json.loads(result.output)} == {"find", "association"}
    table = node.cli("activity", "--limit", "3")
    assert table.exit_code == 0 and "DICOM activity" in table.output


def test_rejected_association_is_logged(node: RunningNode) -> None:
    assoc = associate(node.port, called="NOSUCH", calling="STRANGER")
    assert assoc.is_rejected
    assert wait_for(lambda: len(recorded(node, kind="reject")) == 1)
    [row] = recorded(node, kind="reject")
    assert (row.calling_ae, row.called_ae, row.outcome) == ("STRANGER", "NOSUCH", "failed")
    assert "called AE" in row.detail
    assert recorded(node, kind="association") == []


def test_prune_removes_only_rows_past_the_retention(db_url: str) -> None:
    # A database of its own: a running node's storage monitor prunes on its own schedule.
    db = Database(db_url)
    migrate.upgrade(db.engine)
    now = utcnow()
    try:
        with db.transaction() as session:
            activity.write(session, [
                Event("store", detail="old", at=now - timedelta(days=40)),
                Event("store", detail="old", at=now - timedelta(days=30, minutes=1)),
                Event("store", detail="kept", at=now - timedelta(days=29, hours=23)),
                Event("store", detail="kept", at=now - timedelta(hours=1)),
            ])
        assert activity.prune(db, 0) == 0  # 0: kept forever
        assert activity.prune(db, 30, now=now) == 2
        with db.session() as session:
            assert [r.detail for r in activity.query(session)] == ["kept", "kept"]
        assert activity.prune(db, 30, now=now) == 0
    finally:
        db.dispose()


def test_cli_refuses_bad_options_with_a_reason(node: RunningNode) -> None:
    for args, message in [
        (["--since", "garbage"], "--since: 'garbage' is neither an ISO date/time nor an age"),
        (["--until", "tomorrow-ish"], "--until:"),
        (["--kind", "teleport"], "--kind 'teleport' is not one of"),
        (["--outcome", "meh"], "--outcome 'meh' is not one of"),
        (["--limit", "0"], "--limit must be at least 1"),
        (["--since", "1h", "--until", "2h"], "is before --since"),
    ]:
        result = node.cli("activity", *args)
        assert result.exit_code == 1, (args, result.output)
        assert "Error" in result.output and message in result.output, result.output
        assert "Traceback" not in result.output


def test_move_and_forward_rows(make_node: object) -> None:
    node: RunningNode = make_node(FAST)  # type: ignore[operator]
    dest = CountingSCP(refuse=set()).start()
    try:
        assert node.cli("device", "add", "DEST", "--host", "127.0.0.1", "--port",
                        str(dest.port)).exit_code == 0
        a = uid()
        instances = study(a, 3)
        assert statuses(store(node.port, instances, calling="MODALITY")) == [0, 0, 0]
        dest.refuse.add(instances[0].SOPInstanceUID)  # the destination answers 0xA700
        final = move(node, "STUDY", calling="MOVER", StudyInstanceUID=a)[-1]
        assert int(final.Status) == 0xB000
        assert int(move(node, "STUDY", destination="NOWHERE", calling="MOVER",
                        StudyInstanceUID=a)[-1].Status) == 0xA801

        # A backup target: forwarded as one batch, logged as one row for the study.
        assert node.cli("device", "edit", "DEST", "--type", "BACKUP_TARGET").exit_code == 0
        dest.refuse.clear()
        b = uid()
        assert statuses(store(node.port, study(b, 2), calling="MODALITY")) == [0, 0]
        assert wait_for(lambda: sum(f.count for f in recorded(node, kind="forward")) == 2,
                        timeout=20)
        refused = make_instance()
        dest.refuse.add(refused.SOPInstanceUID)
        assert statuses(store(node.port, [refused], calling="MODALITY")) == [0]
        assert wait_for(lambda: recorded(node, kind="forward",
                                         study_instance_uid=refused.StudyInstanceUID),
                        timeout=20)
    finally:
        dest.stop()

    moved, unknown = recorded(node, kind="move")
    assert (moved.calling_ae, moved.study_instance_uid) == ("MOVER", a)
    assert (moved.count, moved.failed, moved.outcome) == (3, 1, "warning")
    assert moved.detail.startswith(f"to DEST: STUDY StudyInstanceUID={a}")
    assert (unknown.outcome, unknown.count) == ("failed", 0)
    assert unknown.detail.endswith("move destination unknown")

    # One row per study of each batch (here one batch per instance, or both in one).
    forwards = recorded(node, kind="forward", study_instance_uid=b)
    assert {(f.failed, f.outcome, f.peer, f.called_ae) for f in forwards} == {
        (0, "ok", "DEST", "DEST")}
    failing = recorded(node, kind="forward", study_instance_uid=refused.StudyInstanceUID)[0]
    assert (failing.count, failing.failed, failing.outcome) == (0, 1, "failed")
    assert "answered 0xA700" in failing.detail
