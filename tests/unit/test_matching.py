"""Unit tests for study demographic matching (node/scp/matching.py)."""

from __future__ import annotations

from node.scp.matching import MATCH_FIELDS, Difference, demographic_differences


def test_identical_values_give_no_difference() -> None:
    stored = {"PatientName": "DOE^JOHN", "PatientID": "1"}
    assert demographic_differences(stored, dict(stored), ["PatientName", "PatientID"]) == []


def test_a_changed_value_is_reported() -> None:
    result = demographic_differences(
        {"PatientID": "123"}, {"PatientID": "456"}, ["PatientID"]
    )
    assert result == [Difference("PatientID", "123", "456")]
    assert result[0].as_dict() == {"keyword": "PatientID", "stored": "123", "received": "456"}


def test_only_checked_keywords_are_compared() -> None:
    stored = {"PatientName": "DOE^JOHN", "PatientID": "1", "PatientSex": "M"}
    received = {"PatientName": "ROE^JANE", "PatientID": "1", "PatientSex": "F"}
    result = demographic_differences(stored, received, ["PatientID", "PatientSex"])
    assert result == [Difference("PatientSex", "M", "F")]


def test_no_keywords_means_no_differences() -> None:
    assert demographic_differences({"PatientID": "1"}, {"PatientID": "2"}, []) == []


def test_trailing_spaces_are_padding() -> None:
    stored = {"PatientName": "DOE^JOHN ", "AccessionNumber": "A1"}
    received = {"PatientName": "DOE^JOHN", "AccessionNumber": "A1  "}
    assert demographic_differences(stored, received, ["PatientName", "AccessionNumber"]) == []


def test_reported_values_have_trailing_spaces_removed() -> None:
    result = demographic_differences({"PatientID": "1 "}, {"PatientID": "2  "}, ["PatientID"])
    assert result == [Difference("PatientID", "1", "2")]


def test_inner_spaces_still_count() -> None:
    result = demographic_differences(
        {"PatientName": "DOE^JOHN"}, {"PatientName": "DOE ^JOHN"}, ["PatientName"]
    )
    assert result == [Difference("PatientName", "DOE^JOHN", "DOE ^JOHN")]


def test_comparison_is_case_sensitive() -> None:
    result = demographic_differences({"PatientSex": "M"}, {"PatientSex": "m"}, ["PatientSex"])
    assert result == [Difference("PatientSex", "M", "m")]


def test_missing_keys_are_treated_as_empty() -> None:
    keywords = ["PatientID", "IssuerOfPatientID"]
    assert demographic_differences({}, {"PatientID": "", "IssuerOfPatientID": " "}, keywords) == []
    assert demographic_differences({"PatientID": ""}, {}, keywords) == []
    result = demographic_differences({"PatientID": "1"}, {}, keywords)
    assert result == [Difference("PatientID", "1", "")]
    result = demographic_differences({}, {"IssuerOfPatientID": "HOSP"}, keywords)
    assert result == [Difference("IssuerOfPatientID", "", "HOSP")]


def test_none_values_are_treated_as_empty() -> None:
    stored: dict[str, str | None] = {"PatientBirthDate": None}
    received: dict[str, str | None] = {"PatientBirthDate": ""}
    assert demographic_differences(stored, received, ["PatientBirthDate"]) == []  # type: ignore[arg-type]


def test_results_follow_the_order_of_keywords() -> None:
    stored = {"PatientName": "A", "PatientID": "1", "PatientSex": "M", "AccessionNumber": "X"}
    received = {"AccessionNumber": "Y", "PatientSex": "F", "PatientID": "2", "PatientName": "B"}
    order = ["PatientSex", "AccessionNumber", "PatientName", "PatientID"]
    result = demographic_differences(stored, received, order)
    assert [d.keyword for d in result] == order
    result = demographic_differences(stored, received, list(reversed(order)))
    assert [d.keyword for d in result] == list(reversed(order))


def test_keywords_may_be_any_iterable() -> None:
    result = demographic_differences(
        {"PatientID": "1"}, {"PatientID": "2"}, (k for k in ["PatientID"])
    )
    assert [d.keyword for d in result] == ["PatientID"]


def test_match_fields_map_partition_flags_to_keywords() -> None:
    assert MATCH_FIELDS == {
        "match_patient_name": "PatientName",
        "match_patient_id": "PatientID",
        "match_patient_sex": "PatientSex",
        "match_patient_birth_date": "PatientBirthDate",
        "match_accession_number": "AccessionNumber",
        "match_issuer_of_patient_id": "IssuerOfPatientID",
    }
