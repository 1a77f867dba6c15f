"""Answer queries and resolve retrieves from the index: conditions become one SQL statement."""

from __future__ import annotations

import functools
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.tag import BaseTag, Tag
from sqlalchemy import Boolean, ColumnElement, Select, and_, func, or_, select, true
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.orm import InstrumentedAttribute
from sqlalchemy.orm.util import AliasedClass
from sqlalchemy.sql.functions import FunctionElement

from node.db.indexer import NAME_COMPONENT_COLUMNS
from node.db.models import KEY_SUFFIX, Instance, Patient, PersonName, Series, Study
from node.dicomtext import fold
from node.internals.charsets import character_set
from node.query.conditions import (
    LEVELS,
    Condition,
    Match,
    Query,
    like_pattern,
    person_name_query,
)
from node.storage.structure import LONG_VRS

RANK = {level: i for i, level in enumerate(LEVELS)}


@dataclass(frozen=True)
class MatchSettings:
    case_sensitive: bool = False
    empty_matching: bool = False
    limit: int = 0  # 0: no limit
    # SQLite never uses an index for LIKE on an expression such as upper(column); a pure prefix
    # pattern is written as a range there instead (exact under its binary collation).
    prefix_as_range: bool = False


@dataclass(frozen=True)
class Attribute:
    level: str
    column: InstrumentedAttribute[Any] | None  # None: computed
    # Free text: matched on its key column (dicomtext.fold) when matching ignores case.
    text: bool = False
    value: Callable[[dict[str, Any]], Any] | None = None  # how it is returned, if not column
    # At the study level and below, the study's own copy: a study answers, and is matched,
    # with the patient attributes it was received with.
    study_column: InstrumentedAttribute[Any] | None = None
    # A person name: matched component group by component group (person_names).
    name: bool = False


ATTRIBUTES: dict[str, Attribute] = {
    "PatientName": Attribute("PATIENT", Patient.patient_name, study_column=Study.patient_name,
                             name=True),
    "PatientID": Attribute("PATIENT", Patient.patient_id, text=True),
    "IssuerOfPatientID": Attribute("PATIENT", Patient.issuer_of_patient_id, text=True),
    "PatientBirthDate": Attribute("PATIENT", Patient.patient_birth_date,
                                  study_column=Study.patient_birth_date),
    "PatientSex": Attribute("PATIENT", Patient.patient_sex, text=True,
                            study_column=Study.patient_sex),
    "NumberOfPatientRelatedStudies": Attribute("PATIENT", None,
                                               value=lambda r: r["patient_studies"]),
    "NumberOfPatientRelatedSeries": Attribute("PATIENT", None,
                                              value=lambda r: r["patient_series"]),
    "NumberOfPatientRelatedInstances": Attribute("PATIENT", None,
                                                 value=lambda r: r["patient_instances"]),
    "StudyInstanceUID": Attribute("STUDY", Study.study_instance_uid),
    "StudyDate": Attribute("STUDY", Study.study_date),
    "StudyTime": Attribute("STUDY", Study.study_time),
    "AccessionNumber": Attribute("STUDY", Study.accession_number, text=True),
    "StudyID": Attribute("STUDY", Study.study_id, text=True),
    "StudyDescription": Attribute("STUDY", Study.study_description, text=True),
    "ReferringPhysicianName": Attribute("STUDY", Study.referring_physician_name, name=True),
    "ModalitiesInStudy": Attribute("STUDY", Study.modalities, value=lambda r: [
        m for m in r["Study"].modalities.split("\\") if m]),
    "NumberOfStudyRelatedSeries": Attribute("STUDY", Study.num_series),
    "NumberOfStudyRelatedInstances": Attribute("STUDY", Study.num_instances),
    "SeriesInstanceUID": Attribute("SERIES", Series.series_instance_uid),
    "Modality": Attribute("SERIES", Series.modality, text=True),
    "SeriesNumber": Attribute("SERIES", Series.series_number),
    "SeriesDescription": Attribute("SERIES", Series.series_description, text=True),
    "BodyPartExamined": Attribute("SERIES", Series.body_part_examined, text=True),
    "SeriesDate": Attribute("SERIES", Series.series_date),
    "SeriesTime": Attribute("SERIES", Series.series_time),
    "NumberOfSeriesRelatedInstances": Attribute("SERIES", Series.num_instances),
    "SOPInstanceUID": Attribute("IMAGE", Instance.sop_instance_uid),
    "SOPClassUID": Attribute("IMAGE", Instance.sop_class_uid),
    "InstanceNumber": Attribute("IMAGE", Instance.instance_number),
}
_ENTITIES: dict[str, type[Patient | Study | Series | Instance]] = {
    "PATIENT": Patient, "STUDY": Study, "SERIES": Series, "IMAGE": Instance}


