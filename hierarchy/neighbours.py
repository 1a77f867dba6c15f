"""This node's parent and children: who they are, whether they answer, their device entries.

Registration puts each neighbour in the device table: the parent as a PARENT device (which the
forwarding queue sends everything to) and each partition of a child as a CHILD device (so its
stores and queries are admitted). Losing contact marks a neighbour unreachable; nothing is
deleted.
"""

from __future__ import annotations

import json
from datetime import datetime, timedelta

from google.protobuf import json_format
from sqlalchemy import select, update
from sqlalchemy.orm import Session

from hierarchy.rpc import control_pb2 as pb
from node.config import Settings
from node.db.models import Device, DeviceType, Neighbour, utcnow
from node.db.tables import rowcount
from node.hostnames import resolve_ip

PARENT = "parent"
CHILD = "child"
MISSED_HEARTBEATS = 3  # then a neighbour counts as unreachable


def info_of(n: Neighbour) -> pb.NodeInfo:
    return json_format.ParseDict(json.loads(n.info), pb.NodeInfo(), ignore_unknown_fields=True)


def alive(n: Neighbour, now: datetime | None = None) -> bool:
    """Answered recently enough: within MISSED_HEARTBEATS of its heartbeat interval."""
    if not n.reachable or n.last_seen is None:
        return False
    now = now or utcnow()
    last_seen = n.last_seen if n.last_seen.tzinfo else n.last_seen.replace(tzinfo=now.tzinfo)
    return now - last_seen <= timedelta(seconds=MISSED_HEARTBEATS * n.heartbeat_seconds)


def shifted(last_seen: datetime, now: datetime, jump: float) -> datetime | None:
    """When a neighbour was last seen, after the wall clock jumped `jump` seconds (None: keep
    it): a time taken before the step moves with the clock, so its age, and `alive`, stay
    what they were (a step forward must not make every neighbour dead, a step back a dead one
    alive for the length of the step). A time taken after the step is left as it is: before
    a step forward every stored time is at least `jump` old; after a step back only the times
    taken before it lie ahead of now."""
    step = timedelta(seconds=jump)
    if jump > 0 and last_seen <= now - step:
        return last_seen + step
    if jump < 0 and last_seen > now:
        return last_seen + step
    return None


def shift_last_seen(session: Session, jump: float) -> int:
    """Apply `shifted` to every neighbour (a handful of rows); returns how many moved."""
    now = utcnow()
    moved = 0
    for n in session.scalars(select(Neighbour).where(Neighbour.last_seen.is_not(None))):
        assert n.last_seen is not None
        seen = n.last_seen if n.last_seen.tzinfo else n.last_seen.replace(tzinfo=now.tzinfo)
        new = shifted(seen, now, jump)
        if new is not None:
            n.last_seen = new
            moved += 1
    return moved


def get(session: Session, node_id: str) -> Neighbour | None:
    return session.get(Neighbour, node_id)


def parent(session: Session) -> Neighbour | None:
    return session.scalar(select(Neighbour).where(Neighbour.role == PARENT))


def children(session: Session) -> list[Neighbour]:
    return list(session.scalars(select(Neighbour).where(Neighbour.role == CHILD)
                                .order_by(Neighbour.node_id)))


def _upsert(session: Session, info: pb.NodeInfo, role: str) -> Neighbour:
    n = get(session, info.node_id)
    if n is None:
        n = Neighbour(node_id=info.node_id, role=role, cursor=0)
        session.add(n)
    n.role = role
    n.control_address = info.control_address
    n.site = info.site
    n.info = json_format.MessageToJson(info, indent=None)
    n.heartbeat_seconds = info.heartbeat_seconds or 10.0
    n.last_seen = utcnow()
    n.reachable = True
    n.last_error = ""
    return n


def record_child(session: Session, info: pb.NodeInfo) -> None:
    """A child registered: remember it and give each of its partitions a CHILD device."""
    _upsert(session, info, CHILD)
    current = []
    for p in info.partitions:
        device = _managed_device(session, _by_ae(session, info.node_id, p.ae_title), info,
                                 p, info.dicom_host, DeviceType.CHILD)
        device.enabled = p.enabled
        current.append(device.id)
    _disable_others(session, info.node_id, current)


