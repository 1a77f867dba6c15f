"""C-STORE over real associations: placement, index, duplicates, study matching, coercion."""

from __future__ import annotations

import json
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from pydicom import dcmread
from sqlalchemy import func, select

from node.db.models import Instance, IntegrityItem, Patient, Series, Study
from tests.conftest import RunningNode, incoming_emptied
from tests.dicomgen import Patient as Pt
from tests.dicomgen import make_instance, uid, write_study
from tests.scu import statuses, store


def count(node: RunningNode, model: type) -> int:
    with node.db.session() as s:
        return s.scalar(select(func.count()).select_from(model)) or 0


def integrity_items(node: RunningNode) -> list[IntegrityItem]:
    with node.db.session() as s:
        return list(s.scalars(select(IntegrityItem).order_by(IntegrityItem.id)))


def test_instances_are_stored_at_uid_paths_and_indexed(node: RunningNode, tmp_path: Path) -> None:
    sent = write_study(tmp_path / "in", 3)
    assert statuses(store(node.port, sent)) == [0, 0, 0]

    for path in sent:
        original = dcmread(path)
        rel = (f"PACSNODE/{original.StudyInstanceUID}/{original.SeriesInstanceUID}/"
               f"{original.SOPInstanceUID}.dcm")
        stored = dcmread(node.storage / rel)
        assert stored.PixelData == original.PixelData
        assert stored.PatientName == original.PatientName
        assert str(stored.file_meta.TransferSyntaxUID) == str(original.file_meta.TransferSyntaxUID)
    assert (count(node, Patient), count(node, Study), count(node, Series)) == (1, 1, 1)
    assert count(node, Instance) == 3
    with node.db.session() as s:
        study = s.scalars(select(Study)).one()
        assert (study.patient_name, study.accession_number, study.study_date) == (
            "DOE^JANE", "ACC001", "20240115")
        instance = s.scalars(select(Instance)).first()
        assert instance is not None and instance.calling_ae_title == "TESTSCU"
        assert instance.size == (node.storage / instance.path).stat().st_size
    assert incoming_emptied(node.storage)


def _duplicate_setup(node: RunningNode, policy: str, tmp_path: Path) -> tuple[Path, Path]:
    result = node.cli("partition", "edit", "PACSNODE", "--duplicate-policy", policy)
    assert result.exit_code == 0, result.output
    first = make_instance()
    assert statuses(store(node.port, [first])) == [0]
    stored = (node.storage / "PACSNODE" / first.StudyInstanceUID / first.SeriesInstanceUID
              / f"{first.SOPInstanceUID}.dcm")
    changed = make_instance(study_uid=first.StudyInstanceUID, series_uid=first.SeriesInstanceUID,
                            sop_uid=first.SOPInstanceUID, accession="ACC001", fill=7)
    changed.InstitutionName = "OTHER HOSPITAL"
    path = tmp_path / "dup.dcm"
    changed.save_as(path, enforce_file_format=True)
    return stored, path


def test_duplicate_send_success_keeps_stored_copy(node: RunningNode, tmp_path: Path) -> None:
    stored, dup = _duplicate_setup(node, "send-success", tmp_path)
    before = stored.read_bytes()
    assert statuses(store(node.port, [dup])) == [0]
    assert stored.read_bytes() == before
    assert count(node, Instance) == 1
    assert integrity_items(node) == []


def test_duplicate_reject_answers_failure(node: RunningNode, tmp_path: Path) -> None:
    stored, dup = _duplicate_setup(node, "reject", tmp_path)
    before = stored.read_bytes()
    [rsp] = store(node.port, [dup])
    assert int(rsp.Status) == 0x0111
    assert "duplicate" in rsp.ErrorComment
    assert stored.read_bytes() == before
    assert incoming_emptied(node.storage)


