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
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import BigInteger, String, Table, bindparam, func, select
from sqlalchemy import cast as cast_
from sqlalchemy.orm import Session

from node.db.database import Database
from node.db.models import (
    Category,
    Device,
    DeviceChange,
    DeviceType,
    NodeMeta,
    ReplicatedDevice,
    utcnow,
)
from node.db.tables import table
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
SEQ_KEY = "change_seq"  # the node_meta row holding the last change-log seq handed out


@dataclass(frozen=True)
class Logged:
    """Records this node appended to its change log, with consecutive seqs from `first`."""

    first: int
    records: list[Record]
    received_from: str  # '' for a local edit

    @property
    def last(self) -> int:
        return self.first + len(self.records) - 1


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


def _take_seqs(session: Session, count: int) -> int:
    """Reserve `count` change-log sequence numbers; returns the first.

    The row lock (the UPDATE's) serialises appends on PostgreSQL (SQLite already has one
    writer), so a change with a lower seq can never commit after a neighbour's cursor has
    passed it.
    """
    meta = table(NodeMeta)
    if session.get_bind().dialect.update_returning:  # one statement (SQLite 3.35+)
        last = session.scalar(meta.update().where(meta.c.key == SEQ_KEY).values(
            value=cast_(cast_(meta.c.value, BigInteger) + count, String))
            .returning(meta.c.value))
        if last is not None:
            return int(last) - count + 1
    else:
        value = session.scalar(select(NodeMeta.value).where(NodeMeta.key == SEQ_KEY)
                               .with_for_update())
        if value is not None:
            session.execute(meta.update().where(meta.c.key == SEQ_KEY)
                            .values(value=str(int(value) + count)))
            return int(value) + 1
    session.execute(meta.insert().values(key=SEQ_KEY, value=str(count)))
    return 1


def last_seq(session: Session) -> int:
    return session.scalar(select(func.max(DeviceChange.seq))) or 0


def peek_last_seq(db: Database) -> int:
    """The newest change-log seq, read without a transaction (no BEGIN, so on SQLite no write
    lock is taken and no writer is made to wait): cheap enough to poll a few times a second
    for changes that other processes, such as the CLI, commit."""
    connection = db.engine.raw_connection()
    try:
        cursor = connection.cursor()
        try:
            cursor.execute(f"SELECT max(seq) FROM {DeviceChange.__tablename__}")
            row = cursor.fetchone()
        finally:
            cursor.close()
    finally:
        connection.close()  # back to the pool, which ends PostgreSQL's implicit transaction
    return int(row[0]) if row and row[0] is not None else 0


# --- records ----------------------------------------------------------------------------

def payload_of(device: Device) -> str:
    data: dict[str, Any] = {key: getattr(device, key) for key in PAYLOAD_FIELDS}
    data["category"] = device.category.name if device.category else None
    return json.dumps(data, sort_keys=True)


def held(session: Session, name: str) -> ReplicatedDevice | None:
    return session.get(ReplicatedDevice, name)


def _log(session: Session, records: Sequence[Record], received_from: str,
         held_names: set[str]) -> int:
    """Append `records` to the change log (in order) and make the last version of each name
    the one held (`held_names`: the names this node held a record of before): an INSERT for
    the log and at most an UPDATE and an INSERT for the records."""
    first = _take_seqs(session, len(records))
    now = utcnow()
    insert_rows(session, table(DeviceChange), [
        {"seq": first + i, "name": r.name, "origin_node": r.origin_node, "version": r.version,
         "deleted": r.deleted, "payload": r.payload, "received_from": received_from,
         "created_at": now}
        for i, r in enumerate(records)])
    final = {r.name: r for r in records}
    rows = [{"name": r.name, "origin_node": r.origin_node, "version": r.version,
             "deleted": r.deleted, "payload": r.payload, "updated_at": now}
            for r in final.values()]
    held_rows = table(ReplicatedDevice)
    changed = [{**row, "key": row["name"]} for row in rows if row["name"] in held_names]
    if changed:  # SET: the keys of the rows, but the key "key"
        session.execute(held_rows.update().where(held_rows.c.name == bindparam("key")),
                        changed)
    insert_rows(session, held_rows, [row for row in rows if row["name"] not in held_names])
    return first


