"""C-FIND answered from the index: each matching rule and setting, with exact match sets."""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest
from pydicom.dataset import Dataset
from pynetdicom import AE
from pynetdicom.sop_class import (
    PatientRootQueryRetrieveInformationModelFind as PatientRootFind,
)
from pynetdicom.sop_class import (
    StudyRootQueryRetrieveInformationModelFind as StudyRootFind,
)

from tests.conftest import RunningNode, dcmtk_env
from tests.dicomgen import Patient, make_instance, uid
from tests.indexfill import fill
from tests.scu import associate, identifier, statuses, store


@dataclass
class Archive:
    studies: dict[str, str]  # name -> Study Instance UID
    series: dict[str, str]  # name -> Series Instance UID
    sops: dict[str, list[str]]  # series name -> SOP Instance UIDs


SMITH = Patient("PID1", "SMITH^JOHN", "19600101", "M")
SMITHSON = Patient("PID2", "SMITHSON^ANNA", "19700505", "F")
DOE = Patient("PID3", "doe^jane", "19800808", "F")


def populate(node: RunningNode) -> Archive:
    """S1: SMITH, CT (3) + SR (1); S2: SMITHSON, MR (2); S3: doe, CT (1); S4: doe, no date, no
    accession, US (1)."""
    layout = [
        ("S1", SMITH, "20240110", "ACC1", [("S1-CT", "CT", 3), ("S1-SR", "SR", 1)]),
        ("S2", SMITHSON, "20240120", "ACC2", [("S2-MR", "MR", 2)]),
        ("S3", DOE, "20240201", "ACC3", [("S3-CT", "CT", 1)]),
        ("S4", DOE, "", "", [("S4-US", "US", 1)]),
    ]
    archive = Archive({}, {}, {})
    datasets = []
    for name, patient, date, accession, series_list in layout:
        study_uid = archive.studies[name] = uid()
        for series_name, modality, count in series_list:
            series_uid = archive.series[series_name] = uid()
            archive.sops[series_name] = []
            for n in range(count):
                ds = make_instance(study_uid=study_uid, series_uid=series_uid, patient=patient,
                                   modality=modality, accession=accession, instance_number=n + 1)
                ds.StudyDate = date
                archive.sops[series_name].append(ds.SOPInstanceUID)
                datasets.append(ds)
    assert set(statuses(store(node.port, datasets))) == {0}
    return archive


@pytest.fixture
def archive(node: RunningNode) -> Archive:
    return populate(node)


def find(node: RunningNode, level: str, model: str = "study", calling: str = "FINDER",
         **keys: object) -> tuple[list[Dataset], int]:
    """(pending identifiers, final status) of one C-FIND."""
    sop_class = StudyRootFind if model == "study" else PatientRootFind
    assoc = associate(node.port, calling=calling, contexts=[sop_class])
    assert assoc.is_established
    query = identifier(level, keys)
    found, final = [], -1
    try:
        for status, answer in assoc.send_c_find(query, sop_class):
            if status.Status in (0xFF00, 0xFF01):
                found.append(answer)
            else:
                final = int(status.Status)
    finally:
        assoc.release()
    return found, final


def study_names(archive: Archive, found: list[Dataset]) -> set[str]:
    by_uid = {v: k for k, v in archive.studies.items()}
    return {by_uid[ds.StudyInstanceUID] for ds in found}


def studies(node: RunningNode, archive: Archive, **keys: object) -> set[str]:
    found, final = find(node, "STUDY", **{"StudyInstanceUID": "", **keys})
    assert final == 0
    return study_names(archive, found)


def test_single_value_universal_and_uid_list(node: RunningNode, archive: Archive) -> None:
    assert studies(node, archive) == {"S1", "S2", "S3", "S4"}
    assert studies(node, archive, PatientID="PID1") == {"S1"}
    assert studies(node, archive, AccessionNumber="ACC2") == {"S2"}
    both = f"{archive.studies['S1']}\\{archive.studies['S3']}"
    assert studies(node, archive, StudyInstanceUID=both) == {"S1", "S3"}
    assert studies(node, archive, PatientID="NOBODY") == set()


