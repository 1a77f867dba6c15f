"""Unit tests for the per-device coercion language (node/policy/coercion.py)."""

from __future__ import annotations

import pytest
from pydicom.dataset import Dataset
from pydicom.tag import Tag

from node.policy.coercion import CoercionError, Rule, apply_rules, parse_rules


def _dataset(**values: str) -> Dataset:
    ds = Dataset()
    for keyword, value in values.items():
        setattr(ds, keyword, value)
    return ds


def _apply(text: str, ds: Dataset) -> list[str]:
    return apply_rules(parse_rules(text), ds)


# --- parsing -------------------------------------------------------------------------------


def test_parse_returns_one_rule_per_operation_line() -> None:
    rules = parse_rules(
        "set InstitutionName Hospital\n"
        "prefix PatientID X\n"
        "suffix PatientID Y\n"
        "copy OtherPatientIDs from PatientID\n"
        'replace PatientName "^(\\w+)" "\\1"\n'
        "remove ReferringPhysicianName\n"
    )
    assert [r.op for r in rules] == ["set", "prefix", "suffix", "copy", "replace", "remove"]
    assert [r.keyword for r in rules] == [
        "InstitutionName",
        "PatientID",
        "PatientID",
        "OtherPatientIDs",
        "PatientName",
        "ReferringPhysicianName",
    ]
    assert rules[0].tag == Tag(0x0008, 0x0080)
    assert rules[0].vr == "LO"
    assert rules[0].value == "Hospital"
    assert rules[3].source == Tag(0x0010, 0x0020)
    assert rules[4].pattern is not None
    assert rules[4].pattern.pattern == "^(\\w+)"
    assert rules[4].value == "\\1"


def test_empty_text_gives_no_rules() -> None:
    assert parse_rules("") == []


def test_comments_and_blank_lines_are_ignored() -> None:
    text = """
    # a full-line comment

    set PatientID NEW
       # an indented comment
    \t
    remove PatientAge
    """
    rules = parse_rules(text)
    assert [(r.op, r.keyword, r.value) for r in rules] == [
        ("set", "PatientID", "NEW"),
        ("remove", "PatientAge", ""),
    ]


def test_only_comment_or_blank_lines_give_no_rules() -> None:
    assert parse_rules("# nothing yet\n\n   \n# still nothing") == []


def test_hash_inside_a_value_is_kept() -> None:
    # Only a line starting with '#' is a comment; a value may contain one.
    (rule,) = parse_rules("set AccessionNumber ACC#1")
    assert rule.value == "ACC#1"


def test_text_after_a_rule_is_not_silently_dropped() -> None:
    # No trailing comments: extra words make the argument count wrong, so the rule is refused
    # instead of the words being ignored.
    with pytest.raises(CoercionError, match=r"^line 1: expected `set <attr> <value>`"):
        parse_rules("set PatientID NEW # note")


def test_backslashes_are_literal_without_quotes() -> None:
    (rule,) = parse_rules(r"replace PatientName ^(\w+)\^(\w+)$ \2^\1")
    assert rule.pattern is not None
    assert rule.pattern.pattern == r"^(\w+)\^(\w+)$"
    assert rule.value == r"\2^\1"


def test_operation_name_is_case_insensitive() -> None:
    rules = parse_rules("SET PatientID A\nRemove PatientAge")
    assert [r.op for r in rules] == ["set", "remove"]


@pytest.mark.parametrize("token", ["PatientName", "(0010,0010)", "00100010"])
def test_attribute_by_keyword_or_tag(token: str) -> None:
    (rule,) = parse_rules(f"remove {token}")
    assert rule.tag == Tag(0x0010, 0x0010)
    assert rule.vr == "PN"
    assert rule.keyword == "PatientName"


def test_tag_form_hex_is_case_insensitive() -> None:
    (rule,) = parse_rules("set (0008,103e) SERIES")
    assert rule.tag == Tag(0x0008, 0x103E)
    assert rule.keyword == "SeriesDescription"


def test_quoted_value_keeps_spaces() -> None:
    (double,) = parse_rules('set StudyDescription "CT HEAD  WITHOUT"')
    (single,) = parse_rules("set StudyDescription 'MR  KNEE'")
    assert double.value == "CT HEAD  WITHOUT"
    assert single.value == "MR  KNEE"


