"""Query identifiers as conditions (PS3.4 C.2.2.2), without a database."""

from __future__ import annotations

import pytest
from pydicom.dataset import Dataset

from node.query.conditions import (
    Condition,
    Match,
    QueryError,
    condition_for,
    like_pattern,
    parse_identifier,
    person_name_components,
)
from node.scu.contexts import sub_operation_contexts


@pytest.mark.parametrize(("vr", "value", "expected"), [
    ("LO", "", Condition("K", Match.UNIVERSAL)),
    ("LO", "*", Condition("K", Match.UNIVERSAL)),
    ("LO", "PID1", Condition("K", Match.SINGLE, ("PID1",))),
    ("PN", "SMI*", Condition("K", Match.WILDCARD, ("SMI*",))),
    ("SH", "A?C", Condition("K", Match.WILDCARD, ("A?C",))),
    ("DA", "20240101-20240131", Condition("K", Match.RANGE, ("20240101", "20240131"))),
    ("DA", "20240101-", Condition("K", Match.RANGE, ("20240101", ""))),
    ("DA", "-20240131", Condition("K", Match.RANGE, ("", "20240131"))),
    ("DA", "20240101", Condition("K", Match.SINGLE, ("20240101",))),
    ("TM", "0800-1200", Condition("K", Match.RANGE, ("0800", "1200"))),
    ("UI", "1.2.3\\1.2.4", Condition("K", Match.LIST, ("1.2.3", "1.2.4"))),
    ("UI", "1.2.3", Condition("K", Match.SINGLE, ("1.2.3",))),
    ("UI", "1.2.*", Condition("K", Match.SINGLE, ("1.2.*",))),  # no wildcards in UIDs
    ("DA", "2024*", Condition("K", Match.SINGLE, ("2024*",))),
])
def test_condition_for_each_matching_type(vr: str, value: str, expected: Condition) -> None:
    assert condition_for("K", vr, value) == expected


def test_parse_identifier_keeps_return_keys_and_non_universal_conditions() -> None:
    ds = Dataset()
    ds.QueryRetrieveLevel = "STUDY"
    ds.PatientName = "SMITH*"
    ds.StudyInstanceUID = ""
    ds.StudyDate = "20240101-"
    ds.ReferencedStudySequence = []
    query = parse_identifier(ds)
    assert query.level == "STUDY"
    assert {c.keyword for c in query.conditions} == {"PatientName", "StudyDate"}
    assert set(query.return_keys) == {"PatientName", "StudyInstanceUID", "StudyDate",
                                      "ReferencedStudySequence"}


@pytest.mark.parametrize("level", ["", "SERIESX", None])
def test_a_missing_or_unknown_level_is_an_error(level: str | None) -> None:
    ds = Dataset()
    if level is not None:
        ds.QueryRetrieveLevel = level
    with pytest.raises(QueryError, match="Query/Retrieve Level"):
        parse_identifier(ds)


def test_like_pattern_escapes_sql_wildcards() -> None:
    assert like_pattern("A*B?C") == "A%B_C"
    assert like_pattern("50%_x\\") == "50\\%\\_x\\\\"


@pytest.mark.parametrize(("value", "components"), [
    ("SMITH", ["SMITH"]),
    ("SMITH^JOHN", ["SMITH", "JOHN"]),
    ("SMITH^*", ["SMITH"]),
    ("SMITH^^Q", ["SMITH", "", "Q"]),
    ("SMITH^J*=IDEO", ["SMITH", "J*"]),
])
def test_person_name_components(value: str, components: list[str]) -> None:
    assert person_name_components(value) == components


def test_sub_operation_contexts_keep_stored_syntax_and_offer_uncompressed() -> None:
    ct, mr = "1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.5.1.4.1.1.4"
    j2k, explicit = "1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.1"
    contexts = sub_operation_contexts([(ct, j2k), (ct, explicit), (mr, explicit), (ct, j2k)], [])
    as_pairs = [(c.abstract_syntax, tuple(c.transfer_syntax)) for c in contexts]
    assert as_pairs == [
        (ct, (j2k,)),
        (ct, (explicit, "1.2.840.10008.1.2")),
        (mr, (explicit, "1.2.840.10008.1.2")),
    ]
    many = sub_operation_contexts([(f"1.2.3.{i}", j2k) for i in range(100)], [])
    assert len(many) == 128
