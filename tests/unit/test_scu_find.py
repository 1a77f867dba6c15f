"""`pacsnode query`'s pure helpers: the identifier it sends, the model, the answers' flattening."""

from __future__ import annotations

import pytest
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filereader import read_dataset
from pydicom.filewriter import write_dataset

from node.scu.find import FindError, flatten, identifier, model_for, parse_key, status_words


def test_study_level_sends_the_usual_return_keys_and_the_keys_asked_for() -> None:
    ds = identifier("STUDY", ["PatientID=PID1", "0008,0050=ACC*", "ReferringPhysicianName"])
    assert ds.QueryRetrieveLevel == "STUDY" and ds.SpecificCharacterSet == "ISO_IR 192"
    assert ds.PatientID == "PID1" and ds.AccessionNumber == "ACC*"
    assert "ReferringPhysicianName" in ds and ds.ReferringPhysicianName in (None, "")
    usual = {"PatientName", "PatientBirthDate", "StudyDate", "StudyTime", "StudyDescription",
             "ModalitiesInStudy", "StudyInstanceUID", "NumberOfStudyRelatedInstances"}
    assert set(ds.dir()) == usual | {"SpecificCharacterSet", "QueryRetrieveLevel", "PatientID",
                                     "AccessionNumber", "ReferringPhysicianName"}
    assert all(ds[keyword].value in (None, "") for keyword in usual)


def test_image_level_carries_the_study_and_series_uids() -> None:
    ds = identifier("IMAGE", ["SeriesInstanceUID=1.2.3"])
    assert ds.SeriesInstanceUID == "1.2.3"
    assert {"StudyInstanceUID", "SOPInstanceUID", "SOPClassUID", "InstanceNumber"} <= set(ds.dir())


def test_numbers_and_several_values_get_their_types() -> None:
    ds = identifier("SERIES", ["SeriesNumber=3", "Modality=CT\\MR", "(0028,0010)=512"])
    assert ds.SeriesNumber == 3 and list(ds.Modality) == ["CT", "MR"] and ds.Rows == 512


@pytest.mark.parametrize(("key", "words"), [
    ("Nonsense=1", "neither a DICOM keyword nor a tag"),
    ("0011,00=1", "neither a DICOM keyword nor a tag"),
    ("Rows=many", "takes a number"),
    ("ReferencedStudySequence=x", "sequence"),
])
def test_bad_keys_are_named(key: str, words: str) -> None:
    with pytest.raises(FindError, match=words):
        identifier("STUDY", [key])


def test_parse_key_without_value_is_a_return_key() -> None:
    assert parse_key("PatientID") == (0x00100020, None)
    assert parse_key("PatientID=") == (0x00100020, "")


def test_patient_level_needs_the_patient_root_model() -> None:
    assert model_for("PATIENT", None) == "patient"
    assert model_for("STUDY", None) == "study" and model_for("SERIES", "patient") == "patient"
    with pytest.raises(FindError, match="Patient Root"):
        model_for("PATIENT", "study")
    with pytest.raises(FindError, match="--level"):
        model_for("FRAME", None)


def test_flatten_decodes_with_the_answers_character_set() -> None:
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.QueryRetrieveLevel = "STUDY"
    ds.PatientName = "Müller^Jörg"
    ds.ModalitiesInStudy = ["CT", "SR"]
    ds.StudyDescription = None
    # As an answer comes off the wire: Latin-1 bytes, decoded when read.
    buffer = DicomBytesIO()
    buffer.is_little_endian, buffer.is_implicit_VR = True, False
    write_dataset(buffer, ds)
    assert "Müller".encode("latin-1") in buffer.getvalue()
    raw = read_dataset(DicomBytesIO(buffer.getvalue()), False, True)
    assert flatten(raw) == {"PatientName": "Müller^Jörg", "ModalitiesInStudy": ["CT", "SR"],
                            "StudyDescription": ""}


def test_status_words_name_the_status_and_the_comment() -> None:
    assert status_words(0xA700, "narrow the query") == (
        "status 0xA700 (Refused: Out of Resources): narrow the query")
    assert status_words(0xC123) == "status 0xC123 (Unable to Process)"
