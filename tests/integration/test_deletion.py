"""Delete management (docs/how-to/storage.md): study delete, the deleted list with restore and
remove, partitions deletable only when empty, and deletes a crash interrupted."""

from __future__ import annotations

import json
import os
from pathlib import Path

from sqlalchemy import select

from node.db.models import ForwardJob, Instance, Partition
from node.storage import deletion
from tests.conftest import RunningNode, free_port, stored_files
from tests.dicomgen import make_instance
from tests.integration.test_find import find
from tests.scu import statuses, store


def send_study(node: RunningNode, n: int = 3, called: str = "PACSNODE") -> str:
    first = make_instance()
    items = [first, *(make_instance(study_uid=first.StudyInstanceUID) for _ in range(n - 1))]
    assert statuses(store(node.port, items, called=called)) == [0] * n
    return str(first.StudyInstanceUID)


def found_studies(node: RunningNode, called: str = "PACSNODE") -> set[str]:
    found, final = find(node, "STUDY", StudyInstanceUID="")
    assert final == 0
    return {str(ds.StudyInstanceUID) for ds in found}


def dcm_files(node: RunningNode, study: str) -> list[Path]:
    return [p for p in stored_files(node.storage) if study in p.parts]


def test_delete_without_tracking_removes_files_index_and_pending_jobs(node: RunningNode) -> None:
    # A destination nobody listens on: the study's forward jobs stay pending.
    assert node.cli("device", "add", "BACKUP", "--type", "BACKUP_TARGET", "--host",
                    "127.0.0.1", "--port", str(free_port())).exit_code == 0
    gone, kept = send_study(node), send_study(node)
    result = node.cli("study", "delete", gone, "--yes")
    assert result.exit_code == 0, result.output
    assert "3 instances" in result.output and "kept" not in result.output
    assert found_studies(node) == {kept}
    assert dcm_files(node, gone) == [] and len(dcm_files(node, kept)) == 3
    with node.db.session() as session:
        assert len(session.scalars(select(ForwardJob)).all()) == 3  # the kept study's
    listed = node.cli("deleted", "list", "--json")
    assert json.loads(listed.output) == []


def test_tracked_delete_keeps_the_study_until_restored(node: RunningNode) -> None:
    assert node.cli("partition", "edit", "PACSNODE", "--track-deleted").exit_code == 0
    study = send_study(node)
    files_before = {p.name: p.read_bytes() for p in dcm_files(node, study)}
    assert node.cli("study", "delete", study, "--yes").exit_code == 0
    assert found_studies(node) == set()
    [record] = json.loads(node.cli("deleted", "list", "--json").output)
    assert record["study_instance_uid"] == study and record["instances"] == 3
    assert record["folder"].startswith("PACSNODE/.deleted/")
    assert len(list((node.storage / record["folder"]).rglob("*.dcm"))) == 3

    result = node.cli("deleted", "restore", str(record["id"]))
    assert result.exit_code == 0, result.output
    assert "3 instances" in result.output
    assert found_studies(node) == {study}
    assert {p.name: p.read_bytes() for p in dcm_files(node, study)} == files_before
    assert json.loads(node.cli("deleted", "list", "--json").output) == []
    assert not (node.storage / record["folder"]).exists()
    # Restored instances are not forwarded again: no jobs were queued for them.
    with node.db.session() as session:
        assert session.scalars(select(ForwardJob)).all() == []


def test_remove_erases_a_kept_study_for_good(node: RunningNode) -> None:
    assert node.cli("partition", "edit", "PACSNODE", "--track-deleted").exit_code == 0
    study = send_study(node, n=1)
    assert node.cli("study", "delete", study, "--yes").exit_code == 0
    [record] = json.loads(node.cli("deleted", "list", "--json").output)
    result = node.cli("deleted", "remove", str(record["id"]), "--yes")
    assert result.exit_code == 0, result.output
    assert not (node.storage / record["folder"]).exists()
    assert json.loads(node.cli("deleted", "list", "--json").output) == []
    bad = node.cli("deleted", "restore", str(record["id"]))
    assert bad.exit_code == 1 and f"no deleted study with id {record['id']}" in bad.output


def test_a_partition_is_deleted_only_when_empty(node: RunningNode) -> None:
    assert node.cli("partition", "add", "SECOND", "--port", str(node.port), "--folder",
                    "SECOND", "--track-deleted").exit_code == 0
    with node.db.session() as session:
        assert session.scalar(select(Partition.id).where(Partition.ae_title == "SECOND"))
    study = send_study(node, n=1, called="SECOND")
    refused = node.cli("partition", "delete", "SECOND")
    assert refused.exit_code == 1 and "holds 1 study" in refused.output
    assert node.cli("study", "delete", study, "--partition", "SECOND", "--yes").exit_code == 0
    refused = node.cli("partition", "delete", "SECOND")
    assert refused.exit_code == 1 and "keeps 1 deleted study" in refused.output
    [record] = json.loads(node.cli("deleted", "list", "--json").output)
    assert node.cli("deleted", "remove", str(record["id"]), "--yes").exit_code == 0
    assert node.cli("partition", "delete", "SECOND").exit_code == 0


def test_delete_names_the_problem(node: RunningNode) -> None:
    missing = node.cli("study", "delete", "1.2.3.4", "--yes")
    assert missing.exit_code == 1 and "study 1.2.3.4 is not held" in missing.output
    assert node.cli("partition", "add", "SECOND", "--port", str(node.port), "--folder",
                    "SECOND").exit_code == 0
    twice = make_instance()
    for called in ("PACSNODE", "SECOND"):
        assert statuses(store(node.port, [twice], called=called)) == [0]
    ambiguous = node.cli("study", "delete", str(twice.StudyInstanceUID), "--yes")
    assert ambiguous.exit_code == 1
    assert "PACSNODE, SECOND" in ambiguous.output and "--partition" in ambiguous.output


