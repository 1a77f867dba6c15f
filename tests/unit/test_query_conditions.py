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
    person_name_query,
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


_ = ""


@pytest.mark.parametrize(("value", "groups"), [
    ("SMITH", [(None, ["SMITH", _, _, _, _])]),
    ("SMITH^JOHN", [(None, ["SMITH", "JOHN", _, _, _])]),
    ("SMITH^*", [(None, ["SMITH", "*", _, _, _])]),
    ("SMITH^^Q", [(None, ["SMITH", _, "Q", _, _])]),
    ("*^JOHN", [(None, ["*", "JOHN", _, _, _])]),
    ("山田^太郎", [(None, ["山田", "太郎", _, _, _])]),
    # Several groups: each asks the stored name's group in the same place.
    ("SMITH^J*=IDEO", [(0, ["SMITH", "J*", _, _, _]), (1, ["IDEO", _, _, _, _])]),
    ("=山田^太郎", [(1, ["山田", "太郎", _, _, _])]),
    ("Yamada^Tarou=*=やまだ", [(0, ["Yamada", "Tarou", _, _, _]), (2, ["やまだ", _, _, _, _])]),
    ("*", []),
    ("^", []),
    # More components than five stay in the last, as the index keeps them.
    ("A^B^C^D^E^F", [(None, ["A", "B", "C", "D", "E^F"])]),
])
def test_person_name_query_groups(value: str, groups: list[tuple[int | None, list[str]]]
                                  ) -> None:
    assert person_name_query(value) == groups


def test_sub_operation_contexts_keep_stored_syntax_and_offer_uncompressed() -> None:
    ct, mr = "1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.5.1.4.1.1.4"
    j2k, explicit = "1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.1"
    contexts = sub_operation_contexts([(ct, j2k), (ct, explicit), (mr, explicit), (ct, j2k)], [])
    as_pairs = [(c.abstract_syntax, tuple(c.transfer_syntax)) for c in contexts]
    assert as_pairs == [
        (ct, (j2k,)),
        (ct, (explicit,)),
        (mr, (explicit,)),
        (ct, (explicit, "1.2.840.10008.1.2")),
        (mr, (explicit, "1.2.840.10008.1.2")),
    ]
    many = sub_operation_contexts([(f"1.2.3.{i}", j2k) for i in range(100)], [])
    assert len(many) == 128
