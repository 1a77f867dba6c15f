"""Device table administration: validation and table changes behind `pacsnode device`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pydicom.uid import AllTransferSyntaxes
from sqlalchemy import select
from sqlalchemy.orm import Session

from node import replication
from node.config import resolve_transfer_syntax
from node.db.models import Category, Device, DeviceType
from node.hostnames import is_ip, resolve_ip
from node.partitions import AdminError, check_ae_title, check_port
from node.partitions import get as get_partition
from node.policy.coercion import CoercionError, parse_rules
from node.policy.routing import RuleError
from node.policy.routing import parse_rules as parse_forward_rules

EDITABLE = (
    "name", "ae_title", "host", "port", "tls_port", "device_type", "enabled", "partition",
    "description", "coercion_rules", "allow_storage", "allow_query", "allow_retrieve",
    "max_pdu_size", "acse_timeout", "dimse_timeout", "network_timeout", "transfer_syntaxes",
    "forward", "forward_rules", "max_outbound_tasks", "category", "heartbeat",
    "remove_private_tags", "send_updates", "storage_commitment", "scope",
    "max_inbound_associations",
)


def _validate(session: Session, values: dict[str, Any], current: Device | None) -> None:
    unknown = set(values) - set(EDITABLE)
    if unknown:
        raise AdminError(f"unknown device setting(s): {', '.join(sorted(unknown))}")
    if "name" in values:
        name = values["name"].strip()
        if not name or len(name) > 64:
            raise AdminError("device name must be 1 to 64 characters")
        clash = session.scalar(select(Device).where(Device.name == name))
        if clash is not None and clash is not current:
            raise AdminError(f"a device named {name!r} already exists")
        values["name"] = name
    if "ae_title" in values:
        values["ae_title"] = check_ae_title(values["ae_title"])
    if "port" in values:
        check_port(values["port"])
    if "tls_port" in values:
        check_port(values["tls_port"], "TLS port", allow_zero=True)
    if "device_type" in values:
        try:
            values["device_type"] = DeviceType(values["device_type"].upper()).value
        except ValueError:
            known = ", ".join(t.value for t in DeviceType)
            raise AdminError(f"device type {values['device_type']!r} is not one of {known}"
                             ) from None
    if "partition" in values:
        partition = values.pop("partition")
        values["partition_id"] = get_partition(session, partition).id if partition else None
    if "coercion_rules" in values:
        try:
            parse_rules(values["coercion_rules"])
        except CoercionError as exc:
            raise AdminError(f"invalid coercion rule: {exc}") from None
    if values.get("max_pdu_size") and values["max_pdu_size"] < 4096:
        raise AdminError("max PDU size must be 0 (node default) or at least 4096")
    for key in ("acse_timeout", "dimse_timeout", "network_timeout"):
        if values.get(key) is not None and values[key] < 0:
            raise AdminError(f"{key.replace('_', ' ')} must be 0 (node default) or positive")
    if "transfer_syntaxes" in values:
        values["transfer_syntaxes"] = ",".join(
            _transfer_syntax(ts) for ts in values["transfer_syntaxes"].split(",") if ts.strip())
    if "forward_rules" in values:
        try:
            parse_forward_rules(values["forward_rules"])
        except RuleError as exc:
            raise AdminError(f"invalid forwarding rule: {exc}") from None
    if values.get("max_outbound_tasks") is not None and values["max_outbound_tasks"] < 1:
        raise AdminError("max outbound tasks must be at least 1")
    if values.get("max_inbound_associations") is not None and values[
            "max_inbound_associations"] < 0:
        raise AdminError("max inbound associations must be 0 (node default) or positive")
    if "category" in values:
        category = values.pop("category")
        if category:
            category_id = session.scalar(select(Category.id).where(Category.name == category))
            if category_id is None:
                raise AdminError(f"no category named {category!r} (pacsnode category add)")
            values["category_id"] = category_id
        else:
            values["category_id"] = None
    if "host" in values:
        values["host"] = values["host"].strip()
        values["ip"] = resolve_ip(values["host"])
    ae = values.get("ae_title", current.ae_title if current else None)
    pid = values.get("partition_id", current.partition_id if current else None)
    _check_scope(values, current, pid)
    _check_self(session, values, current, pid)
    if ae is not None:
        clash = session.scalar(select(Device).where(Device.ae_title == ae,
                                                    Device.partition_id.is_(pid) if pid is None
                                                    else Device.partition_id == pid))
        if clash is not None and clash is not current:
            scope = "node-wide" if pid is None else "in that partition"
            raise AdminError(f"device {clash.name!r} already has AE title {ae} {scope}")


def _check_scope(values: dict[str, Any], current: Device | None, pid: int | None) -> None:
    scope = values.get("scope", current.scope if current else replication.LOCAL)
    if scope not in replication.SCOPES:
        raise AdminError(f"scope must be one of {', '.join(replication.SCOPES)}, not {scope!r}")
    if scope != replication.HIERARCHY:
        return
    if pid is not None:
        raise AdminError("a hierarchy-wide device belongs to every partition: partitions differ"
                         " from node to node (leave --partition empty)")
    device_type = values.get("device_type", current.device_type if current else DeviceType.DICOM)
    if device_type in replication.LOCAL_ONLY_TYPES:
        raise AdminError(f"{device_type} devices describe this node's own neighbours and stay"
                         " local (registration creates them)")


def _check_self(session: Session, values: dict[str, Any], current: Device | None,
                pid: int | None) -> None:
    """One Self device per node, as in eRAD's device table: the server itself, so it serves
    every partition and stays local."""
    device_type = values.get("device_type", current.device_type if current else DeviceType.DICOM)
    if device_type != DeviceType.SELF:
        return
    if pid is not None:
        raise AdminError("the Self device is this node itself and serves every partition "
                         "(leave --partition empty; `pacsnode import --partition` picks one)")
    if values.get("scope", current.scope if current else replication.LOCAL) != replication.LOCAL:
        raise AdminError("the Self device is this node itself: it stays local")
    other = session.scalar(select(Device.name).where(Device.device_type == DeviceType.SELF.value,
                                                     Device.id != (current.id if current
                                                                   and current.id else -1)))
    if other is not None:
        raise AdminError(f"device {other!r} is already this node's Self device (one per node)")


def _transfer_syntax(value: str) -> str:
    uid = resolve_transfer_syntax(value.strip())
    if uid not in {str(ts) for ts in AllTransferSyntaxes}:
        raise AdminError(f"{value.strip()!r} is not a known transfer syntax")
    return uid


def get(session: Session, name: str) -> Device:
    device = session.scalar(select(Device).where(Device.name == name))
    if device is None:
        raise AdminError(f"no device named {name!r}")
    return device


def add(session: Session, **values: Any) -> Device:
    values.setdefault("name", values.get("ae_title", ""))
    _validate(session, values, None)
    device = Device(**values)
    session.add(device)
    session.flush()
    if device.scope == replication.HIERARCHY:
        replication.record_local_change(session, device.name)
    return device


def edit(session: Session, current_name: str, /, **values: Any) -> Device:
    device = get(session, current_name)
    was_shared = device.scope == replication.HIERARCHY
    _validate(session, values, device)
    for key, value in values.items():
        setattr(device, key, value)
    session.flush()
    shared = device.scope == replication.HIERARCHY
    # A rename or a change to local scope removes the record elsewhere (a tombstone); the
    # device itself stays here.
    if was_shared and (not shared or device.name != current_name):
        replication.record_local_change(session, current_name, deleted=True)
    if shared:
        replication.record_local_change(session, device.name)
    return device


def delete(session: Session, name: str) -> None:
    device = get(session, name)
    shared = device.scope == replication.HIERARCHY
    session.delete(device)
    session.flush()
    if shared:
        replication.record_local_change(session, name, deleted=True)


def listing(session: Session, partition: str | None = None) -> list[Device]:
    query = select(Device).order_by(Device.name)
    if partition:
        query = query.where(Device.partition_id == get_partition(session, partition).id)
    return list(session.scalars(query))


def as_dict(d: Device) -> dict[str, Any]:
    out: dict[str, Any] = {key: getattr(d, key) for key in EDITABLE
                           if key not in ("partition", "category")}
    out["category"] = d.category.name if d.category else None
    out["ip"] = d.ip
    out["partition"] = d.partition.ae_title if d.partition else None
    out["auto_inserted"] = d.auto_inserted
    out["origin_node"] = d.origin_node
    out["neighbour_id"] = d.neighbour_id
    return out


@dataclass(frozen=True)
class IpChange:
    device: str
    host: str
    old: str
    new: str


def refresh_ips(session: Session) -> list[IpChange]:
    """Re-resolve every device given by host name (Refresh IP, docs/how-to/hierarchy.md)."""
    changes = []
    for device in session.scalars(select(Device).order_by(Device.name)):
        host = device.host.strip()
        if not host or is_ip(host):
            continue
        new = resolve_ip(host)
        if new and new != device.ip:
            changes.append(IpChange(device.name, host, device.ip, new))
            device.ip = new
        elif not new:
            changes.append(IpChange(device.name, host, device.ip, ""))
    return changes