def test_quoted_hash_is_not_a_comment() -> None:
    (rule,) = parse_rules('set AccessionNumber "ACC#1"')
    assert rule.value == "ACC#1"


# --- refusals ------------------------------------------------------------------------------


def _refusal(text: str) -> str:
    with pytest.raises(CoercionError) as info:
        parse_rules(text)
    return str(info.value)


def test_coercion_error_is_a_value_error() -> None:
    assert issubclass(CoercionError, ValueError)


def test_unknown_operation_is_refused_naming_the_line() -> None:
    message = _refusal("# header\n\nset PatientID A\nuppercase PatientName")
    assert message.startswith("line 4:")
    assert "unknown operation" in message
    assert "'uppercase'" in message


def test_unknown_keyword_is_refused() -> None:
    message = _refusal("set PatientNam DOE")
    assert message.startswith("line 1:")
    assert "PatientNam" in message
    assert "not a DICOM keyword or tag" in message


def test_keyword_is_case_sensitive() -> None:
    assert "patientname" in _refusal("remove patientname")


def test_tag_not_in_dictionary_is_refused() -> None:
    message = _refusal("\nset (0009,0010) X")
    assert message.startswith("line 2:")
    assert "not in the DICOM dictionary" in message


@pytest.mark.parametrize(
    ("token", "vr"),
    [
        ("PixelData", "OB or OW"),
        ("Rows", "US"),
        ("(0028,0010)", "US"),
        ("ReferencedImageSequence", "SQ"),
    ],
)
def test_non_alphanumeric_vr_is_refused(token: str, vr: str) -> None:
    message = _refusal(f"remove {token}")
    assert message.startswith("line 1:")
    assert token in message
    assert f"VR {vr}" in message
    assert "only alphanumeric elements can be coerced" in message


@pytest.mark.parametrize("token", ["StudyInstanceUID", "SOPInstanceUID", "(0020,000E)"])
def test_uid_vr_is_refused(token: str) -> None:
    message = _refusal(f"set {token} 1.2.3")
    assert "VR UI" in message
    assert token in message


def test_uid_is_refused_as_copy_target() -> None:
    assert "VR UI" in _refusal("copy SeriesInstanceUID from StudyInstanceUID")


def test_non_coercible_copy_source_is_refused() -> None:
    message = _refusal("copy StudyDescription from Rows")
    assert "Rows" in message
    assert "VR US" in message


@pytest.mark.parametrize(
    ("text", "vr"),
    [
        ("set AccessionNumber 12345678901234567", "SH"),  # 17 characters; SH allows 16
        ("set PatientSex m", "CS"),  # CS is upper case
        ("set Modality CT-X", "CS"),  # '-' is not a CS character
        ("set PatientBirthDate 20241301", "DA"),  # month 13
        ("set PatientAge 12", "AS"),
        ("set SeriesNumber 1.5", "IS"),
    ],
)
def test_invalid_set_value_is_refused(text: str, vr: str) -> None:
    message = _refusal("# rules\n" + text)
    assert message.startswith("line 2:")
    assert f"is not a valid {vr}" in message


def test_valid_set_values_are_accepted() -> None:
    rules = parse_rules(
        "set AccessionNumber 1234567890123456\n"  # exactly 16
        "set PatientSex M\n"
        "set PatientBirthDate 19700101\n"
        "set PatientAge 042Y\n"
    )
    assert [r.value for r in rules] == ["1234567890123456", "M", "19700101", "042Y"]


def test_bad_regex_is_refused() -> None:
    message = _refusal('set PatientID A\nreplace PatientName "(unclosed" X')
    assert message.startswith("line 2:")
    assert "invalid regular expression" in message


@pytest.mark.parametrize(
    ("pattern", "replacement"),
    [
        ("(A)", "\\2"),  # one group only
        ("A", "\\1"),  # no group at all
        ("(A)", "\\g<name>"),  # no such named group
    ],
)
def test_bad_replacement_group_is_refused(pattern: str, replacement: str) -> None:
    message = _refusal(f'replace PatientName "{pattern}" "{replacement}"')
    assert message.startswith("line 1:")
    assert "invalid replacement" in message


