"""Who may open an association with which partition: a pure decision over looked-up records."""

from __future__ import annotations

import enum
from dataclasses import dataclass


class RejectReason(enum.Enum):
    """A-ASSOCIATE-RJ (result, source, diagnostic) per PS3.8 9.3.4."""

    CALLED_AE_NOT_RECOGNISED = (0x01, 0x01, 0x07)
    CALLING_AE_NOT_RECOGNISED = (0x01, 0x01, 0x03)
    LOCAL_LIMIT_EXCEEDED = (0x02, 0x03, 0x02)


@dataclass(frozen=True)
class PartitionPolicy:
    id: int
    ae_title: str
    port: int
    folder: str
    enabled: bool
    accept_any_device: bool
    auto_insert_devices: bool
    default_remote_port: int
    duplicate_policy: str
    match_fields: tuple[str, ...]
    # Query/retrieve overrides; None: the node default.
    case_sensitive_matching: bool | None = None
    empty_matching: bool | None = None
    query_limit: int | None = None
    forwarding_enabled: bool = True
    max_associations: int = 0  # 0: only the node's limit


@dataclass(frozen=True)
class DeviceView:
    id: int
    name: str
    ae_title: str
    enabled: bool
    allow_storage: bool
    coercion_rules: str
    allow_query: bool = True
    allow_retrieve: bool = True
    max_inbound_associations: int = 0  # 0: the node's per-device default


@dataclass(frozen=True)
class Admission:
    accepted: bool
    reason: RejectReason | None = None
    explanation: str = ""
    auto_insert: bool = False


def decide(
    partition: PartitionPolicy | None, device: DeviceView | None, calling_ae: str,
    called_ae: str, device_checked: bool = True
) -> Admission:
    """Admission of an A-ASSOCIATE-RQ (accept any device, auto insert: docs/how-to/partitions.md).

    `device_checked` False: the device table could not be read (the database does not
    answer) and `calling_ae` was not looked up before. A partition that accepts any device
    admits it (not added to the table now); one that does not refuses it transiently, so
    the device tries again rather than take the refusal for good."""
    if partition is None:
        return Admission(False, RejectReason.CALLED_AE_NOT_RECOGNISED,
                         f"no partition {called_ae!r} on this port")
    if not partition.enabled:
        return Admission(False, RejectReason.CALLED_AE_NOT_RECOGNISED,
                         f"partition {called_ae!r} is disabled")
    if device is not None:
        if not device.enabled:
            return Admission(False, RejectReason.CALLING_AE_NOT_RECOGNISED,
                             f"device {device.name!r} ({calling_ae}) is disabled")
        return Admission(True)
    if not device_checked:
        if partition.accept_any_device:
            return Admission(True)
        return Admission(False, RejectReason.LOCAL_LIMIT_EXCEEDED,
                         f"{calling_ae!r} cannot be checked: the device table of {called_ae!r}"
                         " cannot be read (index database unavailable)")
    if not partition.accept_any_device:
        return Admission(False, RejectReason.CALLING_AE_NOT_RECOGNISED,
                         f"{calling_ae!r} is not in the device table of {called_ae!r}")
    return Admission(True, auto_insert=partition.auto_insert_devices)


@dataclass(frozen=True)
class Limits:
    """Inbound association limits (docs/how-to/limits.md); 0: no limit."""

    node: int
    per_device: int  # the default for devices without a limit of their own


@dataclass(frozen=True)
class OpenAssociations:
    """Associations already admitted: over the node, to the partition, from the device."""

    node: int
    partition: int
    device: int


def over_limit(limits: Limits, partition: PartitionPolicy, device: DeviceView | None,
               calling_ae: str, open_now: OpenAssociations) -> str | None:
    """Why one more association would exceed a limit (a transient reject), or None."""
    if limits.node and open_now.node >= limits.node:
        return f"the node already has {open_now.node} associations (limit {limits.node})"
    if partition.max_associations and open_now.partition >= partition.max_associations:
        return (f"partition {partition.ae_title} already has {open_now.partition} "
                f"associations (limit {partition.max_associations})")
    device_limit = (device.max_inbound_associations if device is not None
                    and device.max_inbound_associations else limits.per_device)
    if device_limit and open_now.device >= device_limit:
        who = f"device {device.name!r}" if device is not None else f"calling AE {calling_ae!r}"
        return f"{who} already has {open_now.device} associations (limit {device_limit})"
    return None