# Bound values per INSERT statement: well inside SQLite's limit (32766 since 3.32) and
# PostgreSQL's (65535); rows per statement stay under SQLite's compound-select limit.
MAX_VALUES, MAX_ROWS = 30_000, 500


def insert_rows(session: Session, target: Table, rows: Sequence[dict[str, Any]]) -> None:
    """INSERT `rows` (all with the same keys, every column without a default given) as one
    multi-row statement per MAX_ROWS rows.

    An executemany steps the database once per row, and each step gives up and takes back
    the GIL: in a busy process each of those waits its turn, which made storing a directory
    of a hundred nodes take a second. One statement is one step.
    """
    if not rows:
        return
    connection = session.connection()
    dialect = connection.dialect
    keys = list(rows[0])
    columns = [target.c[key] for key in keys]
    processors = [_memoised(column.type._cached_bind_processor(dialect)) for column in columns]
    quote = dialect.identifier_preparer.quote
    mark = "?" if dialect.paramstyle in ("qmark", "numeric") else "%s"
    head = (f"INSERT INTO {quote(target.name)} ({', '.join(quote(c.name) for c in columns)})"
            " VALUES ")
    one = "(" + ", ".join([mark] * len(keys)) + ")"
    per_statement = max(1, min(MAX_ROWS, MAX_VALUES // len(keys)))
    for start in range(0, len(rows), per_statement):
        chunk = rows[start:start + per_statement]
        values = tuple(process(row[key]) if process is not None else row[key]
                       for row in chunk for key, process in zip(keys, processors, strict=True))
        connection.exec_driver_sql(head + ", ".join([one] * len(chunk)), values)


def _memoised(process: Callable[[Any], Any] | None) -> Callable[[Any], Any] | None:
    """A bind processor that converts each distinct value once (a directory's rows share
    their timestamps, and SQLite's datetime conversion is Python code)."""
    if process is None:
        return None
    done: dict[Any, Any] = {}

    def memoised(value: Any) -> Any:
        try:
            return done[value]
        except KeyError:
            done[value] = converted = process(value)
            return converted
        except TypeError:  # not hashable
            return process(value)
    return memoised


def _expire(session: Session) -> None:
    """Objects this session loaded before the statements above wrote past the ORM: reloaded
    on their next use instead of showing the old values."""
    for obj in list(session.identity_map.values()):
        if isinstance(obj, (Device, ReplicatedDevice, NodeMeta)):
            session.expire(obj)


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
    session.flush()
    _log(session, [record], "", {name} if current is not None else set())
    _expire(session)
    return record


def apply(session: Session, record: Record, received_from: str) -> bool:
    """Apply a neighbour's record if it is newer than what this node holds; True if applied."""
    return bool(apply_all(session, [record], received_from).records)


def apply_all(session: Session, records: Sequence[Record], received_from: str) -> Logged:
    """Apply a neighbour's records, in order, each if it is newer than what this node holds by
    then; returns those applied (and logged), with their seqs.

    A handful of statements whatever the batch size: every node of the tree runs this for
    every change, so its cost is paid once per node per change. The device table ends as if
    the records had been applied one by one (only a device deleted and re-created within
    one batch keeps its row id).
    """
    if not records:
        return Logged(0, [], received_from)
    session.flush()  # this session's pending changes first: what follows bypasses the ORM
    names = {r.name for r in records}
    newest: dict[str, str] = {name: version for name, version in session.execute(
        select(ReplicatedDevice.name, ReplicatedDevice.version)
        .where(ReplicatedDevice.name.in_(names)))}
    held_names = set(newest)
    applied = []
    for r in records:
        if r.name in newest and newest[r.name] >= r.version:
            continue  # not newer: ignored and not logged, which is what stops loops
        newest[r.name] = r.version
        applied.append(r)
    if not applied:
        return Logged(0, [], received_from)
    first = _log(session, applied, received_from, held_names)
    _materialise_all(session, applied)
    _expire(session)
    return Logged(first, applied, received_from)


def _materialise_all(session: Session, applied: Sequence[Record]) -> None:
    """Bring the device table in line with the last applied version of each name."""
    final = {r.name: r for r in applied}
    # A live version anywhere in the batch made the name a hierarchy-wide device, so a later
    # tombstone in the same batch removes it even if it had been a local device before.
    shared = {r.name for r in applied if not r.deleted}
    current = {row.name: row for row in session.execute(
        select(Device.id, Device.name, Device.scope, Device.host, Device.ae_title)
        .where(Device.name.in_(final)))}
    gone = [name for name, r in final.items() if r.deleted and name in current
            and (current[name].scope == HIERARCHY or name in shared)]
    devices = table(Device)
    if gone:
        session.execute(devices.delete().where(devices.c.name.in_(gone)))
    categories: dict[str, int] = {}
    changed, added = [], []
    for name, r in final.items():
        if r.deleted:
            continue
        row = current.get(name)
        if row is not None and row.scope != HIERARCHY:
            log.warning("hierarchy-wide device %s from %s replaces the local device of that "
                        "name", name, r.origin_node)
        values = _device_values(session, r, row.host if row is not None else "", categories)
        if row is None:
            added.append({"name": name, **values})
        else:
            changed.append({"row_id": row.id, **values})
    for rows in _same_keys(changed):  # SET: the keys of the rows, but the key "row_id"
        session.execute(devices.update().where(devices.c.id == bindparam("row_id")), rows)
    for rows in _same_keys(added):
        session.execute(devices.insert(), rows)
    # A device that kept its AE title cannot have gained a clash from this change.
    _warn_clashes(session, {row["name"] for row in added} | {
        name for name, row in current.items() if name in final and not final[name].deleted
        and (row.scope != HIERARCHY or _ae_title(final[name]) != row.ae_title)})


def _same_keys(rows: list[dict[str, Any]]) -> list[list[dict[str, Any]]]:
    """Rows grouped by their set of keys: one executemany per group (payloads from older
    versions may lack newer fields)."""
    groups: dict[tuple[str, ...], list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault(tuple(sorted(row)), []).append(row)
    return list(groups.values())


def _device_values(session: Session, record: Record, old_host: str,
                   categories: dict[str, int]) -> dict[str, Any]:
    data = json.loads(record.payload)
    values: dict[str, Any] = {key: data[key] for key in PAYLOAD_FIELDS if key in data}
    category = data.get("category")
    if category and category not in categories:
        categories[category] = _category_id(session, category)
    values["category_id"] = categories[category] if category else None
    values["ip"] = resolve_ip(values.get("host", old_host))
    values.update(partition_id=None, scope=HIERARCHY, origin_node=record.origin_node,
                  auto_inserted=False, neighbour_id="")
    return values


def _ae_title(record: Record) -> str | None:
    return json.loads(record.payload).get("ae_title")


def _warn_clashes(session: Session, names: set[str]) -> None:
    if not names:
        return
    rows = session.execute(select(Device.name, Device.ae_title).where(
        Device.partition_id.is_(None),
        Device.ae_title.in_(select(Device.ae_title).where(Device.name.in_(names))))).all()
    by_ae: dict[str, list[str]] = {}
    for name, ae_title in rows:
        by_ae.setdefault(ae_title, []).append(name)
    for ae_title, holders in by_ae.items():
        for name in holders:
            clash = next((other for other in holders if other != name), None)
            if name in names and clash is not None:
                log.warning("hierarchy-wide device %s has AE title %s, like device %s: "
                            "associations from that AE title may match either", name,
                            ae_title, clash)


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
    c = DeviceChange
    rows = session.execute(select(c.seq, c.received_from, c.name, c.origin_node, c.version,
                                  c.deleted, c.payload)
                           .where(c.seq > cursor).order_by(c.seq).limit(limit))
    return [(seq, source, Record(name, origin, version, deleted, payload))
            for seq, source, name, origin, version, deleted, payload in rows]


def snapshot(session: Session) -> list[Record]:
    """Every record held, tombstones included: what a new neighbour needs instead of history."""
    r = ReplicatedDevice
    return [Record(*row) for row in session.execute(
        select(r.name, r.origin_node, r.version, r.deleted, r.payload).order_by(r.name))]
