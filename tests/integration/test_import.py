"""`pacsnode import` into a running node's database: files, folders and DICOMDIR media through
the C-STORE path, the Self device's coercion rules, the summary and its exit status."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.filereader import read_file_meta_info
from sqlalchemy import select

from node import activity
from node.db.models import Activity, Instance, IntegrityItem
from node.internals.direct_store import file_meta
from tests.conftest import RunningNode, incoming_files
from tests.dicomgen import make_instance, uid, write_study
from tests.integration.test_find import find
from tests.scu import statuses, store

TEST_FILES = Path(get_testdata_file("CT_small.dcm")).parent  # type: ignore[arg-type]
DICOMDIR = TEST_FILES / "dicomdirtests" / "DICOMDIR"
# The files of pydicom's test folder that are not DICOM (no_meta.dcm has a stray byte
# before its first element).
NOT_DICOM = {"README.txt", "crayons.icc", "rtplan.dump", "rtstruct.dump", "test1.json",
             "test_PN.json", "zipMR.gz", "no_meta.dcm", "dicomdirtests/README.txt",
             "dicomdirtests/TINY_ALPHA/README"}


def run_import(node: RunningNode, *args: str, code: int | None = 0) -> dict[str, Any]:
    """`pacsnode import ARGS --json`, its summary; `code`: the exit status expected."""
    result = node.cli("import", *args, "--json")
    assert "Traceback" not in result.output
    if code is not None:
        assert result.exit_code == code, result.output
    summary: dict[str, Any] = json.loads(result.output)
    summary["exit_code"] = result.exit_code
    return summary


def indexed(node: RunningNode) -> dict[str, Path]:
    """SOP Instance UID -> stored file."""
    with node.db.session() as session:
        return {sop: node.storage / path for sop, path in session.execute(
            select(Instance.sop_instance_uid, Instance.path))}


def digests(folder: Path) -> dict[str, tuple[str, int]]:
    return {str(p.relative_to(folder)): (hashlib.sha256(p.read_bytes()).hexdigest(),
                                         p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_folder_of_pydicom_test_files(node: RunningNode) -> None:
    before = digests(TEST_FILES)
    summary = run_import(node, str(TEST_FILES), code=None)
    assert digests(TEST_FILES) == before, "an original was changed"
    by_path = {str(Path(f["path"]).relative_to(TEST_FILES)): f for f in summary["files"]}
    walked = {str(p.relative_to(TEST_FILES)) for p in TEST_FILES.rglob("*") if p.is_file()}
    assert set(by_path) == walked and summary["total"] == len(walked)
    assert {p for p, f in by_path.items() if f["result"] == "not-dicom"} == NOT_DICOM
    assert summary["not_dicom"] == len(NOT_DICOM)
    # DICOMDIRs met in a folder are media directories, not instances.
    skipped = {p for p, f in by_path.items() if f["result"] == "skipped"}
    assert skipped and all("DICOMDIR" in p for p in skipped)
    # Anything refused is refused with a reason, and makes the exit status 1.
    refused = [f for f in summary["files"] if f["result"] == "refused"]
    assert summary["exit_code"] == (1 if refused else 0)
    assert all(f["comment"] for f in refused)
    truncated = by_path["MR_truncated.dcm"]
    assert (truncated["result"], truncated["status"]) == ("refused", 0xC000)
    assert "runs past the end of the file" in truncated["comment"]
    assert by_path["CT_small.dcm"]["result"] == "stored"
    # Its file meta names another instance than its data set: stored as a C-STORE of it is.
    assert (by_path["rtplan.dcm"]["result"], by_path["rtplan.dcm"]["status"]) == ("stored", 0)

    # Every file counted as stored is indexed, and stored as it is (no Self device: no
    # coercion), or with file meta made for its data set.
    stored = [f for f in summary["files"] if f["result"] == "stored"]
    assert summary["stored"] == len(stored) >= 100
    files = indexed(node)
    assert set(files) == {f["sop_instance_uid"] for f in stored}
    for f in stored:
        original = Path(f["path"]).read_bytes()
        kept = files[f["sop_instance_uid"]].read_bytes()
        # A stored file's meta names the instance its data set is, as a received file's does.
        meta = read_file_meta_info(files[f["sop_instance_uid"]])
        assert meta.MediaStorageSOPInstanceUID == f["sop_instance_uid"], f["path"]
        if not f["comment"]:
            assert kept == original, f["path"]
        else:  # made anew from the data set (rtplan.dcm, badVR.dcm)
            assert kept.endswith(original[-1000:]) and kept != original
    bare = files[dcmread(TEST_FILES / "rtstruct.dcm", force=True).SOPInstanceUID]
    assert bare.read_bytes() == file_meta(
        "1.2.840.10008.5.1.4.1.1.481.3", "1.2.826.0.1.3680043.8.498.2010020400001",
        "1.2.840.10008.1.2") + (TEST_FILES / "rtstruct.dcm").read_bytes()
    # pydicom's files share some SOP Instance UIDs: the later ones are duplicates.
    duplicates = [f for f in summary["files"] if f["result"] == "duplicate"]
    assert summary["duplicates"] == len(duplicates) > 0
    assert {f["sop_instance_uid"] for f in duplicates} <= set(files)
    assert incoming_files(node.storage) == []

    found, status = find(node, "IMAGE", StudyInstanceUID=by_path["CT_small.dcm"][
        "study_instance_uid"], SOPInstanceUID="")
    assert status == 0
    assert by_path["CT_small.dcm"]["sop_instance_uid"] in {ds.SOPInstanceUID for ds in found}

    again = run_import(node, str(TEST_FILES), code=None)
    assert again["stored"] == 0
    assert again["duplicates"] == summary["stored"] + summary["duplicates"]


def test_dicomdir_media_is_stored_byte_for_byte_and_found(node: RunningNode) -> None:
    ds = dcmread(DICOMDIR)
    referenced = [DICOMDIR.parent.joinpath(*r.ReferencedFileID)
                  for r in ds.DirectoryRecordSequence if "ReferencedFileID" in r]
    assert len(referenced) == 31
    summary = run_import(node, str(DICOMDIR))
    assert (summary["total"], summary["stored"], summary["refused"], summary["skipped"]) == (
        31, 31, 0, 0)
    assert sorted(Path(f["path"]) for f in summary["files"]) == sorted(referenced)
    files = indexed(node)
    studies: dict[str, set[str]] = {}
    for path in referenced:
        instance = dcmread(path, stop_before_pixels=True)
        assert files[instance.SOPInstanceUID].read_bytes() == path.read_bytes()
        studies.setdefault(instance.StudyInstanceUID, set()).add(instance.SOPInstanceUID)
    for study_uid, sops in studies.items():
        found, status = find(node, "IMAGE", StudyInstanceUID=study_uid, SOPInstanceUID="")
        assert status == 0
        assert {answer.SOPInstanceUID for answer in found} == sops

    again = run_import(node, str(DICOMDIR))
    assert (again["stored"], again["duplicates"], again["refused"]) == (0, 31, 0)


def test_dicomdir_with_a_missing_file_imports_the_rest_and_says_which(
        node: RunningNode, tmp_path: Path) -> None:
    media = tmp_path / "media"
    shutil.copytree(DICOMDIR.parent, media)
    (media / "77654033" / "CR1" / "6154").unlink()
    summary = run_import(node, str(media / "DICOMDIR"), code=1)
    assert (summary["stored"], summary["refused"]) == (30, 1)
    [missing] = [f for f in summary["files"] if f["result"] == "refused"]
    assert missing["path"] == str(media / "77654033" / "CR1" / "6154")
    assert "not found" in missing["comment"] and str(media / "DICOMDIR") in missing["comment"]
    text = node.cli("import", str(media / "DICOMDIR")).output
    assert f"refused {media / '77654033' / 'CR1' / '6154'}: referenced by" in text


def test_self_coercion_applies_to_imports_only(node: RunningNode, tmp_path: Path) -> None:
    imported, sent = make_instance(), make_instance()
    imported.InstitutionName = sent.InstitutionName = "ORIGINAL"
    path = tmp_path / "scan.dcm"
    imported.save_as(path, enforce_file_format=True)
    original = path.read_bytes()
    result = node.cli("device", "add", "SCANNER", "--type", "SELF", "--rule",
                      'set InstitutionName "SCANNED HERE"', "--rule",
                      "prefix AccessionNumber SCAN-")
    assert result.exit_code == 0, result.output

    summary = run_import(node, str(path))
    assert (summary["stored"], summary["self_device"], summary["coercion_rules"]) == (
        1, "SCANNER", 2)
    assert path.read_bytes() == original
    files = indexed(node)
    stored = dcmread(files[imported.SOPInstanceUID])
    assert stored.InstitutionName == "SCANNED HERE"
    assert stored.AccessionNumber == "SCAN-" + imported.AccessionNumber
    assert stored.PixelData == imported.PixelData
    with node.db.session() as session:
        calling = session.scalar(select(Instance.calling_ae_title).where(
            Instance.sop_instance_uid == imported.SOPInstanceUID))
    assert calling == "SCANNER"

    # A C-STORE is not the Self device's, even from a sender calling itself by its AE title.
    assert statuses(store(node.port, [sent], calling="SCANNER")) == [0]
    received = dcmread(indexed(node)[sent.SOPInstanceUID])
    assert received.InstitutionName == "ORIGINAL"
    assert received.AccessionNumber == sent.AccessionNumber

    # Disabled, it coerces nothing; deleted likewise.
    later = make_instance()
    later.save_as(tmp_path / "later.dcm", enforce_file_format=True)
    assert node.cli("device", "disable", "SCANNER").exit_code == 0
    text = node.cli("import", str(tmp_path / "later.dcm")).output
    assert "Self device SCANNER is disabled: no coercion" in text
    assert indexed(node)[later.SOPInstanceUID].read_bytes() == (
        tmp_path / "later.dcm").read_bytes()


def test_self_device_may_not_store(node: RunningNode, tmp_path: Path) -> None:
    make_instance().save_as(tmp_path / "a.dcm", enforce_file_format=True)
    assert node.cli("device", "add", "SELF", "--type", "SELF", "--no-storage").exit_code == 0
    summary = run_import(node, str(tmp_path / "a.dcm"), code=1)
    [refused] = summary["files"]
    assert (refused["result"], refused["status"]) == ("refused", 0x0124)
    assert indexed(node) == {}


def test_duplicate_policy_of_the_partition(node: RunningNode, tmp_path: Path) -> None:
    first = make_instance()
    first.save_as(tmp_path / "first.dcm", enforce_file_format=True)
    changed = make_instance(study_uid=first.StudyInstanceUID, series_uid=first.SeriesInstanceUID,
                            sop_uid=first.SOPInstanceUID)
    changed.InstitutionName = "SOMEWHERE ELSE"
    changed.save_as(tmp_path / "changed.dcm", enforce_file_format=True)
    assert run_import(node, str(tmp_path / "first.dcm"))["stored"] == 1
    stored = indexed(node)[first.SOPInstanceUID].read_bytes()

    assert node.cli("partition", "edit", "PACSNODE", "--duplicate-policy",
                    "compare").exit_code == 0
    summary = run_import(node, str(tmp_path / "changed.dcm"))
    [dup] = summary["files"]
    assert (dup["result"], dup["integrity"]) == ("duplicate", 1)
    with node.db.session() as session:
        assert len(session.scalars(select(IntegrityItem)).all()) == 1
    assert "difference(s) recorded in the integrity queue" in node.cli(
        "import", str(tmp_path / "changed.dcm")).output

    assert node.cli("partition", "edit", "PACSNODE", "--duplicate-policy",
                    "reject").exit_code == 0
    summary = run_import(node, str(tmp_path / "changed.dcm"), code=1)
    [dup] = summary["files"]
    assert (dup["result"], dup["status"]) == ("refused", 0x0111)
    assert indexed(node)[first.SOPInstanceUID].read_bytes() == stored


def test_import_is_in_the_activity_log(node: RunningNode, tmp_path: Path) -> None:
    tmp_path /= "in"  # beside the node's own folder
    tmp_path.mkdir()
    study_uid = uid()
    for n in range(3):
        make_instance(study_uid=study_uid, instance_number=n + 1).save_as(
            tmp_path / f"{n}.dcm", enforce_file_format=True)
    (tmp_path / "notes.txt").write_text("not DICOM")
    run_import(node, str(tmp_path))
    run_import(node, str(tmp_path / "0.dcm"))
    with node.db.session() as session:
        rows = activity.query(session, kinds=["import"])
    assert [(r.study_instance_uid, r.count, r.failed, r.outcome, r.peer, r.detail)
            for r in rows] == [
        (study_uid, 1, 0, "ok", "import", "0 stored, 1 duplicates"),
        (study_uid, 3, 0, "ok", "import", "3 stored, 0 duplicates")]
    assert all(r.partition == "PACSNODE" and r.calling_ae == "PACSNODE" for r in rows)
    result = node.cli("activity", "--kind", "import", "--json")
    assert result.exit_code == 0 and len(json.loads(result.output)) == 2
    with node.db.session() as session:
        assert session.scalar(select(Activity.id).where(Activity.kind == "store")) is None


def test_human_summary(node: RunningNode, tmp_path: Path) -> None:
    tmp_path /= "in"
    tmp_path.mkdir()
    make_instance().save_as(tmp_path / "a.dcm", enforce_file_format=True)
    (tmp_path / "b.txt").write_text("hello")
    bad = make_instance()
    bad.StudyInstanceUID = "1.2/3"  # it could name another path
    bad.save_as(tmp_path / "c.dcm", enforce_file_format=True)
    result = node.cli("import", str(tmp_path))
    assert result.exit_code == 1
    lines = result.output.splitlines()
    assert lines[0] == "import into PACSNODE (no Self device: no coercion)"
    assert [line.split() for line in lines[1:6]] == [
        ["stored", "1"], ["duplicates", "skipped", "0"], ["refused", "1"], ["not", "DICOM", "1"],
        ["skipped", "0"]]
    assert lines[6] == (f"refused {tmp_path / 'c.dcm'}: 0xC001 StudyInstanceUID '1.2/3' is "
                        "missing or not a valid UID")


@pytest.mark.parametrize(("args", "message"), [
    (["/nonexistent/folder"], "no such file or folder: /nonexistent/folder"),
    (["--partition", "NOPE", "."], "no partition with AE title 'NOPE'"),
])
def test_bad_requests_import_nothing(node: RunningNode, args: list[str], message: str) -> None:
    result = node.cli("import", *args)
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert message in result.output.replace("\n", "")
    assert indexed(node) == {}


def test_partition_must_be_chosen_among_several_and_enabled(node: RunningNode,
                                                             tmp_path: Path) -> None:
    tmp_path /= "in"
    tmp_path.mkdir()
    make_instance().save_as(tmp_path / "a.dcm", enforce_file_format=True)
    assert node.cli("partition", "add", "SECOND", "--port", str(node.port)).exit_code == 0
    result = node.cli("import", str(tmp_path))
    assert result.exit_code == 1
    assert "several partitions: choose one with --partition (PACSNODE, SECOND)" in \
        result.output.replace("\n", "")
    assert node.cli("partition", "disable", "SECOND").exit_code == 0
    result = node.cli("import", "--partition", "SECOND", str(tmp_path))
    assert result.exit_code == 1 and "partition SECOND is disabled" in result.output
    # The only enabled partition is the default again.
    assert run_import(node, str(tmp_path))["partition"] == "PACSNODE"


def test_transfer_syntax_the_node_does_not_accept(make_node: Any, tmp_path: Path) -> None:
    node = make_node('[dicom]\ntransfer_syntaxes = ["ExplicitVRLittleEndian"]\n')
    summary = run_import(node, str(TEST_FILES / "rtstruct.dcm"), code=1)
    [refused] = summary["files"]
    assert refused["status"] is None
    assert refused["comment"] == ("transfer syntax 1.2.840.10008.1.2 is not accepted by this "
                                  "node (dicom.transfer_syntaxes)")
    assert run_import(node, str(TEST_FILES / "CT_small.dcm"))["stored"] == 1


@pytest.mark.parametrize("accept", [True, False])
def test_a_sop_class_no_library_knows_is_imported_as_a_c_store_would_be(
        make_node: Any, tmp_path: Path, accept: bool) -> None:
    """dicom.accept_unknown_sop_classes holds for imports as for associations."""
    node = make_node(f"[dicom]\naccept_unknown_sop_classes = {str(accept).lower()}\n")
    ds = make_instance(sop_class="1.2.826.0.1.3680043.10.1457.777.1")
    ds.save_as(tmp_path / "private.dcm", enforce_file_format=True)
    summary = run_import(node, str(tmp_path / "private.dcm"), code=0 if accept else 1)
    assert (summary["stored"], len(indexed(node))) == ((1, 1) if accept else (0, 0))


@pytest.mark.slow
def test_ctrl_c_finishes_the_file_in_hand_then_stops(node: RunningNode, tmp_path: Path) -> None:
    folder = tmp_path / "in"
    folder.mkdir()
    big = make_instance(size=6000)  # 72 MB: its store takes a while (copy, fsync, coercion)
    big.save_as(folder / "0-big.dcm", enforce_file_format=True)
    write_study(folder / "1-more", 20)
    assert node.cli("device", "add", "SCANNER", "--type", "SELF", "--rule",
                    'set InstitutionName "SCANNED HERE"').exit_code == 0
    proc = subprocess.Popen(
        [sys.executable, "-m", "hierarchy.cli", "import", str(folder), "--json",
         "--config", str(node.config_path)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True, env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[2])},
        # A shell starts background jobs with SIGINT ignored; a terminal's Ctrl-C is not.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        # Ctrl-C while the big file is being stored: as soon as its copy appears.
        deadline = time.monotonic() + 60
        while not any(p.name.startswith("import") for p in incoming_files(node.storage)):
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.001)
        proc.send_signal(signal.SIGINT)
        output, errors = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 130, errors
    assert "Traceback" not in errors
    summary = json.loads(output)
    assert summary["interrupted"] is True
    # It was finished (stored, coerced, counted), and nothing after it was started.
    files = indexed(node)
    assert list(files) == [big.SOPInstanceUID]
    assert summary["stored"] == 1 and summary["total"] == 1
    assert dcmread(files[big.SOPInstanceUID], stop_before_pixels=True).InstitutionName == \
        "SCANNED HERE"
    assert incoming_files(node.storage) == []
    with node.db.session() as session:
        [row] = activity.query(session, kinds=["import"])
    assert row.count == 1
