"""Forwarding decisions (pure): which devices get an instance, and the retry schedule."""

from __future__ import annotations

import pytest

from node.forwarding.queue import backoff_seconds
from node.policy.routing import Received, Route, RuleError, destinations, parse_rules

CT = Received(partition_id=1, modality="CT", calling_ae="CT1",
              sop_class="1.2.840.10008.5.1.4.1.1.2")


def route(device_id: int, kind: str, rules: str = "", partition: int | None = None,
          enabled: bool = True, forward: bool = True) -> Route:
    return Route(device_id, kind, partition, enabled, forward, parse_rules(rules))


def test_parents_and_backup_targets_get_everything_of_their_partition() -> None:
    routes = [route(1, "PARENT"), route(2, "BACKUP_TARGET", partition=1),
              route(3, "BACKUP_TARGET", partition=2), route(4, "DICOM"), route(5, "CHILD")]
    assert destinations(routes, CT) == [1, 2]


def test_disabled_or_not_forwarding_devices_get_nothing() -> None:
    routes = [route(1, "PARENT", enabled=False), route(2, "PARENT", forward=False)]
    assert destinations(routes, CT) == []


def test_rules_narrow_and_viewers_need_them() -> None:
    routes = [route(1, "PARENT", "modality MR"), route(2, "BACKUP_TARGET", "modality ct mr"),
              route(3, "VIEWER"), route(4, "VIEWER", "calling-ae CT1\nmodality CT"),
              route(5, "VIEWER", "calling-ae CT2"),
              route(6, "PARENT", "sop-class 1.2.840.10008.5.1.4.1.1.2  # CT only")]
    assert destinations(routes, CT) == [2, 4, 6]


@pytest.mark.parametrize(("text", "message"), [
    ("colour red", "unknown rule"), ("modality", "needs at least one value")])
def test_bad_rules_are_refused_with_the_line(text: str, message: str) -> None:
    with pytest.raises(RuleError, match=f"line 1: .*{message}"):
        parse_rules(text)


def test_backoff_doubles_up_to_the_cap() -> None:
    assert [backoff_seconds(n, 10, 60) for n in range(1, 6)] == [10, 20, 40, 60, 60]
    assert backoff_seconds(0, 10, 60) == 10


def test_routed_device_types_are_the_schema_s() -> None:
    # policy/routing.py names the types as strings so that it imports no schema; they must
    # stay DeviceType's values (a renamed type would route nothing).
    from node.db.models import DeviceType
    from node.policy.routing import AUTO_ROUTED_TYPE, ROUTED_TYPES

    assert {*ROUTED_TYPES, AUTO_ROUTED_TYPE} <= {t.value for t in DeviceType}
    assert {DeviceType.PARENT, DeviceType.BACKUP_TARGET} == ROUTED_TYPES
    assert AUTO_ROUTED_TYPE == DeviceType.VIEWER