def test_study_list_shows_size_and_whether_stored_elsewhere(node: RunningNode) -> None:
    study = send_study(node, n=2)
    [row] = json.loads(node.cli("study", "list", "--json").output)
    assert row["study_instance_uid"] == study and row["instances"] == 2
    assert row["size"] == sum(p.stat().st_size for p in dcm_files(node, study))
    assert row["stored_elsewhere"] is False  # never forwarded: auto-purge leaves it alone


def _interrupted_delete(node: RunningNode, study: str) -> tuple[Path, list[str]]:
    """What a crash leaves between moving a study's files out and the commit: the files in a
    holding folder with the manifest, the index rows still there."""
    with node.db.session() as session:
        paths = list(session.scalars(select(Instance.path)))
    holding = node.storage / "PACSNODE" / deletion.TRASH / "crashed"
    holding.mkdir(parents=True)
    (holding / deletion.MANIFEST).write_text(json.dumps({"study_instance_uid": study,
                                                         "files": paths}))
    for path in paths:
        series, sop = Path(path).parts[-2:]
        (holding / series).mkdir(exist_ok=True)
        os.rename(node.storage / path, holding / series / sop)
    return holding, paths


def test_recover_puts_back_what_an_uncommitted_delete_moved(node: RunningNode) -> None:
    study = send_study(node, n=2)
    holding, paths = _interrupted_delete(node, study)
    assert deletion.recover(node.db, node.storage) == 1
    assert all((node.storage / p).is_file() for p in paths)
    assert not holding.exists()
    assert found_studies(node) == {study}


def test_recover_finishes_a_committed_delete(node: RunningNode) -> None:
    study = send_study(node, n=2)
    assert node.cli("study", "delete", study, "--yes").exit_code == 0
    # The delete committed, but the crash came before its holding folder was removed.
    holding = node.storage / "PACSNODE" / deletion.TRASH / "committed"
    (holding / "1.2").mkdir(parents=True)
    (holding / "1.2" / "1.2.3.dcm").write_bytes(b"left over")
    (holding / deletion.MANIFEST).write_text(json.dumps({"files": ["PACSNODE/9/1.2/1.2.3.dcm"]}))
    assert deletion.recover(node.db, node.storage) == 1
    assert not holding.exists() and not (node.storage / "PACSNODE/9/1.2/1.2.3.dcm").exists()


def test_purge_rechecks_under_the_lock_that_the_study_is_still_stored_elsewhere(
        make_node: object) -> None:
    from node.storage import purge
    from node.storage.monitor import StorageMonitor
    from tests.conftest import wait_for
    from tests.destination import CountingSCP
    from tests.integration.test_forward import FAST

    parent = CountingSCP(ae_title="PARENT").start()
    try:
        node = make_node(FAST)  # type: ignore[operator]
        assert node.cli("device", "add", "PARENT", "--ae-title", "PARENT", "--type", "PARENT",
                        "--host", "127.0.0.1", "--port", str(parent.port)).exit_code == 0
        first = make_instance()
        assert statuses(store(node.port, [first])) == [0]
        def chosen() -> purge.Candidate:
            with node.db.session() as session:
                [c] = list(purge.candidates(session, [1], "received", ["PARENT"]))
                return c
        assert wait_for(lambda: chosen().stored_elsewhere, timeout=20)
        candidate = chosen()
    finally:
        parent.stop()
    # Chosen for purging; then a new instance of the study arrives (its forward job waits).
    assert statuses(store(node.port, [make_instance(study_uid=first.StudyInstanceUID)])) == [0]
    monitor: StorageMonitor = node.node.monitor
    removed = deletion.delete_study(node.db, node.storage, candidate.study_pk, keep=False,
                                    reason="test", still_wanted=monitor._still_purgeable(candidate))
    assert removed is None
    assert len(dcm_files(node, str(first.StudyInstanceUID))) == 2


def test_a_study_stored_under_hashed_paths_is_deleted_and_restored(node: RunningNode) -> None:
    """Non-conformant UIDs (hex hashes, as in pydicom's bad_sequence.dcm) map to the same
    hashed paths on delete, restore and when emptied folders go."""
    assert node.cli("partition", "edit", "PACSNODE", "--track-deleted").exit_code == 0
    study = "05fa52f0e599f17b8186ff18fcdf2b5570a52206a75c4d03afebf5c475dc8758"
    items = [make_instance(study_uid=study, series_uid="dbf60361338b6cb0", sop_uid=sop)
             for sop in ("dccc9599087131742838", "dccc9599087131742839")]
    assert statuses(store(node.port, items)) == [0, 0]
    before = {p.relative_to(node.storage): p.read_bytes() for p in stored_files(node.storage)}
    assert len(before) == 2 and all(p.parts[1].startswith("x") for p in before)

    assert node.cli("study", "delete", study, "--yes").exit_code == 0
    assert sorted(p.name for p in (node.storage / "PACSNODE").iterdir()) == [".deleted"]
    [record] = json.loads(node.cli("deleted", "list", "--json").output)
    result = node.cli("deleted", "restore", str(record["id"]))
    assert result.exit_code == 0, result.output
    assert {p.relative_to(node.storage): p.read_bytes()
            for p in stored_files(node.storage)} == before
    assert found_studies(node) == {study}
