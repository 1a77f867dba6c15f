"""Hierarchy-wide device records: versions, the change log, applying a neighbour's records.

A device with scope "hierarchy" replicates to every node of the tree. Each version of it is a
record (name, origin node, version, deleted, payload). The version is a hybrid logical clock,
so every node orders two edits of one record the same way: the greater version wins
everywhere (last writer wins, ties broken by node id). Applying a record that is newer than
the one held appends it to the change log, which is what the node pushes to its neighbours;
a record that is not newer is ignored and not logged, which is what stops a change from
looping. The transport between nodes lives in `hierarchy`; this module is the data.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from node.db.models import (
    Category,
    Device,
    DeviceChange,
    DeviceType,
    NodeMeta,
    ReplicatedDevice,
    utcnow,
)
from node.hostnames import resolve_ip

log = logging.getLogger(__name__)

LOCAL = "local"
HIERARCHY = "hierarchy"
SCOPES = (LOCAL, HIERARCHY)

# What a record carries: the device's settings except what is per node (its IP is resolved
# by each node, a partition exists only on one node, the name is the record's key).
PAYLOAD_FIELDS = (
    "ae_title", "host", "port", "tls_port", "device_type", "enabled", "description",
    "coercion_rules", "allow_storage", "allow_query", "allow_retrieve", "max_pdu_size",
    "acse_timeout", "dimse_timeout", "network_timeout", "transfer_syntaxes", "forward",
    "forward_rules", "max_outbound_tasks", "heartbeat", "remove_private_tags", "send_updates",
    "storage_commitment",
)
# Types that describe one node's own neighbours; they never replicate.
LOCAL_ONLY_TYPES = frozenset({DeviceType.PARENT, DeviceType.CHILD})


@dataclass(frozen=True)
class Record:
    name: str
    origin_node: str
    version: str
    deleted: bool
    payload: str  # JSON; '' for a tombstone


def format_version(wall_ms: int, counter: int, node_id: str) -> str:
    return f"{wall_ms:013d}.{counter:06d}.{node_id}"


def parse_version(version: str) -> tuple[int, int, str]:
    wall, counter, node_id = version.split(".", 2)
    return int(wall), int(counter), node_id


def next_version(latest: str | None, node_id: str, now_ms: int) -> str:
    """The hybrid logical clock's next tick after `latest`, the newest version this node holds.

    It is greater than every version the node has seen, so an edit made after receiving a
    record always wins over it, even if this node's wall clock is behind.
    """
    if latest is None:
        return format_version(now_ms, 0, node_id)
    wall, counter, _ = parse_version(latest)
    if now_ms > wall:
        return format_version(now_ms, 0, node_id)
    return format_version(wall, counter + 1, node_id)


# --- node identity and the change-log counter -------------------------------------------

def node_id(session: Session) -> str:
    value = session.get(NodeMeta, "node_id")
    return value.value if value is not None else ""


def set_node_id(session: Session, value: str) -> None:
    row = session.get(NodeMeta, "node_id")
    if row is None:
        session.add(NodeMeta(key="node_id", value=value))
    elif row.value != value:
        log.warning("node id changes from %s to %s", row.value, value)
        row.value = value


def _next_seq(session: Session) -> int:
    # The row lock serialises appends on PostgreSQL (SQLite already has one writer), so a
    # change with a lower seq can never commit after a neighbour's cursor has passed it.
    row = session.scalar(select(NodeMeta).where(NodeMeta.key == "change_seq").with_for_update())
    if row is None:
        row = NodeMeta(key="change_seq", value="0")
        session.add(row)
    seq = int(row.value) + 1
    row.value = str(seq)
    return seq


def last_seq(session: Session) -> int:
    return session.scalar(select(func.max(DeviceChange.seq))) or 0


# --- records ----------------------------------------------------------------------------

def payload_of(device: Device) -> str:
    data: dict[str, Any] = {key: getattr(device, key) for key in PAYLOAD_FIELDS}
    data["category"] = device.category.name if device.category else None
    return json.dumps(data, sort_keys=True)


def held(session: Session, name: str) -> ReplicatedDevice | None:
    return session.get(ReplicatedDevice, name)


def _store(session: Session, record: Record, received_from: str) -> None:
    row = held(session, record.name)
    if row is None:
        session.add(ReplicatedDevice(name=record.name, origin_node=record.origin_node,
                                     version=record.version, deleted=record.deleted,
                                     payload=record.payload))
    else:
        row.origin_node = record.origin_node
        row.version = record.version
        row.deleted = record.deleted
        row.payload = record.payload
        row.updated_at = utcnow()
    session.add(DeviceChange(seq=_next_seq(session), name=record.name,
                             origin_node=record.origin_node, version=record.version,
                             deleted=record.deleted, payload=record.payload,
                             received_from=received_from))
    session.flush()


def record_local_change(session: Session, name: str, *, deleted: bool = False) -> Record:
    """Log this node's edit of hierarchy-wide device `name` (call after changing the row)."""
    me = node_id(session)
    latest = session.scalar(select(func.max(ReplicatedDevice.version)))
    version = next_version(latest, me, int(time.time() * 1000))
    current = held(session, name)
    payload = ""
    if not deleted:
        device = session.scalar(select(Device).where(Device.name == name))
        assert device is not None
        device.origin_node = device.origin_node or me
        payload = payload_of(device)
    origin = current.origin_node if current is not None else me
    record = Record(name, origin, version, deleted, payload)
    _store(session, record, "")
    return record