@pytest.mark.parametrize(
    ("text", "usage"),
    [
        ("set PatientID", "set <attr> <value>"),
        ("set PatientID A B", "set <attr> <value>"),
        ("prefix PatientID", "prefix <attr> <value>"),
        ("suffix PatientID", "suffix <attr> <value>"),
        ("copy PatientID from", "copy <attr> from <source-attr>"),
        ("replace PatientID x", "replace <attr> <regex> <replacement>"),
        ("remove", "remove <attr>"),
        ("remove PatientID PatientName", "remove <attr>"),
    ],
)
def test_wrong_argument_count_is_refused(text: str, usage: str) -> None:
    message = _refusal("\n\n" + text)
    assert message.startswith("line 3:")
    assert f"expected `{usage}`" in message


def test_copy_to_instead_of_from_is_refused() -> None:
    message = _refusal("copy PatientID to OtherPatientIDs")
    assert message.startswith("line 1:")
    assert "expected `copy <attr> from <source-attr>`" in message


def test_unterminated_quote_is_refused_naming_the_line() -> None:
    message = _refusal('set PatientID A\nset StudyDescription "open')
    assert message.startswith("line 2:")


def test_first_invalid_line_is_the_one_named() -> None:
    message = _refusal("set PatientID A\nfrobnicate X\nremove Rows")
    assert message.startswith("line 2:")


# --- application ---------------------------------------------------------------------------


def test_set_overwrites_an_existing_value() -> None:
    ds = _dataset(InstitutionName="Old")
    assert _apply('set InstitutionName "New Hospital"', ds) == ["InstitutionName"]
    assert ds.InstitutionName == "New Hospital"


def test_set_creates_an_absent_element_with_the_dictionary_vr() -> None:
    ds = Dataset()
    assert _apply("set PatientID NEW", ds) == ["PatientID"]
    assert ds.PatientID == "NEW"
    assert ds["PatientID"].VR == "LO"


def test_set_to_the_same_value_reports_no_change() -> None:
    ds = _dataset(PatientID="SAME")
    assert _apply("set PatientID SAME", ds) == []
    assert ds.PatientID == "SAME"


def test_set_by_tag_form() -> None:
    ds = _dataset(PatientID="A")
    assert _apply("set 00100020 B", ds) == ["PatientID"]
    assert ds.PatientID == "B"


def test_prefix_and_suffix_a_present_value() -> None:
    ds = _dataset(PatientID="123", AccessionNumber="ACC")
    changed = _apply("prefix PatientID SITE-\nsuffix AccessionNumber _X", ds)
    assert changed == ["PatientID", "AccessionNumber"]
    assert ds.PatientID == "SITE-123"
    assert ds.AccessionNumber == "ACC_X"


@pytest.mark.parametrize(
    "rule",
    ['prefix PatientID "P-"', 'suffix PatientID "-S"', 'replace PatientID "^" "X"'],
)
def test_prefix_suffix_replace_leave_an_absent_element_alone(rule: str) -> None:
    ds = Dataset()
    assert _apply(rule, ds) == []
    assert "PatientID" not in ds


@pytest.mark.parametrize(
    "rule",
    ['prefix PatientID "P-"', 'suffix PatientID "-S"', 'replace PatientID "^" "X"'],
)
def test_prefix_suffix_replace_leave_an_empty_element_alone(rule: str) -> None:
    ds = _dataset(PatientID="")
    assert _apply(rule, ds) == []
    assert ds.PatientID == ""


def test_prefix_suffix_replace_leave_an_element_with_no_value_alone() -> None:
    ds = Dataset()
    ds.add_new("PatientID", "LO", None)
    assert _apply('prefix PatientID "P-"\nsuffix PatientID S\nreplace PatientID "^" X', ds) == []
    assert "PatientID" in ds
    assert not ds.PatientID


def test_copy_from_a_present_source() -> None:
    ds = _dataset(PatientID="MRN1", OtherPatientIDs="old")
    assert _apply("copy OtherPatientIDs from PatientID", ds) == ["OtherPatientIDs"]
    assert ds.OtherPatientIDs == "MRN1"
    assert ds.PatientID == "MRN1"  # the source is untouched


