"""C-FIND on real-world data: names in every script and component group, patients without an
ID, values kept as received (issue 24: pydicom's character-set files, anonymised studies)."""

from __future__ import annotations

import json
from pathlib import Path

import pydicom
import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset

from tests.conftest import RunningNode
from tests.dicomgen import Patient, make_instance, uid
from tests.integration.test_find import find
from tests.scu import send_files, statuses, store

CHARSETS = Path(pydicom.__file__).parent / "data" / "charset_files"
# The files of one study each (chrFrenMulti and chrJapMultiExplicitIR6 repeat a study).
NAMED = ("chrArab", "chrFren", "chrGerm", "chrGreek", "chrH31", "chrH32", "chrHbrw", "chrI2",
         "chrJapMulti", "chrKoreanMulti", "chrRuss", "chrX1", "chrX2")


@pytest.fixture
def charset_studies(node: RunningNode) -> dict[str, Dataset]:
    """File name -> its header as pydicom reads it, each file stored as its own bytes."""
    paths = [CHARSETS / f"{name}.dcm" for name in NAMED]
    # chrJapMulti's file meta names another SOP instance than its data set, and pynetdicom
    # takes a file's request from its meta: it goes as the data set pydicom reads.
    odd = CHARSETS / "chrJapMulti.dcm"
    responses = send_files(node.port, [path for path in paths if path != odd])
    responses[odd] = store(node.port, [dcmread(odd)])[0]
    assert {path.stem: int(r.Status) for path, r in responses.items()} == dict.fromkeys(NAMED, 0)
    return {path.stem: dcmread(path, stop_before_pixels=True) for path in paths}


def found_studies(node: RunningNode, headers: dict[str, Dataset], level: str = "STUDY",
                  **keys: str) -> set[str]:
    """The files whose studies a query finds; each answer names its patient as the file does."""
    by_uid = {str(ds.StudyInstanceUID): name for name, ds in headers.items()}
    answers, final = find(node, level, **{"StudyInstanceUID": "", "PatientName": "", **keys})
    assert final == 0
    for answer in answers:
        name = by_uid[str(answer.StudyInstanceUID)]
        assert str(answer.PatientName) == str(headers[name].PatientName)
    return {by_uid[str(answer.StudyInstanceUID)] for answer in answers}


NAME_QUERIES: list[tuple[str, set[str]]] = [
    # Case-insensitive (the default) in every script that has case.
    ("Διονυσιος", {"chrGreek"}), ("ΔΙΟΝΥΣΙΟΣ", {"chrGreek"}), ("διονυσιος", {"chrGreek"}),
    ("Buc^Jérôme", {"chrFren"}), ("buc^jérôme", {"chrFren"}), ("BUC^JÉRÔME", {"chrFren"}),
    ("Äneas^Rüdiger", {"chrGerm"}), ("äneas^rüdiger", {"chrGerm"}),
    ("Люк*", {"chrRuss"}), ("люк*", {"chrRuss"}), ("ЛЮКCEМБYPГ", {"chrRuss"}),  # noqa: RUF001
    ("?neas", {"chrGerm"}), ("b?c", {"chrFren"}),
    ("قباني^لنزار", {"chrArab"}), ("שרון^דבורה", {"chrHbrw"}),
    # Each component group of a stored name.
    ("山田^太郎", {"chrH31", "chrH32"}), ("やまだ^たろう", {"chrH31", "chrH32", "chrJapMulti"}),
    ("Yamada^Tarou", {"chrH31"}), ("yamada*", {"chrH31"}), ("ﾔﾏﾀﾞ^ﾀﾛｳ", {"chrH32"}),
    ("홍^길동", {"chrI2"}), ("hong^gildong", {"chrI2"}), ("洪*", {"chrI2"}),
    ("김희중", {"chrKoreanMulti"}),
    ("Wang^XiaoDong", {"chrX1", "chrX2"}), ("王^小東", {"chrX1"}), ("王^小东", {"chrX2"}),
    # A value of several groups asks each of them of the same group of the stored name.
    ("=山田^太郎", {"chrH31", "chrH32"}), ("==やまだ", {"chrH31", "chrH32"}),
    ("Yamada^Tarou=山田", {"chrH31"}), ("Wang=王^小东", {"chrX2"}), ("山田=*", set()),
    ("Buc^Jérômes", set()), ("Jerome", set()),
]