def record_parent(session: Session, info: pb.NodeInfo, settings: Settings) -> str:
    """The parent answered a registration: remember it and keep its PARENT device current.

    Returns the AE title forwarding uses at the parent, or '' if it has no usable partition.
    """
    for old in session.scalars(select(Neighbour).where(Neighbour.role == PARENT,
                                                       Neighbour.node_id != info.node_id)):
        session.delete(old)
    _upsert(session, info, PARENT)
    h = settings.hierarchy
    partitions = [p for p in info.partitions if p.enabled]
    if h.parent_ae_title:
        partitions = [p for p in info.partitions if p.ae_title == h.parent_ae_title]
    # One PARENT device, updated in place even when the parent or its partition changes:
    # forward jobs queued for it stay queued and go to the new address.
    existing = session.scalar(select(Device).where(Device.device_type == DeviceType.PARENT,
                                                   Device.neighbour_id != "")
                              .order_by(Device.neighbour_id != info.node_id))
    if not partitions:
        if existing is not None:
            existing.enabled = False
        return ""
    target = partitions[0]
    if existing is None:
        existing = _adoptable(session, target.ae_title)
    device = _managed_device(session, existing, info, target,
                             h.parent_dicom_host or info.dicom_host, DeviceType.PARENT)
    device.enabled = True
    return target.ae_title


def _by_ae(session: Session, neighbour_id: str, ae_title: str) -> Device | None:
    device = session.scalar(select(Device).where(Device.neighbour_id == neighbour_id,
                                                 Device.ae_title == ae_title))
    return device if device is not None else _adoptable(session, ae_title)


def _adoptable(session: Session, ae_title: str) -> Device | None:
    """A node-wide device an administrator added for this AE title: it becomes the managed
    entry rather than a second device answering for the same AE title."""
    return session.scalar(select(Device).where(Device.ae_title == ae_title,
                                               Device.partition_id.is_(None),
                                               Device.neighbour_id == "",
                                               Device.scope == "local"))


def _managed_device(session: Session, device: Device | None, info: pb.NodeInfo,
                    partition: pb.Partition, host: str, device_type: DeviceType) -> Device:
    """The device entry for a neighbour's partition, created or brought up to date."""
    ae_title = partition.ae_title
    if device is None:
        names = [info.node_id, f"{info.node_id}-{ae_title}"[:64]]
        taken = set(session.scalars(select(Device.name).where(Device.name.in_(names))))
        name = next((n for n in names if n not in taken), f"{info.node_id}-{ae_title}-2"[:64])
        device = Device(name=name)
        session.add(device)
    role = "parent" if device_type == DeviceType.PARENT else "child"
    device.description = f"{role} node {info.node_id} {info.site}".strip()
    device.neighbour_id = info.node_id
    device.device_type = device_type
    device.ae_title = ae_title
    if device.host != host or not device.ip:
        device.host = host
        device.ip = resolve_ip(host)
    # Its TLS port too: forwarding to it then uses TLS when this node has a client certificate.
    device.port = partition.port
    device.tls_port = partition.tls_port
    device.partition_id = None
    session.flush()
    return device


def _disable_others(session: Session, neighbour_id: str, current: list[int]) -> None:
    """Entries for partitions the neighbour no longer has are disabled, not deleted."""
    session.execute(update(Device).where(Device.neighbour_id == neighbour_id,
                                         Device.id.not_in(current)).values(enabled=False))


def seen(session: Session, node_id: str, queue_depth: int | None = None,
         role: str | None = None) -> bool:
    """The neighbour answered; False if this node does not know it (in that role).

    One UPDATE: heartbeats and pushes call this for every message.
    """
    values: dict[str, object] = {"last_seen": utcnow(), "reachable": True, "last_error": ""}
    if queue_depth is not None:
        values["queue_depth"] = queue_depth
    query = update(Neighbour).where(Neighbour.node_id == node_id)
    if role is not None:
        query = query.where(Neighbour.role == role)
    result = session.execute(query.values(**values).execution_options(
        synchronize_session=False))
    return bool(rowcount(result))


def seen_all(session: Session, node_ids: list[str]) -> None:
    """Several neighbours answered (a tree walk): one UPDATE."""
    if node_ids:
        session.execute(update(Neighbour).where(Neighbour.node_id.in_(node_ids)).values(
            last_seen=utcnow(), reachable=True, last_error="").execution_options(
                synchronize_session=False))


def unreachable(session: Session, node_id: str, error: str) -> None:
    session.execute(update(Neighbour).where(Neighbour.node_id == node_id).values(
        reachable=False, last_error=error).execution_options(synchronize_session=False))
