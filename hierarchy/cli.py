"""The full `pacsnode` command: the node's commands plus the hierarchy's.

`serve` also runs the control plane; `recollect`, `refresh-ip --hierarchy` and `hierarchy
status` ask the running node's control plane, which walks the tree; `hierarchy directory` and
`hierarchy neighbours` read this node's database and work while it is stopped.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Iterator
from datetime import datetime
from typing import Annotated, Any

import grpc
import typer
from google.protobuf import json_format
from rich.tree import Tree
from sqlalchemy import func, select

from hierarchy import directory, neighbours
from hierarchy.channels import describe, open_channel, uses_tls
from hierarchy.identity import advertise_address
from hierarchy.plane import ControlPlane
from hierarchy.rpc import control_pb2 as pb
from hierarchy.rpc import control_pb2_grpc as rpc
from node import replication
from node.cli import build_app, device
from node.cli import serve as node_serve
from node.cli.common import (
    ConfigOption,
    JsonOption,
    database,
    err,
    fail,
    load_settings,
    out,
    print_json,
    table,
)
from node.config import Settings, split_address
from node.db.models import DeviceChange, DirectoryNode, utcnow


def serve(config: ConfigOption = None, trace_dicom: node_serve.TraceOption = False,
          trace_dicom_ae: node_serve.TraceAeOption = "") -> None:
    """Start the node: database, DICOM listeners and control plane; serve until stopped.

    With [hierarchy] parent set, the node registers with its parent and heartbeats it.
    """
    node_serve.run(config, lambda s: [ControlPlane(s)] if s.hierarchy.enabled else [],
                   trace_dicom=trace_dicom, trace_dicom_ae=trace_dicom_ae)


def refresh_ip(
    hierarchy: Annotated[bool, typer.Option(
        "--hierarchy", help="On every node of the tree (asks the running node).")] = False,
    as_json: JsonOption = False,
    config: ConfigOption = None,
) -> None:
    """Re-resolve every device given by host name; report and store what changed."""
    if not hierarchy:
        device.refresh_ip(as_json=as_json, config=config)
        return
    settings = load_settings(config)
    reports = []
    with control_stub(settings) as stub:
        request = pb.RefreshIpRequest(hierarchy=True)
        for report in call_stream(settings, stub.RefreshIp(
                request, timeout=settings.hierarchy.recollect_timeout + 5)):
            reports.append(report)
            if not as_json:
                state = (f"{len(report.changes)} change(s)" if report.reachable
                         else f"[red]unreachable[/]: {report.error}")
                err.print(f"  {report.node_id}: {state}", highlight=False)
    if as_json:
        print_json([message_dict(r) for r in reports])
        return
    rows = []
    for r in reports:
        if not r.reachable:
            rows.append([r.node_id, "", "", "", f"unreachable: {r.error}"])
        for c in r.changes:
            rows.append([r.node_id, c.device, c.host, c.old_ip, c.new_ip or "(does not resolve)"])
        if r.reachable and not r.changes:
            rows.append([r.node_id, "", "", "", "no change"])
    table("Refreshed addresses", ["node", "device", "host", "old IP", "new IP"], rows)


def recollect(as_json: JsonOption = False, config: ConfigOption = None) -> None:
    """Gather the DotCom directory of the whole tree and store it on every node."""
    settings = load_settings(config)
    entries: list[pb.DirectoryEntry] = []
    done: pb.RecollectDone | None = None
    with control_stub(settings) as stub:
        stream = stub.Recollect(pb.RecollectRequest(batched=True),
                                timeout=settings.hierarchy.recollect_timeout + 5)
        for event in call_stream(settings, stream):
            if event.HasField("done"):
                done = event.done
                continue
            arrived = list(event.entries.entries) if event.HasField("entries") else [event.entry]
            entries.extend(arrived)
            if not as_json:
                for e in arrived:
                    err.print(f"  {_progress(e)}", highlight=False)
    if as_json:
        print_json({"root_id": done.root_id if done else "",
                    "published": done.published if done else 0,
                    "nodes": [message_dict(e) for e in entries]})
    else:
        directory_table(entries)
        if done is not None:
            out.print(f"{done.nodes} node(s), {done.unreachable} unreachable; the directory "
                      f"from {done.root_id} is stored on {done.published} node(s).",
                      highlight=False)
    if done is None:
        fail("the root did not confirm that it stored and published the directory in time"
             f" (hierarchy.recollect_timeout = {settings.hierarchy.recollect_timeout} s)")


def _progress(e: pb.DirectoryEntry) -> str:
    if e.reachable:
        return f"[green]ok[/] {e.node.node_id} ({e.node.role}, {e.node.control_address})"
    return f"[red]unreachable[/] {e.node.node_id}: {e.error}"


def message_dict(message: Any) -> dict[str, Any]:
    """A message as --json prints it: the .proto's field names, every field present."""
    return json_format.MessageToDict(message, always_print_fields_with_no_presence=True,
                                     preserving_proto_field_name=True)