def test_wildcards_and_component_wise_names(node: RunningNode, archive: Archive) -> None:
    assert studies(node, archive, PatientName="SMITH*") == {"S1", "S2"}
    assert studies(node, archive, PatientName="smith*") == {"S1", "S2"}  # case-insensitive
    assert studies(node, archive, PatientName="SMITH") == {"S1"}  # family name SMITH
    assert studies(node, archive, PatientName="SMITH^J*") == {"S1"}
    assert studies(node, archive, PatientName="*^ANNA") == {"S2"}
    assert studies(node, archive, PatientName="?OE") == {"S3", "S4"}
    assert studies(node, archive, AccessionNumber="ACC?") == {"S1", "S2", "S3"}
    assert studies(node, archive, PatientID="PID*") == {"S1", "S2", "S3", "S4"}


def test_date_ranges(node: RunningNode, archive: Archive) -> None:
    assert studies(node, archive, StudyDate="20240115-") == {"S2", "S3"}
    assert studies(node, archive, StudyDate="-20240115") == {"S1"}
    assert studies(node, archive, StudyDate="20240110-20240120") == {"S1", "S2"}
    assert studies(node, archive, StudyDate="20240201") == {"S3"}
    assert studies(node, archive, StudyTime="1000-1030") == {"S1", "S2", "S3", "S4"}
    assert studies(node, archive, StudyTime="1100-") == set()


def test_case_sensitive_matching(node: RunningNode, archive: Archive) -> None:
    assert node.cli("partition", "edit", "PACSNODE", "--case-sensitive", "on").exit_code == 0
    assert studies(node, archive, PatientName="smith*") == set()
    assert studies(node, archive, PatientName="SMITH*") == {"S1", "S2"}
    assert studies(node, archive, PatientName="doe*") == {"S3", "S4"}
    assert studies(node, archive, PatientName="DOE*") == set()
    assert node.cli("partition", "edit", "PACSNODE", "--case-sensitive", "default").exit_code == 0
    assert studies(node, archive, PatientName="DOE*") == {"S3", "S4"}


def test_empty_matching(node: RunningNode, archive: Archive) -> None:
    assert studies(node, archive, AccessionNumber="ACC*") == {"S1", "S2", "S3"}
    assert studies(node, archive, StudyDate="20240101-") == {"S1", "S2", "S3"}
    assert node.cli("partition", "edit", "PACSNODE", "--empty-matching", "on").exit_code == 0
    assert studies(node, archive, AccessionNumber="ACC*") == {"S1", "S2", "S3", "S4"}
    assert studies(node, archive, StudyDate="20240101-") == {"S1", "S2", "S3", "S4"}


def test_modalities_in_study_and_computed_counts(node: RunningNode, archive: Archive) -> None:
    assert studies(node, archive, ModalitiesInStudy="SR") == {"S1"}
    assert studies(node, archive, ModalitiesInStudy="CT") == {"S1", "S3"}
    assert studies(node, archive, ModalitiesInStudy="MR\\US") == {"S2", "S4"}
    [s1], _ = find(node, "STUDY", StudyInstanceUID=archive.studies["S1"], ModalitiesInStudy="",
                   NumberOfStudyRelatedSeries="", NumberOfStudyRelatedInstances="")
    assert list(s1.ModalitiesInStudy) == ["CT", "SR"]
    assert (s1.NumberOfStudyRelatedSeries, s1.NumberOfStudyRelatedInstances) == (2, 4)
    series, _ = find(node, "SERIES", StudyInstanceUID=archive.studies["S1"],
                     SeriesInstanceUID="", Modality="", NumberOfSeriesRelatedInstances="")
    assert {(s.Modality, s.NumberOfSeriesRelatedInstances) for s in series} == {("CT", 3),
                                                                                ("SR", 1)}
    patients, _ = find(node, "PATIENT", model="patient", PatientID="PID3", PatientName="",
                       NumberOfPatientRelatedStudies="", NumberOfPatientRelatedSeries="",
                       NumberOfPatientRelatedInstances="")
    [doe] = patients
    assert str(doe.PatientName) == "doe^jane"
    assert (doe.NumberOfPatientRelatedStudies, doe.NumberOfPatientRelatedSeries,
            doe.NumberOfPatientRelatedInstances) == (2, 2, 2)


