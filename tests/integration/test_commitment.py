"""Storage commitment, push model: as SCP (reports what is held), as SCU (after forwarding)."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path

import pytest
from pydicom.dataset import Dataset
from pynetdicom import AE, build_role, evt
from pynetdicom.sop_class import StorageCommitmentPushModel
from sqlalchemy import select, update

from node import config
from node.config import ForwardingSettings
from node.db import migrate
from node.db.database import Database
from node.db.models import Device, ForwardJob, Study, utcnow
from node.forwarding import commitment
from node.forwarding.admin import stored_elsewhere
from node.forwarding.commitment import WELL_KNOWN_INSTANCE, request_dataset
from tests.conftest import (
    RunningNode,
    free_port,
    node_toml,
    run_cli,
    wait_for,
    write_config,
)
from tests.dicomgen import make_instance, write_study
from tests.integration.test_forward import FAST, jobs
from tests.scu import statuses, store

CT = "1.2.840.10008.5.1.4.1.1.2"


def test_forwarded_study_counts_as_stored_elsewhere_once_committed(make_node: object) -> None:
    parent = make_node(FAST, name="parent")  # type: ignore[operator]
    child = make_node(FAST, name="child")  # type: ignore[operator]
    # Both sides know each other: the parent sends its report to the child's AE.
    assert parent.cli("device", "add", "CHILD", "--ae-title", "PACSNODE", "--type", "CHILD",
                      "--host", "127.0.0.1", "--port", str(child.port)).exit_code == 0
    assert child.cli("device", "add", "PARENT", "--ae-title", "PACSNODE", "--type", "PARENT",
                     "--host", "127.0.0.1", "--port", str(parent.port),
                     "--storage-commitment").exit_code == 0
    first = make_instance()
    sent = [first, *(make_instance(study_uid=first.StudyInstanceUID) for _ in range(3))]
    assert statuses(store(child.port, sent)) == [0] * 4
    assert wait_for(lambda: [j.commitment for j in jobs(child)] == ["committed"] * 4,
                    timeout=30)
    with child.db.session() as session:
        study_pk = session.scalar(select(Study.id))
        assert study_pk is not None and stored_elsewhere(session, study_pk)


def test_a_study_is_not_stored_elsewhere_before_commitment(make_node: object) -> None:
    child = make_node(FAST)  # type: ignore[operator]
    port = free_port()  # nobody there: nothing is delivered, nothing committed
    assert child.cli("device", "add", "PARENT", "--type", "PARENT", "--host", "127.0.0.1",
                     "--port", str(port), "--storage-commitment").exit_code == 0
    assert statuses(store(child.port, [make_instance()])) == [0]
    with child.db.session() as session:
        study_pk = session.scalar(select(Study.id))
        assert study_pk is not None and not stored_elsewhere(session, study_pk)


def test_scp_reports_held_and_missing_instances(node: RunningNode) -> None:
    held = make_instance()
    assert statuses(store(node.port, [held])) == [0]
    reports: list[tuple[int, Dataset]] = []

    def on_report(event: evt.Event) -> tuple[int, None]:
        reports.append((event.event_type, event.event_information))
        return 0x0000, None

    listener = AE(ae_title="REQUESTER")
    listener.add_supported_context(StorageCommitmentPushModel, scu_role=True, scp_role=True)
    port = free_port()
    server = listener.start_server(("127.0.0.1", port), block=False,
                                   evt_handlers=[(evt.EVT_N_EVENT_REPORT, on_report)])
    try:
        assert node.cli("device", "add", "REQUESTER", "--host", "127.0.0.1",
                        "--port", str(port)).exit_code == 0
        requester = AE(ae_title="REQUESTER")
        requester.add_requested_context(StorageCommitmentPushModel)
        assoc = requester.associate("127.0.0.1", node.port, ae_title="PACSNODE",
                                    ext_neg=[build_role(StorageCommitmentPushModel,
                                                        scu_role=True)])
        assert assoc.is_established
        status, _ = assoc.send_n_action(
            request_dataset("1.2.3.4.5", [(CT, held.SOPInstanceUID), (CT, "1.2.3.999")]), 1,
            StorageCommitmentPushModel, WELL_KNOWN_INSTANCE)
        assoc.release()
        assert int(status.Status) == 0
        assert wait_for(lambda: reports, timeout=10)
        event_type, report = reports[0]
        assert event_type == 2  # some instances failed
        assert report.TransactionUID == "1.2.3.4.5"
        assert [r.ReferencedSOPInstanceUID for r in report.ReferencedSOPSequence] == [
            held.SOPInstanceUID]
        [failed] = report.FailedSOPSequence
        assert (failed.ReferencedSOPInstanceUID, failed.FailureReason) == ("1.2.3.999", 0x0112)
    finally:
        server.shutdown()


def test_without_heartbeat_forwarded_instances_are_committed(
        make_node: object) -> None:
    parent = make_node(FAST, name="parent")  # type: ignore[operator]
    child = make_node(FAST, name="child")  # type: ignore[operator]
    assert parent.cli("device", "add", "CHILD", "--ae-title", "PACSNODE", "--type", "CHILD",
                      "--host", "127.0.0.1", "--port", str(child.port)).exit_code == 0
    assert child.cli("device", "add", "PARENT", "--ae-title", "PACSNODE", "--type", "PARENT",
                     "--host", "127.0.0.1", "--port", str(parent.port), "--heartbeat", "off",
                     "--storage-commitment").exit_code == 0
    assert statuses(store(child.port, [make_instance() for _ in range(3)])) == [0] * 3
    assert wait_for(lambda: [j.commitment for j in jobs(child)] == ["committed"] * 3,
                    timeout=30)
    assert all(j.last_error == "" and j.commitment_due_at is None for j in jobs(child))


@pytest.fixture
def queued(tmp_path: Path, new_db: Callable[..., str]) -> Iterator[tuple[Path, Database]]:
    """A node's database and settings, not running: 3 instances imported, each queued for
    DEST (asks for commitment), PLAIN (does not) and OFF (asks, disabled later)."""
    path = write_config(tmp_path / "node.toml",
                        node_toml(tmp_path / "data", new_db("index"), free_port()))
    for name, extra in (("DEST", ["--storage-commitment"]), ("PLAIN", []),
                        ("OFF", ["--storage-commitment"])):
        assert run_cli(path, "device", "add", name, "--type", "BACKUP_TARGET", "--host",
                       "127.0.0.1", "--port", str(free_port()), *extra).exit_code == 0
    write_study(tmp_path / "in", 3)
    result = run_cli(path, "import", str(tmp_path / "in"))
    assert result.exit_code == 0, result.output
    assert run_cli(path, "device", "disable", "OFF").exit_code == 0
    database = Database(config.load(path).node.database_url)
    yield path, database
    database.dispose()


def _set(db: Database, device: str, **values: object) -> list[int]:
    with db.transaction() as session:
        device_id = session.scalar(select(Device.id).where(Device.name == device))
        ids = list(session.scalars(select(ForwardJob.id).where(ForwardJob.device_id == device_id)
                                   .order_by(ForwardJob.id)))
        for job_id, job_values in zip(ids, values.get("each", [{}] * len(ids)), strict=True):
            session.execute(update(ForwardJob).where(ForwardJob.id == job_id).values(
                state="done", **job_values))
        return ids


def test_which_delivered_jobs_are_asked_for_commitment_now(
        queued: tuple[Path, Database]) -> None:
    _path, db = queued
    now = utcnow()
    f = ForwardingSettings(retry_max_seconds=60, commitment_timeout=30, lease_seconds=30)
    due = _set(db, "DEST", each=[
        {"commitment": "failed", "commitment_due_at": now - timedelta(seconds=1)},
        {"commitment": "requested", "commitment_due_at": now + timedelta(seconds=20)},
        # Further ahead than any wait: set before the clock was stepped back an hour.
        {"commitment": "requested", "commitment_due_at": now + timedelta(hours=1)}])
    _set(db, "PLAIN", each=[{"commitment": "failed", "commitment_due_at": now}] * 3)
    _set(db, "OFF", each=[{"commitment": "failed", "commitment_due_at": now}] * 3)
    with db.session() as session:
        dest = session.scalar(select(Device.id).where(Device.name == "DEST"))
    # PLAIN does not ask for commitment, OFF is disabled: neither is asked.
    assert commitment.due_devices(db, f) == {dest: 2}
    claimed = commitment.claim(db, dest, 10, f)
    assert [o.id for o in claimed] == [due[0], due[2]]
    assert commitment.claim(db, dest, 10, f) == []  # leased until their outcome is recorded
    with db.transaction() as session:
        session.execute(update(ForwardJob).where(ForwardJob.id == due[0]).values(
            commitment="committed", commitment_due_at=now - timedelta(seconds=5)))
    assert commitment.claim(db, dest, 10, ForwardingSettings(lease_seconds=0.001)) == []


def test_queue_retry_asks_again_for_commitment_owed(queued: tuple[Path, Database]) -> None:
    path, db = queued
    later = utcnow() + timedelta(minutes=30)
    _set(db, "DEST", each=[{"commitment": c, "commitment_due_at": later, "commitment_attempts": 9}
                           for c in ("failed", "requested", "committed")])
    _set(db, "PLAIN", each=[{"commitment": "failed"}] * 3)
    result = run_cli(path, "queue", "retry", "--device", "DEST")
    assert result.output.splitlines() == [
        "0 job(s) queued again",
        "2 delivered job(s) not committed yet: storage commitment asked again now"]
    assert run_cli(path, "queue", "retry", "--device", "PLAIN").output.splitlines() == [
        "0 job(s) queued again"]
    with db.session() as session:
        rows = session.execute(select(ForwardJob.commitment, ForwardJob.commitment_attempts,
                                      ForwardJob.commitment_due_at)
                               .join(Device, Device.id == ForwardJob.device_id)
                               .where(Device.name == "DEST").order_by(ForwardJob.id)).all()
    assert [(c, n) for c, n, _ in rows] == [("failed", 0), ("requested", 0), ("committed", 9)]
    assert all(due is not None and due.replace(tzinfo=None) < later.replace(tzinfo=None)
               for _c, _n, due in rows[:2])  # due now; the committed one is left alone
    shown = json.loads(run_cli(path, "queue", "show", str(
        session_ids(db, "DEST")[0]), "--json").output)
    assert shown["commitment"] == "failed" and shown["commitment_attempts"] == 0


def session_ids(db: Database, device: str) -> list[int]:
    with db.session() as session:
        return list(session.scalars(select(ForwardJob.id).join(Device).where(
            Device.name == device).order_by(ForwardJob.id)))


def test_upgrade_makes_commitment_left_failed_or_requested_due(
        queued: tuple[Path, Database]) -> None:
    """Jobs an older version left failed or requested for good are asked for at once."""
    _path, db = queued
    _set(db, "DEST", each=[{"commitment": c} for c in ("failed", "requested", "committed")])
    _set(db, "PLAIN", each=[{"commitment": "failed"}] * 3)
    migrate.downgrade(db.engine, "0010")
    migrate.upgrade(db.engine)
    with db.session() as session:
        rows = session.execute(select(Device.name, ForwardJob.commitment,
                                      ForwardJob.commitment_due_at, ForwardJob.commitment_attempts)
                               .join(Device).order_by(ForwardJob.id)).all()
    owed = [(name, c) for name, c, due, _ in rows if due is not None]
    assert sorted(owed) == [("DEST", "failed"), ("DEST", "requested")]
    assert {n for *_, n in rows} == {0}