def column_at(attribute: Attribute, level: str) -> InstrumentedAttribute[Any]:
    """The column an attribute is matched on and returned from in a query at `level`."""
    if attribute.study_column is not None and RANK[level] >= RANK["STUDY"]:
        return attribute.study_column
    assert attribute.column is not None
    return attribute.column


def key_column(column: InstrumentedAttribute[Any]) -> InstrumentedAttribute[Any]:
    """The column holding `column`'s values folded for case-insensitive matching."""
    key: InstrumentedAttribute[Any] = getattr(column.class_, column.key + KEY_SUFFIX)
    return key


def _compare(column: Any, value: str, wildcard: bool, as_range: bool) -> ColumnElement[bool]:
    """`column` equals `value`, or matches it as a DICOM wildcard pattern; a pattern that is
    a prefix and `*` as a range when `as_range` (an index serves it on SQLite)."""
    if not wildcard:
        return column == value
    prefix = value[:-1]
    if as_range and value.endswith("*") and prefix and "*" not in prefix and "?" not in prefix:
        return and_(column >= prefix, column < prefix[:-1] + _next_character(prefix[-1]))
    return column.like(like_pattern(value), escape="\\")


def _next_character(ch: str) -> str:
    following = ord(ch) + 1
    return chr(0xE000 if 0xD800 <= following < 0xE000 else min(following, 0x10FFFF))


def _text_clause(column: Any, value: str, settings: MatchSettings) -> ColumnElement[bool]:
    """A text value, matched on the column's key (indexed); case-sensitively also on the
    value as stored, which only narrows what the key found."""
    wildcard = "*" in value or "?" in value
    clause = _compare(key_column(column), fold(value), wildcard, settings.prefix_as_range)
    if not settings.case_sensitive:
        return clause
    return and_(clause, _compare(column, value, wildcard, as_range=False))


def _person_name(keyword: str, value: str, settings: MatchSettings, partition_id: int,
                 level: str) -> ColumnElement[bool]:
    """Component by component (SMITH matches SMITH^JOHN, SMITH^J* matches SMITH^JANE), in
    every component group of the names a study was received with (conditions.
    person_name_query); at the patient level, a patient any of whose studies matches."""
    matches = []
    for group, components in person_name_query(value):
        names = [PersonName.partition_id == partition_id, PersonName.keyword == keyword]
        if group is not None:
            names.append(PersonName.group_index == group)
        names.extend(_text_clause(getattr(PersonName, column_name), component, settings)
                     for column_name, component in zip(NAME_COMPONENT_COLUMNS, components,
                                                       strict=True)
                     if component not in ("", "*"))
        if level == "PATIENT":
            # A join, not studies.id IN (...): PostgreSQL hashed every study for that.
            matches.append(Patient.id.in_(
                select(Study.patient_pk)
                .join_from(PersonName, Study, Study.id == PersonName.study_pk).where(*names)))
        else:
            matches.append(Study.id.in_(select(PersonName.study_pk).where(*names)))
    return and_(*matches) if matches else true()


def _modalities(condition: Condition) -> ColumnElement[bool]:
    wanted = [m for v in condition.values for m in v.split("\\") if m]
    return or_(*(Study.modalities.contains(f"\\{m.upper()}\\", autoescape=True)
                 for m in wanted))


class _IsDate(FunctionElement[bool]):
    """The column holds a date of the DA form YYYYMMDD (an old-style 1997.04.24 does not)."""

    type = Boolean()
    inherit_cache = True


@compiles(_IsDate, "sqlite")
def _is_date_sqlite(element: _IsDate, compiler: Any, **kw: Any) -> str:
    return f"({compiler.process(element.clauses, **kw)} GLOB '{'[0-9]' * 8}')"


@compiles(_IsDate)
def _is_date_default(element: _IsDate, compiler: Any, **kw: Any) -> str:
    return f"({compiler.process(element.clauses, **kw)} ~ '^[0-9]{{8}}$')"


def clause(keyword: str, condition: Condition, settings: MatchSettings, partition_id: int,
           level: str) -> ColumnElement[bool] | None:
    """The WHERE clause of one condition of a query at `level`; None for keys the index
    cannot match."""
    attribute = ATTRIBUTES.get(keyword)
    if attribute is None or attribute.column is None:
        return None
    column = column_at(attribute, level)
    if attribute.name:
        result = _person_name(keyword, condition.values[0], settings, partition_id, level)
    elif keyword == "ModalitiesInStudy":
        result = _modalities(condition)
    elif condition.match is Match.LIST:
        result = column.in_(condition.values)
    elif condition.match is Match.RANGE:
        low, high = condition.values
        # Only what is a date is in a date range: an absent one is in none (empty matching
        # aside), nor a value kept as received that is not of the form YYYYMMDD.
        bounds = [_IsDate(column) if _VRS.get(keyword) == "DA" else column != ""]
        if low:
            bounds.append(column >= low)
        if high:
            # A time range's upper bound covers its fractions: -1030 includes 103000.5.
            bounds.append(column <= high + ("\uffff" if keyword.endswith("Time") else ""))
        result = and_(*bounds)
    elif attribute.text:
        result = _text_clause(column, condition.values[0], settings)
    else:
        result = column == condition.values[0]
    if settings.empty_matching and keyword not in _UID_KEYS:
        result = or_(result, column == "")
    return result