def apply(session: Session, record: Record, received_from: str) -> bool:
    """Apply a neighbour's record if it is newer than what this node holds; True if applied."""
    current = held(session, record.name)
    if current is not None and current.version >= record.version:
        return False
    _store(session, record, received_from)
    device = session.scalar(select(Device).where(Device.name == record.name))
    if record.deleted:
        if device is not None and device.scope == HIERARCHY:
            session.delete(device)
        return True
    if device is None:
        device = Device(name=record.name)
        session.add(device)
    elif device.scope != HIERARCHY:
        log.warning("hierarchy-wide device %s from %s replaces the local device of that name",
                    record.name, record.origin_node)
    _materialise(session, device, record)
    session.flush()
    clash = session.scalar(select(Device.name).where(
        Device.ae_title == device.ae_title, Device.partition_id.is_(None),
        Device.name != device.name))
    if clash is not None:
        log.warning("hierarchy-wide device %s has AE title %s, like device %s: associations"
                    " from that AE title may match either", device.name, device.ae_title, clash)
    return True


def _materialise(session: Session, device: Device, record: Record) -> None:
    data = json.loads(record.payload)
    for key in PAYLOAD_FIELDS:
        if key in data:
            setattr(device, key, data[key])
    category = data.get("category")
    device.category_id = _category_id(session, category) if category else None
    device.ip = resolve_ip(device.host)
    device.partition_id = None
    device.scope = HIERARCHY
    device.origin_node = record.origin_node
    device.auto_inserted = False
    device.neighbour_id = ""


def _category_id(session: Session, name: str) -> int:
    """The local category of that name, created (one connection) if this node lacks it."""
    category_id = session.scalar(select(Category.id).where(Category.name == name))
    if category_id is None:
        category = Category(name=name, max_connections=1)
        session.add(category)
        session.flush()
        category_id = category.id
    return category_id


def changes_after(session: Session, cursor: int, limit: int) -> list[tuple[int, str, Record]]:
    """(seq, received_from, record) of the change log after `cursor`, oldest first."""
    rows = session.scalars(select(DeviceChange).where(DeviceChange.seq > cursor)
                           .order_by(DeviceChange.seq).limit(limit))
    return [(c.seq, c.received_from,
             Record(c.name, c.origin_node, c.version, c.deleted, c.payload)) for c in rows]


def snapshot(session: Session) -> list[Record]:
    """Every record held, tombstones included: what a new neighbour needs instead of history."""
    return [Record(r.name, r.origin_node, r.version, r.deleted, r.payload)
            for r in session.scalars(select(ReplicatedDevice).order_by(ReplicatedDevice.name))]