def test_copy_creates_an_absent_target() -> None:
    ds = _dataset(StudyDescription="CT HEAD")
    assert _apply("copy SeriesDescription from (0008,1030)", ds) == ["SeriesDescription"]
    assert ds.SeriesDescription == "CT HEAD"
    assert ds["SeriesDescription"].VR == "LO"


def test_copy_from_an_absent_source_leaves_the_target_alone() -> None:
    ds = _dataset(OtherPatientIDs="keep")
    assert _apply("copy OtherPatientIDs from PatientID", ds) == []
    assert ds.OtherPatientIDs == "keep"


def test_copy_of_a_multi_valued_source_keeps_every_value() -> None:
    ds = Dataset()
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    assert _apply("copy StudyDescription from ImageType", ds) == ["StudyDescription"]
    assert list(ds.StudyDescription) == ["ORIGINAL", "PRIMARY", "AXIAL"]


def test_replace_with_a_backreference() -> None:
    ds = _dataset(PatientName="DOE^JOHN")
    assert _apply('replace PatientName "^(\\w+)\\^(\\w+)$" "\\2^\\1"', ds) == ["PatientName"]
    assert str(ds.PatientName) == "JOHN^DOE"


def test_replace_substitutes_every_match() -> None:
    ds = _dataset(AccessionNumber="A-B-C")
    assert _apply("replace AccessionNumber - ''", ds) == ["AccessionNumber"]
    assert ds.AccessionNumber == "ABC"


def test_replace_without_a_match_reports_no_change() -> None:
    ds = _dataset(PatientID="12345")
    assert _apply('replace PatientID "[A-Z]" X', ds) == []
    assert ds.PatientID == "12345"


def test_remove_deletes_a_present_element() -> None:
    ds = _dataset(ReferringPhysicianName="DR^WHO", PatientID="1")
    assert _apply("remove ReferringPhysicianName", ds) == ["ReferringPhysicianName"]
    assert "ReferringPhysicianName" not in ds
    assert ds.PatientID == "1"


def test_remove_deletes_an_empty_element() -> None:
    ds = _dataset(ReferringPhysicianName="")
    assert _apply("remove ReferringPhysicianName", ds) == ["ReferringPhysicianName"]
    assert "ReferringPhysicianName" not in ds


def test_remove_of_an_absent_element_reports_no_change() -> None:
    ds = _dataset(PatientID="1")
    assert _apply("remove ReferringPhysicianName", ds) == []
    assert "PatientID" in ds


def test_rules_apply_in_order() -> None:
    ds = _dataset(PatientID="1")
    assert _apply("set PatientID A\nprefix PatientID X", ds) == ["PatientID", "PatientID"]
    assert ds.PatientID == "XA"

    ds = _dataset(PatientID="1")
    assert _apply("prefix PatientID X\nset PatientID A", ds) == ["PatientID", "PatientID"]
    assert ds.PatientID == "A"


def test_later_rules_see_earlier_results() -> None:
    ds = _dataset(PatientID="123")
    changed = _apply(
        "prefix PatientID SITE\n"
        "copy OtherPatientIDs from PatientID\n"
        "remove PatientID\n"
        "suffix PatientID NEVER\n",  # absent by now, so left alone
        ds,
    )
    assert changed == ["PatientID", "OtherPatientIDs", "PatientID"]
    assert ds.OtherPatientIDs == "SITE123"
    assert "PatientID" not in ds


def test_set_then_remove_then_set_again() -> None:
    ds = Dataset()
    changed = _apply("set PatientID A\nremove PatientID\nset PatientID B", ds)
    assert changed == ["PatientID", "PatientID", "PatientID"]
    assert ds.PatientID == "B"


def test_no_rules_change_nothing() -> None:
    ds = _dataset(PatientID="1")
    assert apply_rules([], ds) == []
    assert ds.PatientID == "1"


def test_rule_keyword_for_a_tag_without_keyword_falls_back_to_the_tag() -> None:
    rule = Rule("remove", Tag(0x0009, 0x0010), "LO")
    assert rule.keyword == str(Tag(0x0009, 0x0010))