_UID_KEYS = frozenset({"StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID"})
_VRS = {keyword: dictionary_VR(keyword) for keyword in ATTRIBUTES}


def _matched_on(keyword: str, level: str) -> type[Any] | AliasedClass[Any]:
    """The entity whose rows a condition on `keyword` constrains in a query at `level`."""
    attribute = ATTRIBUTES[keyword]
    if attribute.name:
        return Study if RANK[level] >= RANK["STUDY"] else Patient
    return column_at(attribute, level).class_


def statement(query: Query, partition_id: int, settings: MatchSettings,
              level: str | None = None) -> Select:
    """SELECT of the rows at `level` (default: the query's) that match every condition.

    Keys below the query's level are not matched (hierarchical model); keys above it are, so a
    study-level query may also constrain the patient.
    """
    level = level or query.level
    entities = [_ENTITIES[lv] for lv in reversed(LEVELS[: RANK[level] + 1])]
    conditions = [c for c in query.conditions if c.keyword in ATTRIBUTES
                  and ATTRIBUTES[c.keyword].column is not None
                  and RANK[ATTRIBUTES[c.keyword].level] <= RANK[query.level]]
    # The partition is filtered on the table whose keys the query constrains, so the planner
    # starts from their indexes: (partition, study UID/date) for study keys, patient ID for
    # patient keys, instead of walking the whole partition from the other side.
    below_patient = any(_matched_on(c.keyword, query.level) is not Patient for c in conditions)
    owner = Study if level != "PATIENT" and below_patient else Patient
    stmt = select(*entities)
    if not any(ATTRIBUTES[c.keyword].name for c in conditions):
        # (A name's condition holds the partition: its subquery reads the names of the
        # partition's studies. Filtering here too makes SQLite walk the partition's studies
        # and look each up in the subquery's result instead of reading them by key.)
        stmt = stmt.where(owner.partition_id == partition_id)
    if RANK[level] >= RANK["STUDY"]:
        stmt = stmt.join_from(Patient, Study, Study.patient_pk == Patient.id)
    if RANK[level] >= RANK["SERIES"]:
        stmt = stmt.join_from(Study, Series, Series.study_pk == Study.id)
    if RANK[level] >= RANK["IMAGE"]:
        stmt = stmt.join_from(Series, Instance, Instance.series_pk == Series.id)
    for condition in conditions:
        where = clause(condition.keyword, condition, settings, partition_id, query.level)
        if where is not None:
            stmt = stmt.where(where)
    if level == "PATIENT" or _PATIENT_COUNTS.intersection(query.return_keys):
        stmt = stmt.add_columns(*_patient_counts())
    return stmt.order_by(entities[0].id)


_PATIENT_COUNTS = frozenset({"NumberOfPatientRelatedStudies", "NumberOfPatientRelatedSeries",
                             "NumberOfPatientRelatedInstances"})


def _patient_counts() -> list[Any]:
    def of(expr: Any, name: str) -> Any:
        return (select(func.coalesce(expr, 0)).where(Study.patient_pk == Patient.id)
                .correlate(Patient).scalar_subquery().label(name))

    return [of(func.count(Study.id), "patient_studies"),
            of(func.sum(Study.num_series), "patient_series"),
            of(func.sum(Study.num_instances), "patient_instances")]


def answer_values(query: Query, row: Any, retrieve_ae: str) -> list[tuple[str, Any]]:
    """(keyword, value) of each element of one matching row's C-FIND answer: the keys the
    requestor asked for, in the order they are set (a later one replaces an earlier one)."""
    values: dict[str, Any] = dict(row._mapping)
    pairs: list[tuple[str, Any]] = [("SpecificCharacterSet", "ISO_IR 192"),
                                    ("QueryRetrieveLevel", query.level),
                                    ("RetrieveAETitle", retrieve_ae)]
    for keyword in query.return_keys:
        attribute = ATTRIBUTES.get(keyword)
        value: Any = None
        if attribute is not None and RANK[attribute.level] <= RANK[query.level]:
            if attribute.value is not None:
                value = attribute.value(values)
            else:
                column = column_at(attribute, query.level)
                value = getattr(values[column.class_.__name__], column.key)
        pairs.append((keyword, None if value == "" else value))
    if query.level in ("STUDY", "SERIES", "IMAGE") and "InstanceAvailability" in query.return_keys:
        pairs.append(("InstanceAvailability", "ONLINE"))
    return pairs