def test_an_instance_sent_again_under_another_study_is_a_duplicate_and_changes_no_study(
        node: RunningNode) -> None:
    result = node.cli("partition", "edit", "PACSNODE", "--duplicate-policy", "reject")
    assert result.exit_code == 0, result.output
    first, other = make_instance(), make_instance()
    assert statuses(store(node.port, [first, other])) == [0, 0]
    # The same SOP Instance UID, once under the other (indexed) study, once under a new one.
    again = [make_instance(study_uid=study, series_uid=uid(), sop_uid=first.SOPInstanceUID)
             for study in (other.StudyInstanceUID, uid())]
    answers = store(node.port, again)
    assert [int(rsp.Status) for rsp in answers] == [0x0111, 0x0111]
    assert all("duplicate" in rsp.ErrorComment for rsp in answers)
    assert (count(node, Study), count(node, Series), count(node, Instance)) == (2, 2, 2)
    with node.db.session() as s:
        assert sorted(s.scalars(select(Study.num_instances))) == [1, 1]
        assert sorted(s.scalars(select(Series.num_instances))) == [1, 1]
    assert incoming_emptied(node.storage)


def test_duplicate_compare_records_differences(node: RunningNode, tmp_path: Path) -> None:
    stored, dup = _duplicate_setup(node, "compare", tmp_path)
    before = stored.read_bytes()
    # An identical copy is not a difference.
    assert statuses(store(node.port, [dcmread(stored)])) == [0]
    assert integrity_items(node) == []
    assert statuses(store(node.port, [dup])) == [0]
    assert stored.read_bytes() == before
    [item] = integrity_items(node)
    assert item.kind == "duplicate-differs"
    differing = {d["keyword"]: d for d in json.loads(item.details)}
    assert set(differing) == {"InstitutionName", "PixelData"}
    assert differing["InstitutionName"]["stored"] == "GENERAL HOSPITAL"
    assert differing["InstitutionName"]["received"] == "OTHER HOSPITAL"
    shown = node.cli("integrity", "show", str(item.id))
    assert shown.exit_code == 0 and "OTHER HOSPITAL" in shown.output
    listed = node.cli("integrity", "list", "--json")
    assert json.loads(listed.output)[0]["kind"] == "duplicate-differs"


def test_study_matching_records_demographic_mismatch(node: RunningNode) -> None:
    study = uid()
    first = make_instance(study_uid=study)
    other = make_instance(study_uid=study, patient=Pt(name="DOE^JOHN", sex="M"))
    assert statuses(store(node.port, [first, other])) == [0, 0]
    [item] = integrity_items(node)
    assert item.kind == "demographics-mismatch"
    assert item.sop_instance_uid == other.SOPInstanceUID
    diffs = {d["keyword"]: (d["stored"], d["received"]) for d in json.loads(item.details)}
    assert diffs == {"PatientName": ("DOE^JANE", "DOE^JOHN"), "PatientSex": ("F", "M")}
    assert count(node, Instance) == 2  # recorded for a person to resolve, not refused


def test_study_matching_only_checks_configured_fields(node: RunningNode) -> None:
    assert node.cli("partition", "edit", "PACSNODE", "--match", "PatientID").exit_code == 0
    study = uid()
    first = make_instance(study_uid=study)
    renamed = make_instance(study_uid=study, patient=Pt(name="DOE^JOHN"))
    other_id = make_instance(study_uid=study, patient=Pt(patient_id="PID999"))
    assert statuses(store(node.port, [first, renamed, other_id])) == [0, 0, 0]
    [item] = integrity_items(node)
    assert item.sop_instance_uid == other_id.SOPInstanceUID
    assert [d["keyword"] for d in json.loads(item.details)] == ["PatientID"]


