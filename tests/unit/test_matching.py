"""Unit tests for study demographic matching (node/policy/matching.py)."""

from __future__ import annotations

import pytest

from node.db.indexer import InstanceAttributes
from node.db.models import Partition
from node.ingest.lookup import policy_of
from node.policy.matching import Difference, demographic_differences


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


# The partition's study-matching flags (docs/how-to/coercion.md), as the model declares them.
FLAGS = sorted(c.name for c in Partition.__table__.columns if c.name.startswith("match_"))


def named_keyword(flag: str) -> str:
    """The DICOM keyword a flag names: match_patient_birth_date -> PatientBirthDate."""
    words = flag.removeprefix("match_").split("_")
    return "".join("ID" if w == "id" else w.capitalize() for w in words)


def partition(**flags: bool) -> Partition:
    return Partition(id=1, ae_title="P", port=104, folder="P", enabled=True,
                     accept_any_device=True, auto_insert_devices=False,
                     default_remote_port=104, duplicate_policy="send-success",
                     forwarding_enabled=True, max_associations=0,
                     **{flag: flags.get(flag, False) for flag in FLAGS})


@pytest.mark.parametrize("flag", FLAGS)
def test_each_partition_flag_compares_the_demographic_it_names(flag: str) -> None:
    """With only this flag set, a study whose every demographic differs reports exactly the
    keyword the flag names; the keyword is one the store compares (the demographics of a
    received instance)."""
    policy = policy_of(partition(**{flag: True}))
    keyword = named_keyword(flag)
    assert policy.match_fields == (keyword,)
    stored = InstanceAttributes({}).demographics
    assert keyword in stored
    received = {kw: "CHANGED" for kw in stored}
    assert [d.keyword for d in demographic_differences(stored, received,
                                                       policy.match_fields)] == [keyword]


def test_no_flag_no_comparison_every_flag_every_demographic() -> None:
    assert len(FLAGS) >= 6
    assert policy_of(partition()).match_fields == ()
    every = policy_of(partition(**dict.fromkeys(FLAGS, True))).match_fields
    assert sorted(every) == sorted(named_keyword(flag) for flag in FLAGS)