def _partitions(info: pb.NodeInfo) -> str:
    return ", ".join(f"{p.ae_title}:{p.port}" + (f" (TLS {p.tls_port})" if p.tls_port else "")
                     + ("" if p.enabled else " (disabled)") for p in info.partitions)


def directory_table(entries: list[pb.DirectoryEntry]) -> None:
    table("DotCom directory", ["node", "site", "role", "parent", "control address",
                               "partitions", "version", "last seen", "reachable"],
          [[e.node.node_id, e.node.site, e.node.role, e.node.parent_id, e.node.control_address,
            _partitions(e.node), e.node.version, _ago(e.last_seen_ms),
            "yes" if e.reachable else f"no: {e.error}"] for e in entries])


def _ago(last_seen_ms: int) -> str:
    if not last_seen_ms:
        return "never"
    seconds = max(0.0, time.time() - last_seen_ms / 1000)
    if seconds < 120:
        return f"{seconds:.0f} s ago"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min ago"
    return datetime.fromtimestamp(last_seen_ms / 1000).isoformat(timespec="seconds")


# --- talking to the running node --------------------------------------------------------

def control_address(settings: Settings) -> str:
    """Where the CLI reaches its own node: the advertised name when TLS is on (it is what the
    certificate names), else the listen address with a wildcard host made loopback."""
    if uses_tls(settings):
        return advertise_address(settings)
    host, port = split_address(settings.hierarchy.control_listen, "hierarchy.control_listen")
    if host in ("0.0.0.0", "::"):
        host = "127.0.0.1"
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


@contextlib.contextmanager
def control_stub(settings: Settings, address: str | None = None) -> Iterator[rpc.ControlStub]:
    """A stub for this node's control plane, or another node's at `address`."""
    channel = open_channel(settings, address or control_address(settings))
    try:
        yield rpc.ControlStub(channel)
    finally:
        channel.close()


def call_stream(settings: Settings, stream: Iterator[Any]) -> Iterator[Any]:
    """A stream from the node, with its failure turned into a CLI error naming the problem."""
    try:
        yield from stream
    except grpc.RpcError as exc:
        code = exc.code() if hasattr(exc, "code") else None
        hint = (" (is `pacsnode serve` running with this configuration?)"
                if code == grpc.StatusCode.UNAVAILABLE else "")
        fail(f"the control plane at {control_address(settings)} failed: {describe(exc)}{hint}")


# --- `pacsnode hierarchy` ---------------------------------------------------------------

hierarchy_app = typer.Typer(help="The tree of nodes: status, DotCom directory, neighbours.",
                            no_args_is_help=True)


@hierarchy_app.command()
def status(as_json: JsonOption = False, config: ConfigOption = None) -> None:
    """Draw the whole tree, live: each node's liveness and forwarding queue depth."""
    settings = load_settings(config)
    with control_stub(settings) as stub:
        entries = list(call_stream(settings, stub.HierarchyStatus(
            pb.HierarchyStatusRequest(), timeout=settings.hierarchy.recollect_timeout + 5)))
    if as_json:
        print_json([message_dict(e) for e in entries])
        return
    out.print(render_tree(entries))


def render_tree(entries: list[pb.DirectoryEntry]) -> Tree:
    by_id = {e.node.node_id: e for e in entries}
    kids: dict[str, list[pb.DirectoryEntry]] = {}
    roots = []
    for e in entries:
        if e.node.parent_id and e.node.parent_id in by_id:
            kids.setdefault(e.node.parent_id, []).append(e)
        else:
            roots.append(e)

    def label(e: pb.DirectoryEntry) -> str:
        site = f" {e.node.site}" if e.node.site else ""
        if not e.reachable:
            return (f"[red]✗ {e.node.node_id}[/]{site}  unreachable: {e.error}"
                    f"  (last seen {_ago(e.last_seen_ms)})")
        failed = f", [red]{e.queue_failed} failed[/]" if e.queue_failed else ""
        return (f"[green]● {e.node.node_id}[/]{site}  {e.node.role}  {_partitions(e.node)}"
                f"  queue {e.queue_depth}{failed}")

    top = Tree("hierarchy")
    def add(parent: Tree, e: pb.DirectoryEntry) -> None:
        branch = parent.add(label(e))
        for child in sorted(kids.get(e.node.node_id, []), key=lambda c: c.node.node_id):
            add(branch, child)

    for root in roots:
        add(top, root)
    return top