def identifier(pairs: list[tuple[str, Any]], *, implicit_vr: bool = False,
               little_endian: bool = True) -> Dataset:
    """The C-FIND response identifier holding `answer_values`' pairs.

    Text values go in already encoded (raw elements, in the answer's transfer syntax), so
    pynetdicom's encoding of the identifier copies them instead of converting each value:
    building and encoding an answer this way costs well under half as much
    (docs/performance/journal.md). Values pydicom must convert itself (other VRs, an IS held as
    text, non-ASCII text in a VR without a character set) are set as pydicom values."""
    ds = Dataset()
    for keyword, value in pairs:
        _set(ds, keyword, value, implicit_vr, little_endian)
    ds.set_original_encoding(implicit_vr, little_endian, character_set(ds))
    return ds


def encoded_identifier(pairs: list[tuple[str, Any]], *, implicit_vr: bool) -> bytes | None:
    """The identifier `identifier` builds from the same pairs, already encoded in Little
    Endian with or without explicit VRs, or None when one of its values needs pydicom's conversion.

    The elements are packed with struct straight from the row's values: building a Dataset
    and having pydicom write it was most of an answer's CPU (docs/performance/journal.md)."""
    elements: dict[int, bytes] = {}
    for keyword, value in pairs:
        element = _element(keyword)
        if element is None:
            return None
        tag, vr = element
        raw = _raw_value(vr, value)
        if raw is None:
            return None
        elements[int(tag)] = _packed(tag, vr, raw, implicit_vr)  # int: BaseTag sorts slowly
    return b"".join(elements[tag] for tag in sorted(elements))


def _packed(tag: int, vr: str, raw: bytes, implicit_vr: bool) -> bytes:
    """One Little Endian data element (PS3.5 7.1)."""
    group, number = tag >> 16, tag & 0xFFFF
    if implicit_vr:
        return struct.pack("<HHL", group, number, len(raw)) + raw
    code = vr.encode("ascii")
    if code in LONG_VRS:
        return struct.pack("<HH2s2xL", group, number, code, len(raw)) + raw
    return struct.pack("<HH2sH", group, number, code, len(raw)) + raw


# VRs whose value is text: written as the UTF-8 of the value (the answer's character set is
# ISO_IR 192) where it may hold any character, as ASCII where it may not.
_CHARSET_VRS = frozenset({"LO", "LT", "PN", "SH", "ST", "UC", "UT"})
_ASCII_VRS = frozenset({"AE", "AS", "CS", "DA", "DT", "TM", "UI", "UR"})


@functools.cache
def _element(keyword: str) -> tuple[BaseTag, str] | None:
    tag = tag_for_keyword(keyword)
    if tag is None:
        return None
    # A key whose VR depends on other elements ("US or SS") is only ever returned empty:
    # any of its VRs will do, and without one pydicom cannot encode it in explicit VR.
    return Tag(tag), dictionary_VR(tag).split(" or ")[0]


def _set(ds: Dataset, keyword: str, value: Any, implicit_vr: bool, little_endian: bool) -> None:
    """Put `value` in `ds` under `keyword`, encoded when it is text (see `identifier`)."""
    element = _element(keyword)
    raw = _raw_value(element[1], value) if element is not None else None
    if raw is None:
        try:
            setattr(ds, keyword, value)
        except (TypeError, ValueError):
            setattr(ds, keyword, None)
        if keyword in ds and ds[keyword].VR == "SQ" and ds[keyword].value is None:
            ds[keyword].value = []
        return
    assert element is not None
    tag, vr = element
    ds[tag] = RawDataElement(tag, vr, len(raw), raw, 0, implicit_vr, little_endian)


def _raw_value(vr: str, value: Any) -> bytes | None:
    """The encoded value, or None when pydicom must convert it."""
    if value is None or vr == "SQ":
        return b""  # an empty value (an empty sequence for SQ)
    if vr == "IS":
        if not isinstance(value, int) or isinstance(value, bool):
            return None
        raw = str(value).encode()
    elif vr in _CHARSET_VRS or vr in _ASCII_VRS:
        text = "\\".join(str(v) for v in value) if isinstance(value, list | tuple) else str(value)
        if vr in _CHARSET_VRS:
            raw = text.encode("utf-8")
        elif text.isascii():
            raw = text.encode("ascii")
        else:
            return None
    else:
        return None
    if len(raw) % 2:
        raw += b"\0" if vr == "UI" else b" "
    return raw
