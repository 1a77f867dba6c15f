"""Database look-ups behind admission: partitions by called AE, devices by calling AE."""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from typing import TypeVar

from sqlalchemy import or_, select
from sqlalchemy.exc import IntegrityError, SQLAlchemyError
from sqlalchemy.orm import Session

from node.db.database import Database
from node.db.models import Device, DeviceType, DirectoryNode, DirectoryPartition, Partition
from node.hostnames import resolve_ip
from node.ingest.pipeline import Peer
from node.policy.admission import DeviceView, PartitionPolicy
from node.policy.coercion import CoercionError, Rule, parse_rules
from node.policy.matching import MATCH_FIELDS
from node.policy.routing import AUTO_ROUTED_TYPE, ROUTED_TYPES, Route
from node.policy.routing import parse_rules as parse_forward_rules

log = logging.getLogger(__name__)

# How long admission waits for its look-ups (a millisecond or two normally): beyond it the
# database is in trouble, and the association is admitted from what was looked up before, so
# a C-ECHO is answered at once while the database does not answer.
ADMISSION_WAIT = 0.5
_MAX_REMEMBERED = 10_000  # calling AE titles remembered (a scanner may try many)


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
        Device.device_type.in_([*sorted(ROUTED_TYPES), AUTO_ROUTED_TYPE]),
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
    """The node's Self device (docs/how-to/devices.md): the server itself, whose coercion rules
    apply to what it takes in locally; devices.py allows one."""
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
    return make_peer(partition, device, calling_ae, address, routes_for(session, partition.id))


def make_peer(partition: PartitionPolicy, device: DeviceView | None, calling_ae: str,
              address: str, routes: tuple[tuple[Route, ...], dict[int, bool]]) -> Peer:
    return Peer(partition, device, coercion_rules(device), calling_ae, address, *routes)


@dataclass(frozen=True)
class Found:
    """What admission looked up. `device_checked` False: the database did not answer and
    the calling AE was not looked up before, so whether it is in the table is unknown."""

    partition: PartitionPolicy | None
    device: DeviceView | None
    peer: Peer | None
    device_checked: bool = True


_K = TypeVar("_K")
_V = TypeVar("_V")


class AdmissionLookups:
    """Admission's look-ups, each answer remembered for when the database does not answer
    (then: the partition, device and routes as last looked up).

    Asked first as long as it answers, so a running node still sees table changes at once.
    """

    def __init__(self, db: Database) -> None:
        self.db = db
        self._lock = threading.Lock()
        self._partitions: dict[tuple[str, int, bool], PartitionPolicy | None] = {}
        self._devices: dict[tuple[int, str], DeviceView | None] = {}
        self._routes: dict[int, tuple[tuple[Route, ...], dict[int, bool]]] = {}

    def find(self, called_ae: str, port: int, tls: bool, calling_ae: str,
             address: str) -> Found:
        """The partition, device and peer of an association request; raises the database's
        error only when it does not answer and the partition was never looked up."""
        error: SQLAlchemyError | None = None
        if self.db.answering():
            try:
                with self.db.deadline(ADMISSION_WAIT), self.db.session() as session:
                    partition = partition_for(session, called_ae, port, tls)
                    device = routes = None
                    if partition is not None:
                        device = device_for(session, partition.id, calling_ae)
                        routes = routes_for(session, partition.id)
            except SQLAlchemyError as exc:
                error = exc
            else:
                with self._lock:
                    _remember(self._partitions, (called_ae, port, tls), partition)
                    if partition is not None and routes is not None:
                        _remember(self._devices, (partition.id, calling_ae), device)
                        self._routes[partition.id] = routes
                peer = (make_peer(partition, device, calling_ae, address, routes)
                        if partition is not None and routes is not None else None)
                return Found(partition, device, peer)
        return self._remembered(called_ae, port, tls, calling_ae, address, error)

    def _remembered(self, called_ae: str, port: int, tls: bool, calling_ae: str,
                    address: str, error: SQLAlchemyError | None) -> Found:
        with self._lock:
            key = (called_ae, port, tls)
            if key not in self._partitions:
                raise error or _Unanswered("the index database does not answer")
            partition = self._partitions[key]
            if partition is None:
                return Found(None, None, None)
            checked = (partition.id, calling_ae) in self._devices
            device = self._devices.get((partition.id, calling_ae))
            routes = self._routes.get(partition.id, ((), {}))
        log.warning("association from %s@%s to %s admitted from the device table as last read"
                    "%s: the index database does not answer", calling_ae, address, called_ae,
                    "" if checked else f" ({calling_ae} was not looked up before)")
        return Found(partition, device,
                     make_peer(partition, device, calling_ae, address, routes), checked)


class _Unanswered(SQLAlchemyError):
    """The database does not answer, and admission has nothing of its own to go by."""


def _remember(table: dict[_K, _V], key: _K, value: _V) -> None:
    table.pop(key, None)  # the newest last: the oldest goes first when full
    table[key] = value
    if len(table) > _MAX_REMEMBERED:
        del table[next(iter(table))]


def auto_insert(db: Database, partition: PartitionPolicy, calling_ae: str, ip: str) -> None:
    """Add the calling AE to the partition's device table (auto insert devices,
    docs/how-to/partitions.md)."""
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
    except SQLAlchemyError as exc:
        # Admission does not wait for it: the device is added when it next associates.
        log.warning("device %s not added to the device table of %s now: %s", calling_ae,
                    partition.ae_title, exc)
