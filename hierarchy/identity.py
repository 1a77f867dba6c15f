"""How this node describes itself to the others (NodeInfo)."""

from __future__ import annotations

import socket

from sqlalchemy import select
from sqlalchemy.orm import Session

from hierarchy.rpc import control_pb2 as pb
from node.config import Settings, split_address
from node.db.models import Neighbour, Partition
from node.implementation import version


def advertise_address(settings: Settings) -> str:
    """The control address other nodes use: advertise_address, else control_listen with a
    wildcard host replaced by this machine's name."""
    h = settings.hierarchy
    if h.advertise_address:
        return h.advertise_address
    host, port = split_address(h.control_listen, "hierarchy.control_listen")
    if host in ("0.0.0.0", "::"):
        host = socket.getfqdn()
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def dicom_host(settings: Settings) -> str:
    if settings.hierarchy.dicom_host:
        return settings.hierarchy.dicom_host
    return split_address(advertise_address(settings), "hierarchy.advertise_address")[0]


def role(has_parent: bool, children: int) -> str:
    if not has_parent:
        return "root"
    return "intermediate" if children else "leaf"


def local_info(session: Session, settings: Settings) -> pb.NodeInfo:
    """Two small queries (plain rows): heartbeats and every tree walk build this."""
    partitions = [pb.Partition(ae_title=ae_title, port=port, tls_port=tls_port, enabled=enabled)
                  for ae_title, port, tls_port, enabled in session.execute(
                      select(Partition.ae_title, Partition.port, Partition.tls_port,
                             Partition.enabled).order_by(Partition.id))]
    roles = session.execute(select(Neighbour.node_id, Neighbour.role)).all()
    parent_id = next((node_id for node_id, kind in roles if kind == "parent"), "")
    children = sum(1 for _node_id, kind in roles if kind == "child")
    return pb.NodeInfo(
        node_id=settings.node_id, site=settings.hierarchy.site,
        control_address=advertise_address(settings), dicom_host=dicom_host(settings),
        partitions=partitions, role=role(bool(settings.hierarchy.parent), children),
        version=version(), parent_id=parent_id,
        heartbeat_seconds=settings.hierarchy.heartbeat_seconds)


