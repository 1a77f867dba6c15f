"""Index an instance: the attributes C-FIND will need, in patient/study/series/instance rows."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from pydicom.dataset import Dataset
from pydicom.tag import Tag
from sqlalchemy import select
from sqlalchemy.orm import Session

from node.db.models import Instance, Patient, Series, Study, utcnow
from node.dicomtext import element_text

PATIENT_KEYWORDS = ("PatientName", "PatientID", "IssuerOfPatientID", "PatientBirthDate",
                    "PatientSex")
STUDY_KEYWORDS = ("StudyInstanceUID", "StudyDate", "StudyTime", "AccessionNumber", "StudyID",
                  "StudyDescription", "ReferringPhysicianName")
SERIES_KEYWORDS = ("SeriesInstanceUID", "Modality", "SeriesNumber", "SeriesDescription",
                   "BodyPartExamined", "SeriesDate", "SeriesTime")
INSTANCE_KEYWORDS = ("SOPInstanceUID", "SOPClassUID", "InstanceNumber")
INDEX_KEYWORDS = ("SpecificCharacterSet", *PATIENT_KEYWORDS, *STUDY_KEYWORDS, *SERIES_KEYWORDS,
                  *INSTANCE_KEYWORDS)
# What dcmread reads when only indexing (no coercion): everything else is skipped unparsed.
INDEX_TAGS = [Tag(kw) for kw in INDEX_KEYWORDS]

_UID_KEYWORDS = frozenset({"StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID",
                           "SOPClassUID"})
# Column widths (see models): a longer value is cut rather than failing the store.
_WIDTH = {"PatientBirthDate": 8, "StudyDate": 8, "SeriesDate": 8, "AccessionNumber": 16,
          "StudyID": 16, "SeriesNumber": 12, "InstanceNumber": 12, "PatientSex": 16,
          "Modality": 16, "BodyPartExamined": 16, "StudyTime": 16, "SeriesTime": 16,
          "PatientName": 324, "ReferringPhysicianName": 324}


def text_of(ds: Dataset, keyword: str) -> str:
    """An element as index text: '' when absent, cut to its column's width (UIDs never)."""
    text = (element_text(ds, keyword) or "").strip()
    if keyword in _UID_KEYWORDS:
        return text  # never cut: an over-long UID must fail validation, not be shortened
    return text[: _WIDTH.get(keyword, 64)]


@dataclass(frozen=True)
class InstanceAttributes:
    values: dict[str, str]

    def __getitem__(self, keyword: str) -> str:
        return self.values.get(keyword, "")

    @property
    def demographics(self) -> dict[str, str]:
        return {kw: self[kw] for kw in (*PATIENT_KEYWORDS, "AccessionNumber")}


def extract(ds: Dataset) -> InstanceAttributes:
    return InstanceAttributes({kw: text_of(ds, kw) for kw in INDEX_KEYWORDS
                               if kw != "SpecificCharacterSet"})


NAME_COLUMNS = ("name_family", "name_given", "name_middle", "name_prefix", "name_suffix")


def name_components(name: str) -> tuple[str, str, str, str, str]:
    """The five components of a person name's alphabetic group, '' where absent."""
    parts = (name.split("=")[0].split("^") + [""] * 5)[:5]
    return (parts[0][:64], parts[1][:64], parts[2][:64], parts[3][:64], parts[4][:64])


def with_modality(modalities: str, modality: str) -> str:
    """ModalitiesInStudy as stored: backslash-delimited on both ends, so `\\CT\\` is exact."""
    found = {m for m in modalities.split("\\") if m}
    if modality:
        found.add(modality)
    return "\\" + "\\".join(sorted(found)) + "\\" if found else ""


@dataclass(frozen=True)
class StoredStudy:
    study_pk: int
    demographics: dict[str, str]
    is_new: bool
    instance_pk: int


def find_instance(session: Session, partition_id: int, sop_uid: str) -> Instance | None:
    return session.scalar(
        select(Instance).where(Instance.partition_id == partition_id,
                               Instance.sop_instance_uid == sop_uid)
    )