@hierarchy_app.command("queue")
def node_queue(
    node_id: Annotated[str | None, typer.Argument(
        help="A node of the tree, by id (default: this node).")] = None,
    as_json: JsonOption = False,
    config: ConfigOption = None,
) -> None:
    """The forwarding queue of any node of the tree, per destination (asks that node)."""
    settings = load_settings(config)
    address = control_address(settings)
    if node_id and node_id != settings.node_id:
        with database(config) as (_settings, db), db.session() as session:
            row = session.get(DirectoryNode, node_id)
            n = neighbours.get(session, node_id)
            address = n.control_address if n is not None else (
                row.control_address if row is not None else "")
        if not address:
            fail(f"node {node_id} is neither a neighbour nor in the DotCom directory"
                 " (run pacsnode recollect)")
    with control_stub(settings, address) as stub:
        try:
            answer = stub.QueueStatus(pb.QueueStatusRequest(),
                                      timeout=settings.hierarchy.rpc_timeout)
        except grpc.RpcError as exc:
            fail(f"the control plane at {address} failed: {describe(exc)}")
    if as_json:
        print_json(message_dict(answer))
        return
    table(f"Forwarding queue of {answer.node_id}",
          ["destination", "pending", "sending", "failed", "done"],
          [[d.device, d.pending, d.sending, d.failed, d.done] for d in answer.destinations]
          + [["(all)", answer.pending, answer.sending, answer.failed, answer.done]])


@hierarchy_app.command("directory")
def show_directory(as_json: JsonOption = False, config: ConfigOption = None) -> None:
    """The DotCom directory this node stored at the last recollect."""
    with database(config) as (_settings, db), db.session() as session:
        rows = directory.listing(session)
    if as_json:
        print_json(rows)
        return
    if not rows:
        typer.echo("the directory is empty: run pacsnode recollect")
        return
    table("DotCom directory (stored)", ["node", "site", "role", "parent", "control address",
                                        "partitions", "reachable", "collected"],
          [[r["node_id"], r["site"], r["role"], r["parent_id"], r["control_address"],
            ", ".join(f"{p['ae_title']}:{p['port']}" for p in r["partitions"]),
            "yes" if r["reachable"] else f"no: {r['error']}", r["collected_at"]]
           for r in rows])


@hierarchy_app.command("neighbours")
def show_neighbours(as_json: JsonOption = False, config: ConfigOption = None) -> None:
    """This node's parent and children: liveness, and device changes not yet delivered."""
    with database(config) as (settings, db), db.session() as session:
        now = utcnow()
        top = replication.last_seq(session)
        rows = []
        for n in filter(None, [neighbours.parent(session), *neighbours.children(session)]):
            behind = session.scalar(select(func.count()).select_from(DeviceChange).where(
                DeviceChange.seq > n.cursor, DeviceChange.received_from != n.node_id)) or 0
            rows.append({"node_id": n.node_id, "role": n.role, "site": n.site,
                         "control_address": n.control_address,
                         "alive": neighbours.alive(n, now),
                         "last_seen": n.last_seen.isoformat() if n.last_seen else None,
                         "last_error": n.last_error, "queue_depth": n.queue_depth,
                         "changes_not_delivered": behind if n.cursor < top else 0})
        configured_parent = settings.hierarchy.parent
    if as_json:
        print_json({"node_id": settings.node_id, "parent_address": configured_parent,
                    "neighbours": rows})
        return
    typer.echo(f"node {settings.node_id}; parent: {configured_parent or '(none: root)'}")
    table("Neighbours", ["node", "role", "site", "control address", "alive", "last seen",
                         "queue", "changes to send", "last error"],
          [[r["node_id"], r["role"], r["site"], r["control_address"],
            "yes" if r["alive"] else "no", r["last_seen"], r["queue_depth"],
            r["changes_not_delivered"], r["last_error"]] for r in rows])


@hierarchy_app.command("records")
def show_records(as_json: JsonOption = False, config: ConfigOption = None) -> None:
    """Hierarchy-wide device records this node holds, with origin and version (tombstones
    included): identical on every node once the tree has converged."""
    with database(config) as (_settings, db), db.session() as session:
        rows = [{"name": r.name, "origin_node": r.origin_node, "version": r.version,
                 "deleted": r.deleted, "payload": json.loads(r.payload) if r.payload else None}
                for r in replication.snapshot(session)]
    if as_json:
        print_json(rows)
        return
    table("Hierarchy-wide device records", ["device", "origin", "version", "deleted"],
          [[r["name"], r["origin_node"], r["version"], r["deleted"]] for r in rows])


app = build_app(serve_command=serve, refresh_ip_command=refresh_ip)
app.command("recollect")(recollect)
app.add_typer(hierarchy_app, name="hierarchy")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
