"""The DotCom directory: every node of the tree, stored on each node and exported as JSON."""

from __future__ import annotations

import json
import os
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from hierarchy.rpc import control_pb2 as pb
from node.db.models import DirectoryNode, DirectoryPartition, utcnow
from node.db.tables import rowcount, table
from node.replication import insert_rows

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
          collected: datetime | None = None) -> list[dict[str, Any]]:
    """Replace the directory with a recollect's result (a few statements, whatever its size:
    every node of the tree stores it on the way down); returns it as `listing` would read
    it back.

    Nodes the previous directory had but this recollect did not reach (their parent did not
    answer) stay listed, as unreachable, so an administrator still sees they exist.
    """
    collected = collected or utcnow()
    seen = {e.node.node_id: e for e in entries}
    nodes, partitions = table(DirectoryNode), table(DirectoryPartition)
    unreached = nodes.update().where(nodes.c.node_id.not_in(seen)).values(
        reachable=False, error=f"not reached by the recollect from {root_id}",
        collected_at=collected)
    left_out = rowcount(session.execute(unreached))
    # Replaced rather than updated, in as few statements as possible: in a busy process each
    # one waits its turn for the GIL.
    session.execute(partitions.delete().where(partitions.c.node_id.in_(seen)))
    session.execute(nodes.delete().where(nodes.c.node_id.in_(seen)))
    insert_rows(session, nodes, [_node_row(node_id, e, root_id, collected)
                                 for node_id, e in seen.items()])
    insert_rows(session, partitions, [
        {"node_id": node_id, "ae_title": p.ae_title, "port": p.port, "tls_port": p.tls_port,
         "enabled": p.enabled} for node_id, e in seen.items() for p in e.node.partitions])
    _expire(session)
    stamps: dict[int, str | None] = {}  # each distinct time formatted once
    stored = [_listed(node_id, e, root_id, _iso(collected), stamps)
              for node_id, e in seen.items()]
    if left_out:
        stored += listing(session, excluding=set(seen))
    return sorted(stored, key=lambda n: n["node_id"])


def _listed(node_id: str, e: pb.DirectoryEntry, root_id: str, collected: str | None,
            stamps: dict[int, str | None]) -> dict[str, Any]:
    """What `listing` shows for an entry stored just now."""
    n = e.node
    if e.last_seen_ms not in stamps:
        stamps[e.last_seen_ms] = _iso(from_ms(e.last_seen_ms))
    return {"node_id": node_id, "site": n.site, "role": n.role, "parent_id": n.parent_id,
            "control_address": n.control_address, "dicom_host": n.dicom_host,
            "partitions": [{"ae_title": p.ae_title, "port": p.port, "tls_port": p.tls_port,
                            "enabled": p.enabled} for p in n.partitions],
            "version": n.version, "reachable": e.reachable, "error": e.error,
            "last_seen": stamps[e.last_seen_ms], "collected_at": collected, "root_id": root_id}


def _iso(when: datetime | None) -> str | None:
    """UTC, with its offset, whatever the database gives back (SQLite drops the zone)."""
    if when is None:
        return None
    when = when.replace(tzinfo=UTC) if when.tzinfo is None else when.astimezone(UTC)
    return when.isoformat()


def _expire(session: Session) -> None:
    """Directory objects this session loaded earlier are reloaded on their next use."""
    for obj in list(session.identity_map.values()):
        if isinstance(obj, (DirectoryNode, DirectoryPartition)):
            session.expire(obj)


def _node_row(node_id: str, e: pb.DirectoryEntry, root_id: str,
              collected: datetime) -> dict[str, Any]:
    n = e.node
    return {"node_id": node_id, "parent_id": n.parent_id, "site": n.site,
            "control_address": n.control_address, "dicom_host": n.dicom_host, "role": n.role,
            "version": n.version, "reachable": e.reachable, "error": e.error,
            "last_seen": from_ms(e.last_seen_ms), "collected_at": collected,
            "root_id": root_id}


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


def listing(session: Session, excluding: set[str] | None = None) -> list[dict[str, Any]]:
    """The stored directory, as `hierarchy directory --json` and dotcom.json show it (plain
    rows, not ORM objects), less the nodes in `excluding`."""
    p, n = DirectoryPartition, DirectoryNode
    partition_query = select(p.node_id, p.ae_title, p.port, p.tls_port, p.enabled)
    node_query = select(n.node_id, n.site, n.role, n.parent_id, n.control_address,
                        n.dicom_host, n.version, n.reachable, n.error, n.last_seen,
                        n.collected_at, n.root_id)
    if excluding:
        partition_query = partition_query.where(p.node_id.not_in(excluding))
        node_query = node_query.where(n.node_id.not_in(excluding))
    partitions: dict[str, list[dict[str, Any]]] = {}
    for node_id, ae_title, port, tls_port, enabled in session.execute(
            partition_query.order_by(p.id)):
        partitions.setdefault(node_id, []).append(
            {"ae_title": ae_title, "port": port, "tls_port": tls_port, "enabled": enabled})
    return [{"node_id": row.node_id, "site": row.site, "role": row.role,
             "parent_id": row.parent_id, "control_address": row.control_address,
             "dicom_host": row.dicom_host, "partitions": partitions.get(row.node_id, []),
             "version": row.version, "reachable": row.reachable, "error": row.error,
             "last_seen": _iso(row.last_seen), "collected_at": _iso(row.collected_at),
             "root_id": row.root_id}
            for row in session.execute(node_query.order_by(n.node_id))]


def export(session: Session, data_dir: Path, nodes: list[dict[str, Any]] | None = None
           ) -> Path:
    """Write the directory (`nodes`, else as stored) to <data_dir>/dotcom.json, atomically:
    readers never see half.

    One node per line: still readable, and written by json's C encoder (an indented dump
    goes through its pure-Python one, ten times slower for a large tree).
    """
    path = data_dir / EXPORT_NAME
    tmp = path.with_suffix(".json.tmp")
    lines = ",\n".join(json.dumps(node) for node in (
        listing(session) if nodes is None else nodes))
    tmp.write_text(f'{{"nodes": [\n{lines}\n]}}\n' if lines else '{"nodes": []}\n')
    os.replace(tmp, path)
    return path
