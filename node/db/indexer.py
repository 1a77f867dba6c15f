"""Index an instance: the attributes C-FIND will need, in patient/study/series/instance rows."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime

from pydicom.datadict import dictionary_VR
from pydicom.dataset import Dataset
from pydicom.tag import Tag
from sqlalchemy import Connection, Table, bindparam, insert, select, update
from sqlalchemy.orm import Session

from node.db.models import (
    KEY_SUFFIX,
    PN_WIDTH,
    TEXT_WIDTH,
    Instance,
    Patient,
    PersonName,
    Series,
    Study,
    utcnow,
)
from node.db.prepared import Prepared
from node.db.tables import table
from node.dicomtext import element_text, fold, name_groups

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
# The same elements for header_scan: tag -> (keyword, the VR pydicom reads them as).
INDEX_ELEMENTS = {int(tag): (kw, dictionary_VR(tag).encode())
                  for kw, tag in zip(INDEX_KEYWORDS, INDEX_TAGS, strict=True)}

_UID_KEYWORDS = frozenset({"StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID",
                           "SOPClassUID"})
# Person names: their columns are wider, and they are matched component group by component
# group (the person_names rows).
NAME_KEYWORDS = ("PatientName", "ReferringPhysicianName")


def index_text(keyword: str, text: str | None) -> str:
    """An element's text as indexed: '' when absent, otherwise as received (surrounding spaces
    aside); only a value longer than any conformant one is cut, to its column's width, UIDs
    never: an over-long UID must fail validation, not be shortened."""
    text = (text or "").strip()
    if keyword in _UID_KEYWORDS:
        return text
    return text[: PN_WIDTH if keyword in NAME_KEYWORDS else TEXT_WIDTH]


def text_of(ds: Dataset, keyword: str) -> str:
    return index_text(keyword, element_text(ds, keyword))


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


def attributes(texts: Mapping[str, str]) -> InstanceAttributes:
    """`extract`'s result from the elements' texts (header_scan.scan_header's)."""
    return InstanceAttributes({kw: index_text(kw, texts.get(kw)) for kw in INDEX_KEYWORDS
                               if kw != "SpecificCharacterSet"})


NAME_COMPONENT_COLUMNS = ("family", "given", "middle", "prefix", "suffix")


def person_name_rows(keyword: str, name: str) -> list[dict[str, object]]:
    """The person_names rows of a name (without their study, partition and key columns: see
    `with_keys`): one per component group that holds anything."""
    rows: list[dict[str, object]] = []
    for group_index, components in enumerate(name_groups(name)):
        if not any(components):
            continue
        row: dict[str, object] = {"keyword": keyword, "group_index": group_index}
        for column, component in zip(NAME_COMPONENT_COLUMNS, components, strict=True):
            row[column] = component
        rows.append(row)
    return rows


def with_keys(table: Table, values: dict[str, object]) -> dict[str, object]:
    """`values` of a row of `table` with its key columns (KEY_SUFFIX) computed from theirs."""
    for column in _KEYED[table.name]:
        values[column + KEY_SUFFIX] = fold(str(values.get(column) or ""))
    return values


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
    # A new study of a patient indexed before (same Patient ID and issuer): the demographics
    # the patient has, to compare with the study's; None otherwise.
    patient_demographics: dict[str, str] | None = None


@dataclass(frozen=True)
class StoredInstance:
    pk: int
    path: str


# Ingest runs these for every instance: Core statements compiled once and run on the
# connection's DBAPI cursor (prepared.py). The ORM's unit of work cost about 4 ms per instance
# here, SQLAlchemy's Core execution another 0.3 ms.
_patients, _studies, _series, _instances, _names = (
    table(Patient), table(Study), table(Series), table(Instance), table(PersonName))
# Table name -> the columns that have a key column.
_KEYED = {table.name: tuple(c.name[: -len(KEY_SUFFIX)] for c in table.c
                            if c.name.endswith(KEY_SUFFIX))
          for table in (_patients, _studies, _series, _instances, _names)}
# The demographics study matching compares against, in StoredStudy.demographics' keys.
_DEMOGRAPHICS = (("PatientName", "patient_name"), ("PatientID", "patient_id"),
                 ("IssuerOfPatientID", "issuer_of_patient_id"),
                 ("PatientBirthDate", "patient_birth_date"), ("PatientSex", "patient_sex"),
                 ("AccessionNumber", "accession_number"))
_FIND_INSTANCE = Prepared(select(_instances.c.id, _instances.c.path)
                          .where(_instances.c.partition_id == bindparam("partition_id"),
                                 _instances.c.sop_instance_uid == bindparam("sop_uid")))
# An instance of an existing study, the usual case, is looked up in one statement: the study
# row, its series' key and whether the SOP Instance UID is indexed already. Each statement
# is a round of the DBAPI's execution and of the GIL, inside the node's one write lock.
# FOR UPDATE (PostgreSQL; SQLite has one writer anyway): concurrent associations adding to the
# same study must not lose each other's counter and modality updates.
_FIND_STUDY = Prepared(
    select(_studies.c.id, _studies.c.modalities,
           *(_studies.c[column] for _, column in _DEMOGRAPHICS),
           select(_series.c.id)
           .where(_series.c.study_pk == _studies.c.id,
                  _series.c.series_instance_uid == bindparam("series_uid"))
           .scalar_subquery(),
           select(_instances.c.id)
           .where(_instances.c.partition_id == bindparam("partition_id"),
                  _instances.c.sop_instance_uid == bindparam("sop_uid"))
           .scalar_subquery())
    .where(_studies.c.partition_id == bindparam("partition_id"),
           _studies.c.study_instance_uid == bindparam("study_uid"))
    .with_for_update(of=_studies))
# The demographics a patient row holds, in StoredStudy.patient_demographics' keys.
_PATIENT_DEMOGRAPHICS = (("PatientName", "patient_name"),
                         ("PatientBirthDate", "patient_birth_date"),
                         ("PatientSex", "patient_sex"))
_FIND_PATIENT = Prepared(select(_patients.c.id,
                                *(_patients.c[column] for _, column in _PATIENT_DEMOGRAPHICS))
                         .where(_patients.c.partition_id == bindparam("partition_id"),
                                _patients.c.patient_id == bindparam("patient_id"),
                                _patients.c.issuer_of_patient_id == bindparam("issuer")))
_COUNT_SERIES = Prepared(update(_series).where(_series.c.id == bindparam("pk"))
                         .values(num_instances=_series.c.num_instances + 1))
_COUNT_STUDY = Prepared(update(_studies).where(_studies.c.id == bindparam("pk"))
                        .values(num_instances=_studies.c.num_instances + 1,
                                num_series=_studies.c.num_series + bindparam("new_series"),
                                modalities=bindparam("modalities"),
                                updated_at=bindparam("now")))
# INSERTs by table and the columns given (every column with a default is given).
_INSERTS: dict[tuple[str, tuple[str, ...]], Prepared] = {}


def _connection(session: Session | Connection) -> Connection:
    if isinstance(session, Session):
        session.flush()  # the cursor does not autoflush what the session holds
        return session.connection()
    return session


def find_instance(session: Session | Connection, partition_id: int, sop_uid: str
                  ) -> StoredInstance | None:
    row = _FIND_INSTANCE.run(_connection(session), {"partition_id": partition_id,
                                                     "sop_uid": sop_uid}).fetchone()
    return StoredInstance(row[0], row[1]) if row is not None else None


def index_instance(
    session: Session | Connection,
    partition_id: int,
    attrs: InstanceAttributes,
    *,
    relpath: str,
    size: int,
    transfer_syntax: str,
    calling_ae: str,
    now: datetime | None = None,
) -> StoredStudy | StoredInstance:
    """Insert the instance (and its patient/study/series when new) and return its study; or,
    when the partition holds its SOP Instance UID already, change nothing and return that.

    The study's demographics are those the study had before this instance, so the caller can
    compare them with the instance's own (study matching).
    """
    conn = _connection(session)
    sop_uid = attrs["SOPInstanceUID"]
    study = _FIND_STUDY.run(conn, {"partition_id": partition_id,
                                   "study_uid": attrs["StudyInstanceUID"],
                                   "series_uid": attrs["SeriesInstanceUID"],
                                   "sop_uid": sop_uid}).fetchone()
    if study is None or study[-1] is not None:
        # Indexed already (possibly under another study): the row, with its path.
        existing = find_instance(conn, partition_id, sop_uid)
        if existing is not None:
            return existing
    now = now or utcnow()
    patient: dict[str, str] | None = None
    if study is None:
        study_pk, patient = _insert_study(conn, partition_id, attrs, now)
        stored = {keyword: attrs[keyword] for keyword, _ in _DEMOGRAPHICS}
        modalities = ""
        series_pk = None
    else:
        study_pk, modalities, series_pk = study[0], study[1], study[-2]
        stored = {keyword: value for (keyword, _), value in zip(_DEMOGRAPHICS, study[2:-2],
                                                                 strict=True)}
    new_series = series_pk is None
    if new_series:
        series_pk = _insert(conn, _series, {
            "study_pk": study_pk, "series_instance_uid": attrs["SeriesInstanceUID"],
            "modality": attrs["Modality"], "series_number": attrs["SeriesNumber"],
            "series_description": attrs["SeriesDescription"],
            "body_part_examined": attrs["BodyPartExamined"], "series_date": attrs["SeriesDate"],
            "series_time": attrs["SeriesTime"], "num_instances": 1})
        modalities = with_modality(modalities, attrs["Modality"])
    else:
        _COUNT_SERIES.run(conn, {"pk": series_pk})
    _COUNT_STUDY.run(conn, {"pk": study_pk, "new_series": int(new_series),
                            "modalities": modalities, "now": now})
    instance_pk = _insert(conn, _instances, {
        "partition_id": partition_id, "series_pk": series_pk,
        "sop_instance_uid": sop_uid, "sop_class_uid": attrs["SOPClassUID"],
        "instance_number": attrs["InstanceNumber"], "transfer_syntax_uid": transfer_syntax,
        "path": relpath, "size": size, "calling_ae_title": calling_ae, "received_at": now})
    return StoredStudy(study_pk, stored, study is None, instance_pk, patient)


def _insert(conn: Connection, table: Table, values: dict[str, object]) -> int:
    """Insert one row (with its key columns); returns its primary key."""
    values = with_keys(table, values)
    key = (table.name, tuple(values))
    statement = _INSERTS.get(key)
    if statement is None:
        statement = _INSERTS[key] = Prepared(
            insert(table).values({column: bindparam(column) for column in values}),
            returns_id=True)
    return statement.run(conn, values)


def _insert_study(conn: Connection, partition_id: int, attrs: InstanceAttributes,
                  now: datetime) -> tuple[int, dict[str, str] | None]:
    """The new study's key, and the demographics of its patient when the patient was indexed
    before (None: a new patient)."""
    patient = None
    if attrs["PatientID"]:
        # Without a Patient ID there is nothing to know the patient by: never merged.
        patient = _FIND_PATIENT.run(conn, {
            "partition_id": partition_id, "patient_id": attrs["PatientID"],
            "issuer": attrs["IssuerOfPatientID"]}).fetchone()
    if patient is not None:
        patient_pk = patient[0]
        known = {keyword: value for (keyword, _), value in zip(_PATIENT_DEMOGRAPHICS,
                                                                patient[1:], strict=True)}
    else:
        patient_pk = _insert(conn, _patients, {
            "partition_id": partition_id, "patient_id": attrs["PatientID"],
            "issuer_of_patient_id": attrs["IssuerOfPatientID"],
            **{column: attrs[keyword] for keyword, column in _PATIENT_DEMOGRAPHICS}})
        known = None
    study_pk = _insert(conn, _studies, {
        "partition_id": partition_id, "patient_pk": patient_pk,
        "study_instance_uid": attrs["StudyInstanceUID"], "study_date": attrs["StudyDate"],
        "study_time": attrs["StudyTime"], "accession_number": attrs["AccessionNumber"],
        "study_id": attrs["StudyID"], "study_description": attrs["StudyDescription"],
        "referring_physician_name": attrs["ReferringPhysicianName"],
        "patient_name": attrs["PatientName"], "patient_id": attrs["PatientID"],
        "issuer_of_patient_id": attrs["IssuerOfPatientID"],
        "patient_birth_date": attrs["PatientBirthDate"], "patient_sex": attrs["PatientSex"],
        "received_at": now, "updated_at": now, "accessed_at": now,
        "num_series": 0, "num_instances": 0, "modalities": ""})
    for keyword in NAME_KEYWORDS:
        for row in person_name_rows(keyword, attrs[keyword]):
            _insert(conn, _names, {"study_pk": study_pk, "partition_id": partition_id, **row})
    return study_pk, known
