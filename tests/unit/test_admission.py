"""Unit tests for association admission (node/policy/admission.py)."""

from __future__ import annotations

import dataclasses

import pytest

from node.policy.admission import (
    Admission,
    DeviceView,
    PartitionPolicy,
    RejectReason,
    decide,
)


def _partition(**overrides: object) -> PartitionPolicy:
    values: dict[str, object] = {
        "id": 1,
        "ae_title": "PACSNODE",
        "port": 11112,
        "folder": "PACSNODE",
        "enabled": True,
        "accept_any_device": True,
        "auto_insert_devices": True,
        "default_remote_port": 104,
        "duplicate_policy": "reject",
        "match_fields": ("PatientID",),
    }
    values.update(overrides)
    return PartitionPolicy(**values)  # type: ignore[arg-type]


def _device(**overrides: object) -> DeviceView:
    values: dict[str, object] = {
        "id": 7,
        "name": "ct1",
        "ae_title": "CT1",
        "enabled": True,
        "allow_storage": True,
        "coercion_rules": "",
    }
    values.update(overrides)
    return DeviceView(**values)  # type: ignore[arg-type]


def test_reason_values_are_ps38_result_source_diagnostic() -> None:
    # PS3.8 9.3.4: result 1 = rejected-permanent, source 1 = service-user,
    # diagnostic 7 = called-AE-title-not-recognized, 3 = calling-AE-title-not-recognized.
    assert RejectReason.CALLED_AE_NOT_RECOGNISED.value == (1, 1, 7)
    assert RejectReason.CALLING_AE_NOT_RECOGNISED.value == (1, 1, 3)


def test_unknown_called_ae_is_rejected() -> None:
    decision = decide(None, _device(), "CT1", "NOSUCH")
    assert decision.accepted is False
    assert decision.reason is RejectReason.CALLED_AE_NOT_RECOGNISED
    assert decision.reason.value == (1, 1, 7)
    assert "NOSUCH" in decision.explanation
    assert decision.auto_insert is False


def test_unknown_called_ae_is_rejected_even_for_unknown_device() -> None:
    decision = decide(None, None, "ANY", "NOSUCH")
    assert decision.accepted is False
    assert decision.reason is RejectReason.CALLED_AE_NOT_RECOGNISED


@pytest.mark.parametrize("device_known", [True, False])
def test_disabled_partition_is_rejected_as_called_ae_not_recognised(device_known: bool) -> None:
    partition = _partition(enabled=False)
    device = _device() if device_known else None
    decision = decide(partition, device, "CT1", "PACSNODE")
    assert decision.accepted is False
    assert decision.reason is RejectReason.CALLED_AE_NOT_RECOGNISED
    assert "disabled" in decision.explanation
    assert decision.auto_insert is False


@pytest.mark.parametrize("accept_any", [True, False])
@pytest.mark.parametrize("auto_insert", [True, False])
def test_known_enabled_device_is_accepted(accept_any: bool, auto_insert: bool) -> None:
    partition = _partition(accept_any_device=accept_any, auto_insert_devices=auto_insert)
    decision = decide(partition, _device(), "CT1", "PACSNODE")
    assert decision == Admission(True)
    assert decision.reason is None
    assert decision.auto_insert is False  # already in the table: never inserted again


@pytest.mark.parametrize("accept_any", [True, False])
def test_known_disabled_device_is_rejected_even_when_any_device_is_accepted(
    accept_any: bool,
) -> None:
    partition = _partition(accept_any_device=accept_any, auto_insert_devices=True)
    decision = decide(partition, _device(enabled=False), "CT1", "PACSNODE")
    assert decision.accepted is False
    assert decision.reason is RejectReason.CALLING_AE_NOT_RECOGNISED
    assert decision.reason.value == (1, 1, 3)
    assert "ct1" in decision.explanation
    assert "disabled" in decision.explanation
    assert decision.auto_insert is False


@pytest.mark.parametrize("auto_insert", [True, False])
def test_unknown_device_is_rejected_when_only_known_devices_are_accepted(
    auto_insert: bool,
) -> None:
    partition = _partition(accept_any_device=False, auto_insert_devices=auto_insert)
    decision = decide(partition, None, "STRANGER", "PACSNODE")
    assert decision.accepted is False
    assert decision.reason is RejectReason.CALLING_AE_NOT_RECOGNISED
    assert "STRANGER" in decision.explanation
    assert decision.auto_insert is False


@pytest.mark.parametrize("auto_insert", [True, False])
def test_unknown_device_is_accepted_when_any_device_is(auto_insert: bool) -> None:
    partition = _partition(accept_any_device=True, auto_insert_devices=auto_insert)
    decision = decide(partition, None, "STRANGER", "PACSNODE")
    assert decision.accepted is True
    assert decision.reason is None
    assert decision.auto_insert is auto_insert


def test_an_unchecked_device_is_refused_transiently_where_only_known_devices_may_come(
) -> None:
    # The device table cannot be read (the database does not answer) and this AE was not
    # looked up before: a transient reject, so the device tries again, never "not recognised".
    partition = _partition(accept_any_device=False)
    decision = decide(partition, None, "STRANGER", "PACSNODE", device_checked=False)
    assert decision.accepted is False
    assert decision.reason is RejectReason.LOCAL_LIMIT_EXCEEDED
    assert "STRANGER" in decision.explanation and "unavailable" in decision.explanation


def test_an_unchecked_device_is_admitted_where_any_device_may_come_but_not_added() -> None:
    partition = _partition(accept_any_device=True, auto_insert_devices=True)
    decision = decide(partition, None, "STRANGER", "PACSNODE", device_checked=False)
    assert decision.accepted is True and decision.auto_insert is False


def test_admission_is_immutable() -> None:
    decision = decide(_partition(), None, "X", "PACSNODE")
    with pytest.raises(dataclasses.FrozenInstanceError):
        decision.accepted = False  # type: ignore[misc]
