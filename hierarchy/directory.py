"""The DotCom directory: every node of the tree, stored on each node and exported as JSON."""

from __future__ import annotations

import json
import os
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import delete, insert, select
from sqlalchemy.orm import Session

from hierarchy.rpc import control_pb2 as pb
from node.db.models import DirectoryNode, DirectoryPartition, utcnow

EXPORT_NAME = "dotcom.json"


def ms(when: datetime | None) -> int:
    if when is None:
        return 0
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return int(when.timestamp() * 1000)


def from_ms(value: int) -> datetime | None:
    return datetime.fromtimestamp(value / 1000, UTC) if value else None


def entry(info: pb.NodeInfo, *, reachable: bool = True, error: str = "",
          last_seen: datetime | None = None, queue: tuple[int, int] = (0, 0)
          ) -> pb.DirectoryEntry:
    return pb.DirectoryEntry(node=info, reachable=reachable, error=error,
                             last_seen_ms=ms(last_seen), queue_depth=queue[0],
                             queue_failed=queue[1])


def store(session: Session, entries: list[pb.DirectoryEntry], root_id: str,
          collected: datetime | None = None) -> None:
    """Replace the directory with a recollect's result (a few statements, whatever its size:
    every node of the tree stores it on the way down).

    Nodes the previous directory had but this recollect did not reach (their parent did not
    answer) stay listed, as unreachable, so an administrator still sees they exist.
    """
    collected = collected or utcnow()
    seen = {e.node.node_id: e for e in entries}
    rows = {row.node_id: row for row in session.scalars(select(DirectoryNode))}
    for node_id, old in rows.items():
        if node_id not in seen:
            old.reachable = False
            old.error = f"not reached by the recollect from {root_id}"
            old.collected_at = collected
    for node_id, e in seen.items():
        row = rows.get(node_id)
        if row is None:
            row = DirectoryNode(node_id=node_id)
            session.add(row)
        n = e.node
        row.parent_id = n.parent_id
        row.site = n.site
        row.control_address = n.control_address
        row.dicom_host = n.dicom_host
        row.role = n.role
        row.version = n.version
        row.reachable = e.reachable
        row.error = e.error
        row.last_seen = from_ms(e.last_seen_ms)
        row.collected_at = collected
        row.root_id = root_id
    session.flush()
    session.execute(delete(DirectoryPartition).where(DirectoryPartition.node_id.in_(seen)))
    partitions = [{"node_id": node_id, "ae_title": p.ae_title, "port": p.port,
                   "tls_port": p.tls_port, "enabled": p.enabled}
                  for node_id, e in seen.items() for p in e.node.partitions]
    if partitions:
        session.execute(insert(DirectoryPartition), partitions)


def not_reached(session: Session, reached: set[str]) -> list[pb.DirectoryEntry]:
    """Nodes the stored directory knows that a recollect did not reach (a node above them did
    not answer for its subtree): listed as unreachable rather than silently left out."""
    partitions: dict[str, list[pb.Partition]] = {}
    for p in session.scalars(select(DirectoryPartition)
                             .where(DirectoryPartition.node_id.not_in(reached))
                             .order_by(DirectoryPartition.id)):
        partitions.setdefault(p.node_id, []).append(
            pb.Partition(ae_title=p.ae_title, port=p.port, tls_port=p.tls_port,
                         enabled=p.enabled))
    out = []
    for row in session.scalars(select(DirectoryNode).where(DirectoryNode.node_id.not_in(reached))
                               .order_by(DirectoryNode.node_id)):
        info = pb.NodeInfo(node_id=row.node_id, site=row.site,
                           control_address=row.control_address, dicom_host=row.dicom_host,
                           partitions=partitions.get(row.node_id, []), role=row.role,
                           version=row.version, parent_id=row.parent_id)
        out.append(entry(info, reachable=False, last_seen=row.last_seen,
                         error="not reached: a node above it did not answer for its subtree"))
    return out


def listing(session: Session) -> list[dict[str, Any]]:
    partitions: dict[str, list[dict[str, Any]]] = {}
    for p in session.scalars(select(DirectoryPartition).order_by(DirectoryPartition.id)):
        partitions.setdefault(p.node_id, []).append(
            {"ae_title": p.ae_title, "port": p.port, "tls_port": p.tls_port,
             "enabled": p.enabled})
    return [{"node_id": n.node_id, "site": n.site, "role": n.role, "parent_id": n.parent_id,
             "control_address": n.control_address, "dicom_host": n.dicom_host,
             "partitions": partitions.get(n.node_id, []), "version": n.version,
             "reachable": n.reachable, "error": n.error,
             "last_seen": n.last_seen.isoformat() if n.last_seen else None,
             "collected_at": n.collected_at.isoformat() if n.collected_at else None,
             "root_id": n.root_id}
            for n in session.scalars(select(DirectoryNode).order_by(DirectoryNode.node_id))]


def export(session: Session, data_dir: Path) -> Path:
    """Write the directory to <data_dir>/dotcom.json (atomically: readers never see half)."""
    path = data_dir / EXPORT_NAME
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps({"nodes": listing(session)}, indent=2))
    os.replace(tmp, path)
    return path