def test_device_coercion_rules_rewrite_header_not_pixels(node: RunningNode) -> None:
    rules = ["prefix AccessionNumber SITEA-", 'set InstitutionName "SITE A"',
             "remove PatientBirthDate", "copy StudyDescription from AccessionNumber",
             r"replace PatientID ^PID(\d+)$ A\1"]
    args = ["device", "add", "CT1", "--partition", "PACSNODE"]
    for rule in rules:
        args += ["--rule", rule]
    assert node.cli(*args).exit_code == 0
    ds = make_instance(size=128, fill=1234)
    assert statuses(store(node.port, [ds], calling="CT1")) == [0]
    stored = dcmread(node.storage / "PACSNODE" / ds.StudyInstanceUID / ds.SeriesInstanceUID
                     / f"{ds.SOPInstanceUID}.dcm")
    assert stored.AccessionNumber == "SITEA-ACC001"
    assert stored.InstitutionName == "SITE A"
    assert "PatientBirthDate" not in stored
    assert stored.StudyDescription == "SITEA-ACC001"
    assert stored.PatientID == "A001"
    assert stored.PixelData == ds.PixelData
    with node.db.session() as s:
        study = s.scalars(select(Study)).one()
        assert (study.accession_number, study.patient_id, study.patient_birth_date) == (
            "SITEA-ACC001", "A001", "")
    # Another device's images are not coerced.
    ds2 = make_instance()
    assert statuses(store(node.port, [ds2], calling="CT2")) == [0]
    assert dcmread(node.storage / "PACSNODE" / ds2.StudyInstanceUID / ds2.SeriesInstanceUID
                   / f"{ds2.SOPInstanceUID}.dcm").AccessionNumber == "ACC001"
    assert incoming_emptied(node.storage)


def test_device_without_storage_right_is_refused(node: RunningNode) -> None:
    assert node.cli("device", "add", "VIEWER1", "--type", "VIEWER", "--no-storage").exit_code == 0
    [rsp] = store(node.port, [make_instance()], calling="VIEWER1")
    assert int(rsp.Status) == 0x0124
    assert count(node, Instance) == 0


def test_shared_port_routes_by_called_ae(node: RunningNode) -> None:
    result = node.cli("partition", "add", "RESEARCH", "--port", str(node.port))
    assert result.exit_code == 0, result.output
    a, b = make_instance(), make_instance()
    assert statuses(store(node.port, [a], called="PACSNODE")) == [0]
    assert statuses(store(node.port, [b], called="RESEARCH")) == [0]
    assert (node.storage / "PACSNODE" / a.StudyInstanceUID).is_dir()
    assert (node.storage / "RESEARCH" / b.StudyInstanceUID).is_dir()
    assert not (node.storage / "RESEARCH" / a.StudyInstanceUID).exists()
    listing = json.loads(node.cli("partition", "list", "--json").output)
    assert {p["ae_title"]: p["studies"] for p in listing} == {"PACSNODE": 1, "RESEARCH": 1}


def test_one_instance_sent_over_many_associations_at_once_is_stored_once(
        node: RunningNode, tmp_path: Path) -> None:
    # Each sender's copy differs (InstitutionName), so the stored file shows whose it is.
    first = make_instance()
    copies: list[Path] = []
    for n in range(8):
        ds = make_instance(study_uid=first.StudyInstanceUID, series_uid=first.SeriesInstanceUID,
                           sop_uid=first.SOPInstanceUID)
        ds.InstitutionName = f"SENDER {n}"
        path = tmp_path / f"copy{n}.dcm"
        ds.save_as(path, enforce_file_format=True)
        copies.append(path)
    start = threading.Barrier(len(copies))

    def send(path: Path) -> list[int]:
        start.wait()
        return statuses(store(node.port, [path]))

    with ThreadPoolExecutor(len(copies)) as pool:
        results = list(pool.map(send, copies))
    assert results == [[0]] * len(copies)  # the default policy answers duplicates success
    assert count(node, Instance) == 1
    with node.db.session() as s:
        instance = s.scalars(select(Instance)).one()
    stored = dcmread(node.storage / instance.path)  # one sender's copy, whole
    assert stored.SOPInstanceUID == first.SOPInstanceUID
    assert str(stored.InstitutionName).startswith("SENDER ")
    assert instance.size == (node.storage / instance.path).stat().st_size
    assert [p for p in (node.storage / "PACSNODE").rglob("*") if p.is_file()] == [
        node.storage / instance.path]
    assert incoming_emptied(node.storage)
