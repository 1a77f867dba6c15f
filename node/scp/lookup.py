"""Database look-ups behind admission: partitions by called AE, devices by calling AE."""

from __future__ import annotations

import logging

from sqlalchemy import or_, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from node.db.database import Database
from node.db.models import Device, DeviceType, DirectoryNode, DirectoryPartition, Partition
from node.forwarding.routing import ROUTED_TYPES, Route
from node.forwarding.routing import parse_rules as parse_forward_rules
from node.hostnames import resolve_ip
from node.scp.admission import DeviceView, PartitionPolicy
from node.scp.coercion import CoercionError, Rule, parse_rules
from node.scp.matching import MATCH_FIELDS
from node.scp.store import Peer

log = logging.getLogger(__name__)


def policy_of(p: Partition) -> PartitionPolicy:
    return PartitionPolicy(
        id=p.id,
        ae_title=p.ae_title,
        port=p.port,
        folder=p.folder,
        enabled=p.enabled,
        accept_any_device=p.accept_any_device,
        auto_insert_devices=p.auto_insert_devices,
        default_remote_port=p.default_remote_port,
        duplicate_policy=p.duplicate_policy,
        match_fields=tuple(kw for flag, kw in MATCH_FIELDS.items() if getattr(p, flag)),
        case_sensitive_matching=p.case_sensitive_matching,
        empty_matching=p.empty_matching,
        query_limit=p.query_limit,
        forwarding_enabled=p.forwarding_enabled,
        max_associations=p.max_associations,
    )


def view_of(d: Device) -> DeviceView:
    return DeviceView(
        id=d.id,
        name=d.name,
        ae_title=d.ae_title,
        enabled=d.enabled,
        allow_storage=d.allow_storage,
        coercion_rules=d.coercion_rules,
        allow_query=d.allow_query,
        allow_retrieve=d.allow_retrieve,
        max_inbound_associations=d.max_inbound_associations,
    )


def device_row(session: Session, partition_id: int, ae_title: str, *,
               enabled_only: bool = False) -> Device | None:
    """The device with this AE title: the partition's own entry wins over a node-wide one.
    The Self device is the node itself, never a peer on the network."""
    query = select(Device).where(
        Device.ae_title == ae_title,
        or_(Device.partition_id == partition_id, Device.partition_id.is_(None)),
        Device.device_type != DeviceType.SELF.value,
    )
    if enabled_only:
        query = query.where(Device.enabled.is_(True))
    devices = sorted(session.scalars(query).all(), key=lambda d: d.partition_id is None)
    return devices[0] if devices else None


def directory_device(session: Session, ae_title: str) -> Device | None:
    """A partition of another node of the tree, found in the DotCom directory that recollect
    stored: a C-MOVE destination no device entry names. Not added to the session."""
    row = session.execute(
        select(DirectoryPartition, DirectoryNode)
        .join(DirectoryNode, DirectoryNode.node_id == DirectoryPartition.node_id)
        .where(DirectoryPartition.ae_title == ae_title, DirectoryPartition.enabled.is_(True))
        .order_by(DirectoryNode.reachable.desc(), DirectoryNode.node_id)).first()
    if row is None:
        return None
    partition, node = row
    # Every setting at its "node default" value, as for a device added with no options.
    return Device(name=f"{node.node_id}/{partition.ae_title}", ae_title=partition.ae_title,
                  host=node.dicom_host, ip=resolve_ip(node.dicom_host), port=partition.port,
                  tls_port=partition.tls_port,
                  enabled=True, max_pdu_size=0, acse_timeout=0.0, dimse_timeout=0.0,
                  network_timeout=0.0, transfer_syntaxes="")


def routes_for(session: Session, partition_id: int) -> tuple[tuple[Route, ...], dict[int, bool]]:
    """The partition's forwarding destinations, and each one's send-updates override."""
    devices = session.scalars(select(Device).where(
        Device.device_type.in_([t.value for t in (*ROUTED_TYPES, DeviceType.VIEWER)]),
        or_(Device.partition_id == partition_id, Device.partition_id.is_(None)),
    )).all()
    routes = tuple(Route(d.id, d.device_type, d.partition_id, d.enabled, d.forward,
                         parse_forward_rules(d.forward_rules)) for d in devices)
    return routes, {d.id: d.send_updates for d in devices if d.send_updates is not None}


def partition_for(session: Session, called_ae: str, port: int, tls: bool = False
                  ) -> PartitionPolicy | None:
    """The partition `called_ae` on this listener (a TLS listener serves partitions whose
    TLS port it is, a plain one those whose TCP port it is)."""
    column = Partition.tls_port if tls else Partition.port
    partition = session.scalar(
        select(Partition).where(Partition.ae_title == called_ae, column == port)
    )
    return policy_of(partition) if partition else None


def device_for(session: Session, partition_id: int, calling_ae: str) -> DeviceView | None:
    device = device_row(session, partition_id, calling_ae)
    return view_of(device) if device else None


def self_device(session: Session) -> Device | None:
    """The node's Self device (seed 002: the server itself, whose coercion rules apply to
    what it takes in locally); devices.py allows one."""
    return session.scalars(select(Device).where(Device.device_type == DeviceType.SELF.value)
                           .order_by(Device.id).limit(1)).first()


def coercion_rules(device: DeviceView | None) -> tuple[Rule, ...]:
    """The device's coercion rules, parsed (none when it has none or they are invalid)."""
    if device is None or not device.coercion_rules.strip():
        return ()
    try:
        return tuple(parse_rules(device.coercion_rules))
    except CoercionError as exc:
        # Only reachable if the table was edited behind the CLI's back.
        log.error("device %s has invalid coercion rules, none applied: %s", device.name, exc)
        return ()


def peer_for(session: Session, partition: PartitionPolicy, device: DeviceView | None,
             calling_ae: str, address: str) -> Peer:
    """Who sends to `partition`, with everything a store needs: the device's coercion rules
    and the partition's forwarding routes (an association's peer, or `pacsnode import`)."""
    routes, send_updates = routes_for(session, partition.id)
    return Peer(partition, device, coercion_rules(device), calling_ae, address, routes,
                send_updates)


def auto_insert(db: Database, partition: PartitionPolicy, calling_ae: str, ip: str) -> None:
    """Add the calling AE to the partition's device table (seed 000: auto insert devices)."""
    try:
        with db.transaction() as session:
            if device_for(session, partition.id, calling_ae) is not None:
                return
            taken = set(session.scalars(
                select(Device.name).where(Device.name.like(f"{calling_ae}%"))).all())
            name = calling_ae
            n = 2
            while name in taken:
                name = f"{calling_ae}-{n}"
                n += 1
            session.add(Device(
                name=name, ae_title=calling_ae, host=ip, ip=ip,
                port=partition.default_remote_port, device_type=DeviceType.DICOM,
                partition_id=partition.id, auto_inserted=True,
                description=f"auto-inserted on first association to {partition.ae_title}",
            ))
    except IntegrityError:
        pass  # a concurrent association inserted it first