def test_only_requested_keys_are_returned(node: RunningNode, archive: Archive) -> None:
    [s2], _ = find(node, "STUDY", StudyInstanceUID=archive.studies["S2"], PatientName="",
                   StudyDescription="", ReferencedStudySequence=[])
    keys = {e.keyword for e in s2}
    assert keys == {"QueryRetrieveLevel", "SpecificCharacterSet", "RetrieveAETitle",
                    "StudyInstanceUID", "PatientName", "StudyDescription",
                    "ReferencedStudySequence"}
    assert s2.RetrieveAETitle == "PACSNODE"
    assert str(s2.PatientName) == "SMITHSON^ANNA"
    assert list(s2.ReferencedStudySequence) == []  # not indexed: returned empty


def test_every_level_of_both_models(node: RunningNode, archive: Archive) -> None:
    patients, _ = find(node, "PATIENT", model="patient", PatientName="SMITH*", PatientID="")
    assert {p.PatientID for p in patients} == {"PID1", "PID2"}
    for model in ("patient", "study"):
        keys = {"PatientID": "PID1"} if model == "patient" else {}
        found, _ = find(node, "STUDY", model=model, StudyInstanceUID="", **keys)
        assert len(found) == (1 if model == "patient" else 4)
    series, _ = find(node, "SERIES", StudyInstanceUID=archive.studies["S1"],
                     SeriesInstanceUID="")
    assert {s.SeriesInstanceUID for s in series} == {archive.series["S1-CT"],
                                                     archive.series["S1-SR"]}
    images, _ = find(node, "IMAGE", StudyInstanceUID=archive.studies["S1"],
                     SeriesInstanceUID=archive.series["S1-CT"], SOPInstanceUID="",
                     InstanceNumber="")
    assert {i.SOPInstanceUID for i in images} == set(archive.sops["S1-CT"])
    assert sorted(int(i.InstanceNumber) for i in images) == [1, 2, 3]
    # Keys of a lower level than the query's are not matched.
    found, _ = find(node, "STUDY", StudyInstanceUID="", Modality="XX")
    assert len(found) == 4


def test_query_limit_ends_with_a_status(node: RunningNode, archive: Archive) -> None:
    assert node.cli("partition", "edit", "PACSNODE", "--query-limit", "2").exit_code == 0
    found, final = find(node, "STUDY", StudyInstanceUID="")
    assert (len(found), final) == (2, 0xA700)
    found, final = find(node, "STUDY", StudyInstanceUID="", PatientID="PID3")
    assert (len(found), final) == (2, 0)  # exactly at the limit is fine


def test_device_without_query_right_is_refused(node: RunningNode, archive: Archive) -> None:
    assert node.cli("device", "add", "NOQUERY", "--no-query").exit_code == 0
    found, final = find(node, "STUDY", calling="NOQUERY", StudyInstanceUID="")
    assert (found, final) == ([], 0x0124)


def test_bad_level_is_a_failure_not_a_crash(node: RunningNode, archive: Archive) -> None:
    found, final = find(node, "WARD", StudyInstanceUID="")
    assert found == [] and 0xC000 <= final <= 0xCFFF


def test_c_cancel_stops_a_running_find(node: RunningNode) -> None:
    with node.db.session() as session:
        from sqlalchemy import select

        from node.db.models import Partition

        partition_id = session.scalar(select(Partition.id))
    assert partition_id is not None
    fill(node.db, partition_id, 200, series_per_study=5, instances_per_series=20)  # 20,000
    ae = AE(ae_title="CANCELLER")
    ae.add_requested_context(StudyRootFind)
    assoc = ae.associate("127.0.0.1", node.port, ae_title="PACSNODE")
    query = Dataset()
    query.QueryRetrieveLevel = "IMAGE"
    query.SOPInstanceUID = ""
    responses = assoc.send_c_find(query, StudyRootFind, msg_id=7)
    count, final = 0, None
    for status, _ in responses:
        if status.Status in (0xFF00, 0xFF01):
            count += 1
            # At the first answer read: this thread may read it long after it arrived (the
            # node shares the process), and a later cancel could come after the last answer.
            if count == 1:
                assoc.send_c_cancel(7, assoc.accepted_contexts[0].context_id)
        else:
            final = int(status.Status)
    assoc.release()
    assert final == 0xFE00, f"final 0x{final:04X} after {count} answers"
    assert count < 20_000