def test_names_are_found_in_every_script_and_group(
        node: RunningNode, charset_studies: dict[str, Dataset]) -> None:
    wrong = {value: found for value, files in NAME_QUERIES
             if (found := found_studies(node, charset_studies, PatientName=value)) != files}
    assert wrong == {}


def test_a_patient_level_query_finds_names_in_every_script(
        node: RunningNode, charset_studies: dict[str, Dataset]) -> None:
    patients, final = find(node, "PATIENT", model="patient", PatientName="ЛЮК*", PatientID="")
    assert final == 0
    assert [p.PatientID for p in patients] == ["SCSRUSS"]
    patients, _ = find(node, "PATIENT", model="patient", PatientName="やまだ^たろう",
                       PatientID="")
    assert sorted(p.PatientID for p in patients) == ["2008-4", "H31EXAMPLE", "H32EXAMPLE"]


def test_case_sensitive_matching_holds_in_every_script(
        node: RunningNode, charset_studies: dict[str, Dataset]) -> None:
    assert node.cli("partition", "edit", "PACSNODE", "--case-sensitive", "on").exit_code == 0
    assert found_studies(node, charset_studies, PatientName="Buc^Jérôme") == {"chrFren"}
    assert found_studies(node, charset_studies, PatientName="buc^jérôme") == set()
    assert found_studies(node, charset_studies, PatientName="BUC^JÉRÔME") == set()
    assert found_studies(node, charset_studies, PatientName="Διονυσ*") == {"chrGreek"}
    assert found_studies(node, charset_studies, PatientName="ΔΙΟΝΥΣ*") == set()
    assert found_studies(node, charset_studies, PatientID="scs*") == set()
    assert len(found_studies(node, charset_studies, PatientID="SCS*")) == 6


def test_text_keys_ignore_case_in_every_script(node: RunningNode) -> None:
    ds = make_instance(patient=Patient("pàtient-ß", "Ölund^Åsa", "19700101", "F"),
                       accession="äcc-1")
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.StudyDescription = "Schädel nativ"
    ds.ReferringPhysicianName = "Ιατρός^Γιώργος"
    assert statuses(store(node.port, [ds])) == [0]
    for keys in ({"PatientID": "PÀTIENT-ß"}, {"AccessionNumber": "ÄCC-1"},
                 {"StudyDescription": "SCHÄDEL*"}, {"ReferringPhysicianName": "ιατρός"},
                 {"PatientName": "ÖLUND^ÅSA"}):
        answers, final = find(node, "STUDY", StudyInstanceUID="", **keys)
        assert (final, [a.StudyInstanceUID for a in answers]) == (0, [ds.StudyInstanceUID]), keys


def test_studies_without_a_patient_id_keep_their_own_patient(node: RunningNode) -> None:
    """Anonymised studies (no Patient ID) are never merged into one patient: each answers
    with, and is found by, the name it was received with."""
    names = ["Anonymized", "Test^S R", "Last Name^First Name"]
    studies = {}
    for name in names:
        ds = make_instance(patient=Patient("", name, "", ""))
        studies[name] = ds.StudyInstanceUID
        assert statuses(store(node.port, [ds])) == [0]
    for name in names:
        answers, final = find(node, "STUDY", StudyInstanceUID="", PatientName=name,
                              PatientID="")
        assert final == 0
        assert [(a.StudyInstanceUID, str(a.PatientName)) for a in answers] == [
            (studies[name], name)]
    patients, _ = find(node, "PATIENT", model="patient", PatientID="", PatientName="",
                       NumberOfPatientRelatedStudies="")
    assert sorted((str(p.PatientName), p.NumberOfPatientRelatedStudies) for p in patients) \
        == sorted((name, 1) for name in names)
    result = node.cli("integrity", "list", "--json")
    assert result.exit_code == 0 and json.loads(result.stdout) == []


