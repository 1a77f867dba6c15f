"""C-FIND answers built with pre-encoded values encode exactly as the same values set on a
pydicom Dataset do, in every transfer syntax an answer may use; answers packed without pydicom
(`encoded_identifier`) are byte for byte what pydicom writes, or not packed at all."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest
from pydicom.dataset import Dataset
from pynetdicom.dsutils import encode

from node.query.conditions import parse_identifier
from node.query.index import answer_values, encoded_identifier, identifier

PATIENT = SimpleNamespace(patient_name="MÜLLER^JÖRG=ミュラー", patient_id="P0000001",
                          issuer_of_patient_id="", patient_birth_date="19700101",
                          patient_sex="F")
STUDY = SimpleNamespace(
    study_instance_uid="1.2.826.0.1.3680043.10.1457.12345",  # odd length: padded with NUL
    study_date="20240115", study_time="101500", accession_number="ACC1",
    study_id="", study_description="Thorax ünd Abdomen", referring_physician_name="DR^WHO",
    modalities="\\CT\\MR\\", num_series=2, num_instances=17,
    # The demographics the study was received with (what a study answers with).
    **vars(PATIENT))
SERIES = SimpleNamespace(series_instance_uid="1.2.3.4", modality="CT", series_number="1.0",
                         series_description="AXIAL", body_part_examined="CHEST",
                         series_date="", series_time="", num_instances=17)


class Row:
    def __init__(self, **mapping: Any) -> None:
        self._mapping = mapping


def query(level: str, *keywords: str) -> Any:
    ds = Dataset()
    ds.QueryRetrieveLevel = level
    for keyword in keywords:
        setattr(ds, keyword, None)
    return parse_identifier(ds)


def as_pydicom_sets_it(answer: Dataset) -> Dataset:
    """The same keys and values set the plain pydicom way."""
    reference = Dataset()
    for element in answer:
        keyword, value = element.keyword, element.value
        setattr(reference, keyword, value if value != "" else None)
        if reference[keyword].VR == "SQ" and reference[keyword].value is None:
            reference[keyword].value = []
    return reference


STUDY_KEYS = ("StudyInstanceUID", "StudyDate", "StudyTime", "AccessionNumber", "StudyID",
              "StudyDescription", "ReferringPhysicianName", "ModalitiesInStudy",
              "NumberOfStudyRelatedSeries", "NumberOfStudyRelatedInstances", "PatientName",
              "PatientID", "IssuerOfPatientID", "PatientBirthDate", "PatientSex",
              "InstanceAvailability", "ReferencedStudySequence", "OtherPatientIDs")


@pytest.mark.parametrize(("implicit", "little"), [(False, True), (True, True), (False, False)])
def test_study_answers_encode_as_pydicom_encodes_them(implicit: bool, little: bool) -> None:
    row = Row(Patient=PATIENT, Study=STUDY)
    answer = identifier(answer_values(query("STUDY", *STUDY_KEYS), row, "PACSNODE"),
                        implicit_vr=implicit,
                        little_endian=little)
    assert answer.PatientName == PATIENT.patient_name
    assert list(answer.ModalitiesInStudy) == ["CT", "MR"]
    assert answer.NumberOfStudyRelatedInstances == 17
    assert answer.ReferencedStudySequence == []
    assert encode(answer, implicit, little) == encode(as_pydicom_sets_it(answer), implicit,
                                                      little)


def test_series_answers_with_values_pydicom_converts_itself() -> None:
    row = Row(Patient=PATIENT, Study=STUDY, Series=SERIES)
    answer = identifier(answer_values(
        query("SERIES", "SeriesInstanceUID", "SeriesNumber", "Modality", "SeriesDate",
              "NumberOfSeriesRelatedInstances"), row, "PACSNODE"))
    assert answer.SeriesNumber == 1  # an IS held as text: set through pydicom
    assert "SeriesDate" in answer and answer.SeriesDate == ""
    assert encode(answer, False, True) == encode(as_pydicom_sets_it(answer), False, True)


def test_a_key_whose_vr_depends_on_other_elements_is_returned_empty() -> None:
    # Raw elements skip pydicom's ambiguous-VR correction, and "US or SS" cannot be encoded
    # in explicit VR: the answer must pick a VR itself (else it fails with 0xC312).
    answer = identifier(answer_values(query("STUDY", "StudyInstanceUID",
                                            "SmallestImagePixelValue"),
                                      Row(Patient=PATIENT, Study=STUDY), "PACSNODE"))
    encoded = encode(answer, False, True)
    assert encoded is not None
    assert b"\x28\x00\x06\x01US\x00\x00" in encoded  # (0028,0106) US, length 0


SERIES_INTEGERS = SimpleNamespace(**{**vars(SERIES), "series_number": 3})


@pytest.mark.parametrize("implicit", [False, True])
@pytest.mark.parametrize(("level", "keys", "row"), [
    ("STUDY", STUDY_KEYS, Row(Patient=PATIENT, Study=STUDY)),
    ("STUDY", ("StudyInstanceUID", "SmallestImagePixelValue", "RetrieveAETitle"),
     Row(Patient=PATIENT, Study=STUDY)),
    ("SERIES", ("SeriesInstanceUID", "SeriesNumber", "Modality", "SeriesDate",
                "SeriesDescription", "NumberOfSeriesRelatedInstances", "InstanceAvailability"),
     Row(Patient=PATIENT, Study=STUDY, Series=SERIES_INTEGERS)),
])
def test_packed_answers_are_what_pydicom_writes(level: str, keys: tuple[str, ...], row: Row,
                                                implicit: bool) -> None:
    asked = query(level, *keys)
    pairs = answer_values(asked, row, "PACSNODE")
    packed = encoded_identifier(pairs, implicit_vr=implicit)
    assert packed is not None
    assert packed == encode(identifier(pairs, implicit_vr=implicit),
                            implicit, True)


def test_an_answer_with_a_value_pydicom_must_convert_is_not_packed() -> None:
    # SeriesNumber held as the text "1.0" (an IS): pydicom converts it, so it builds the answer.
    asked = query("SERIES", "SeriesInstanceUID", "SeriesNumber")
    row = Row(Patient=PATIENT, Study=STUDY, Series=SERIES)
    assert encoded_identifier(answer_values(asked, row, "PACSNODE"), implicit_vr=False) is None