@pytest.mark.interop
def test_dcmtk_findscu(node: RunningNode, archive: Archive, dcmtk: Path, tmp_path: Path
                       ) -> None:
    result = subprocess.run(
        [str(dcmtk / "findscu"), "-S", "-aec", "PACSNODE", "-X", "-od", str(tmp_path),
         "-k", "QueryRetrieveLevel=STUDY", "-k", "PatientName=smith*", "-k", "StudyInstanceUID",
         "-k", "ModalitiesInStudy", "127.0.0.1", str(node.port)],
        env=dcmtk_env(), capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    from pydicom import dcmread

    answers = [dcmread(p, force=True) for p in sorted(tmp_path.glob("rsp*.dcm"))]
    assert study_names(archive, answers) == {"S1", "S2"}


@pytest.fixture
def direct_answers(monkeypatch: pytest.MonkeyPatch) -> list[bool]:
    """Whether each pending answer was sent by FindAnswers (True) or left to pynetdicom."""
    from node.internals.direct_answers import FindAnswers

    sent: list[bool] = []
    original = FindAnswers.send_encoded

    def recording(self: FindAnswers, identifier: bytes) -> bool:
        sent.append(original(self, identifier))
        return sent[-1]

    monkeypatch.setattr(FindAnswers, "send_encoded", recording)
    return sent


def test_answers_are_sent_directly_and_read_back_as_stored(
        node: RunningNode, archive: Archive, direct_answers: list[bool]) -> None:
    found, final = find(node, "STUDY", PatientName="SMITH*", StudyInstanceUID="",
                        ModalitiesInStudy="", NumberOfStudyRelatedInstances="")
    assert final == 0
    assert direct_answers == [True, True]
    by_uid = {str(ds.StudyInstanceUID): ds for ds in found}
    assert set(by_uid) == {archive.studies["S1"], archive.studies["S2"]}
    s1 = by_uid[archive.studies["S1"]]
    assert (str(s1.PatientName), list(s1.ModalitiesInStudy),
            int(s1.NumberOfStudyRelatedInstances)) == ("SMITH^JOHN", ["CT", "SR"], 4)


def test_a_peer_with_a_tiny_maximum_pdu_gets_fragmented_answers(
        node: RunningNode, archive: Archive, direct_answers: list[bool]) -> None:
    ae = AE(ae_title="TINYPDU")
    ae.add_requested_context(StudyRootFind)
    assoc = ae.associate("127.0.0.1", node.port, ae_title="PACSNODE", max_pdu=128)
    assert assoc.is_established
    query = identifier("STUDY", {"PatientName": "SMITH*", "StudyInstanceUID": "",
                                 "StudyDescription": ""})
    found = [answer for status, answer in assoc.send_c_find(query, StudyRootFind)
             if status.Status == 0xFF00]
    assoc.release()
    assert {str(ds.StudyInstanceUID) for ds in found} == {archive.studies["S1"],
                                                         archive.studies["S2"]}
    assert direct_answers == []  # all left to pynetdicom, which fragments them


def test_a_defect_while_answering_is_a_failure_status_not_a_traceback(
        node: RunningNode, archive: Archive, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    """Stands for a bug of the node (a study-level query asking for patient counts once raised
    KeyError in the handler): the requestor gets 0xC000, the log one line, and the
    association and the node go on."""
    from node.scp import qr

    def broken(*args: object) -> object:
        raise KeyError("patient_studies")

    assoc = associate(node.port, calling="FINDER", contexts=[StudyRootFind])
    try:
        with monkeypatch.context() as patch:
            patch.setattr(qr, "answer_values", broken)
            results = list(assoc.send_c_find(identifier("STUDY", {"StudyInstanceUID": ""}),
                                             StudyRootFind))
        assert [int(s.Status) for s, _ in results] == [0xC000]
        assert results[0][0].ErrorComment == "internal error while answering"
        answers = [a for s, a in assoc.send_c_find(identifier("STUDY", {"StudyInstanceUID": ""}),
                                                   StudyRootFind) if s.Status == 0xFF00]
        assert len(answers) == 4
    finally:
        assoc.release()
    assert "Traceback" not in caplog.text
    assert any("C-FIND STUDY from FINDER" in r.getMessage() and "KeyError" in r.getMessage()
               for r in caplog.records if r.levelname == "ERROR")