def add_instance(
    session: Session,
    partition_id: int,
    attrs: InstanceAttributes,
    *,
    relpath: str,
    size: int,
    transfer_syntax: str,
    calling_ae: str,
    now: datetime | None = None,
) -> StoredStudy:
    """Insert the instance (and its patient/study/series when new); returns its study.

    The study's demographics are those the study had before this instance, so the caller can
    compare them with the instance's own (study matching).
    """
    now = now or utcnow()
    # FOR UPDATE (PostgreSQL; SQLite has one writer anyway): concurrent associations adding to
    # the same study must not lose each other's counter and modality updates.
    study = session.scalar(
        select(Study).where(Study.partition_id == partition_id,
                            Study.study_instance_uid == attrs["StudyInstanceUID"])
        .with_for_update()
    )
    is_new = study is None
    if study is None:
        patient = _patient(session, partition_id, attrs)
        study = Study(
            partition_id=partition_id,
            patient_pk=patient.id,
            study_instance_uid=attrs["StudyInstanceUID"],
            study_date=attrs["StudyDate"],
            study_time=attrs["StudyTime"],
            accession_number=attrs["AccessionNumber"],
            study_id=attrs["StudyID"],
            study_description=attrs["StudyDescription"],
            referring_physician_name=attrs["ReferringPhysicianName"],
            patient_name=attrs["PatientName"],
            patient_id=attrs["PatientID"],
            issuer_of_patient_id=attrs["IssuerOfPatientID"],
            patient_birth_date=attrs["PatientBirthDate"],
            patient_sex=attrs["PatientSex"],
            received_at=now,
            updated_at=now,
            num_series=0,
            num_instances=0,
            modalities="",
        )
        session.add(study)
        session.flush()
    else:
        study.updated_at = now
    stored = {
        "PatientName": study.patient_name,
        "PatientID": study.patient_id,
        "IssuerOfPatientID": study.issuer_of_patient_id,
        "PatientBirthDate": study.patient_birth_date,
        "PatientSex": study.patient_sex,
        "AccessionNumber": study.accession_number,
    }
    series = session.scalar(
        select(Series).where(Series.study_pk == study.id,
                             Series.series_instance_uid == attrs["SeriesInstanceUID"])
    )
    if series is None:
        series = Series(
            study_pk=study.id,
            series_instance_uid=attrs["SeriesInstanceUID"],
            modality=attrs["Modality"],
            series_number=attrs["SeriesNumber"],
            series_description=attrs["SeriesDescription"],
            body_part_examined=attrs["BodyPartExamined"],
            series_date=attrs["SeriesDate"],
            series_time=attrs["SeriesTime"],
            num_instances=0,
        )
        session.add(series)
        session.flush()
        study.num_series += 1
        study.modalities = with_modality(study.modalities, attrs["Modality"])
    series.num_instances += 1
    study.num_instances += 1
    instance = Instance(
        partition_id=partition_id,
        series_pk=series.id,
        sop_instance_uid=attrs["SOPInstanceUID"],
        sop_class_uid=attrs["SOPClassUID"],
        instance_number=attrs["InstanceNumber"],
        transfer_syntax_uid=transfer_syntax,
        path=relpath,
        size=size,
        calling_ae_title=calling_ae,
        received_at=now,
    )
    session.add(instance)
    session.flush()
    return StoredStudy(study.id, stored, is_new, instance.id)


def _patient(session: Session, partition_id: int, attrs: InstanceAttributes) -> Patient:
    patient = session.scalar(
        select(Patient).where(
            Patient.partition_id == partition_id,
            Patient.patient_id == attrs["PatientID"],
            Patient.issuer_of_patient_id == attrs["IssuerOfPatientID"],
        )
    )
    if patient is None:
        patient = Patient(
            partition_id=partition_id,
            patient_id=attrs["PatientID"],
            issuer_of_patient_id=attrs["IssuerOfPatientID"],
            patient_name=attrs["PatientName"],
            patient_birth_date=attrs["PatientBirthDate"],
            patient_sex=attrs["PatientSex"],
            **dict(zip(NAME_COLUMNS, name_components(attrs["PatientName"]), strict=True)),
        )
        session.add(patient)
        session.flush()
    return patient