def test_a_study_answers_with_its_own_demographics_and_a_difference_is_queued(
        node: RunningNode) -> None:
    """Two studies of one Patient ID under different names: each study answers with the
    demographics it was received with, the patient with the first, and the second study
    goes to the integrity queue."""
    first = make_instance(patient=Patient("PID9", "SMITH^JOHN", "19600101", "M"))
    second = make_instance(patient=Patient("PID9", "SMYTHE^JOHN", "19600102", "M"))
    assert statuses(store(node.port, [first, second])) == [0, 0]
    for name, ds in (("SMITH^JOHN", first), ("SMYTHE^JOHN", second)):
        answers, _ = find(node, "STUDY", StudyInstanceUID="", PatientName=name,
                          PatientBirthDate="")
        assert [(a.StudyInstanceUID, str(a.PatientName), a.PatientBirthDate)
                for a in answers] == [(ds.StudyInstanceUID, name, ds.PatientBirthDate)]
    answers, _ = find(node, "STUDY", StudyInstanceUID="", PatientBirthDate="19600102")
    assert [a.StudyInstanceUID for a in answers] == [second.StudyInstanceUID]
    patients, _ = find(node, "PATIENT", model="patient", PatientID="PID9", PatientName="",
                       NumberOfPatientRelatedStudies="")
    assert [(str(p.PatientName), p.NumberOfPatientRelatedStudies) for p in patients] == [
        ("SMITH^JOHN", 2)]
    result = node.cli("integrity", "list", "--json")
    assert result.exit_code == 0
    items = json.loads(result.stdout)
    assert [(i["kind"], i["study_instance_uid"], {d["keyword"]: (d["stored"], d["received"])
                                                  for d in i["differences"]})
            for i in items] == [("patient-mismatch", second.StudyInstanceUID, {
                "PatientName": ("SMITH^JOHN", "SMYTHE^JOHN"),
                "PatientBirthDate": ("19600101", "19600102")})]


def test_values_are_indexed_and_returned_as_received(node: RunningNode) -> None:
    """An old-style date is kept whole and found as it was sent; a date range holds dates
    only; values longer than the standard allows are not cut."""
    old = make_instance()
    old.StudyDate = "1997.04.24"
    old.AccessionNumber = "ACCESSION-LONGER-THAN-16"
    old.StudyDescription = "D" * 100
    new = make_instance()
    new.StudyDate = "19970424"
    assert statuses(store(node.port, [old, new])) == [0, 0]
    answers, _ = find(node, "STUDY", StudyInstanceUID=old.StudyInstanceUID, StudyDate="",
                      AccessionNumber="", StudyDescription="")
    [answer] = answers
    assert (answer.get("StudyDate"), answer.AccessionNumber, answer.StudyDescription) == (
        "1997.04.24", "ACCESSION-LONGER-THAN-16", "D" * 100)
    for date, expected in (("1997.04.24", {old.StudyInstanceUID}),
                           ("19970424", {new.StudyInstanceUID}),
                           ("19970101-19971231", {new.StudyInstanceUID}),
                           ("19960101-19971231", {new.StudyInstanceUID}),
                           ("-19971231", {new.StudyInstanceUID})):
        answers, _ = find(node, "STUDY", StudyInstanceUID="", StudyDate=date)
        assert {a.StudyInstanceUID for a in answers} == expected, date
    answers, _ = find(node, "STUDY", StudyInstanceUID="",
                      AccessionNumber="accession-longer*")
    assert [a.StudyInstanceUID for a in answers] == [old.StudyInstanceUID]


def test_a_study_level_query_may_ask_for_patient_counts(node: RunningNode) -> None:
    ds = make_instance(study_uid=uid())
    assert statuses(store(node.port, [ds])) == [0]
    answers, final = find(node, "STUDY", StudyInstanceUID="", NumberOfPatientRelatedStudies="")
    assert final == 0
    assert [a.NumberOfPatientRelatedStudies for a in answers] == [1]
