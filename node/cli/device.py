"""`pacsnode device`: the device table (docs/how-to/devices.md)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import typer
from sqlalchemy import select
from sqlalchemy.orm import Session

from node import devices, partitions
from node.cli.common import (
    SWITCH,
    ConfigOption,
    JsonOption,
    change,
    database,
    fail,
    fields,
    print_json,
    switch,
    table,
    transaction,
)
from node.config import Settings
from node.db.models import DeviceType, Partition
from node.forwarding import admin as queue_admin
from node.hostnames import resolve, resolve_ip
from node.partitions import AdminError
from node.scu.echo import echo as send_echo
from node.scu.ping import ping as ping_host
from node.scu.requestor import Own
from node.tls import Endpoint, TlsError, endpoint

app = typer.Typer(help="Device table: the DICOM peers this node knows.", no_args_is_help=True)

NameArg = Annotated[str, typer.Argument(help="The device's id (unique label).")]
AeTitle = Annotated[str | None, typer.Option("--ae-title", help="The device's AE title.")]
Host = Annotated[str | None, typer.Option(help="Host name or IP address.")]
Port = Annotated[int | None, typer.Option(help="The device's DICOM port (default 104).")]
TlsPort = Annotated[int | None, typer.Option("--tls-port", help="DICOM TLS port (0: none).")]
Type = Annotated[str | None, typer.Option(
    "--type", help=" | ".join(t.value for t in DeviceType) + " (default DICOM). SELF: this"
    " node itself, whose coercion rules apply to `pacsnode import` (one per node).")]
Partition_ = Annotated[str | None, typer.Option(
    "--partition", help="AE title of the partition it belongs to ('' = every partition).")]
Description = Annotated[str | None, typer.Option(help="Free text.")]
Enabled = Annotated[bool | None, typer.Option(
    "--enabled/--disabled", help="Admit its associations and forward to it (default: enabled).")]
Rule = Annotated[list[str] | None, typer.Option(
    "--rule", help="A coercion rule, e.g. 'prefix AccessionNumber SITEA-' (repeatable, in order;"
    " replaces the device's rules). The rule language: docs/how-to/coercion.md.")]
RulesFile = Annotated[Path | None, typer.Option(
    "--rules-file", help="Read the coercion rules from a file, one per line.")]
ClearRules = Annotated[bool, typer.Option("--clear-rules", help="Remove all coercion rules.")]
Storage = Annotated[bool | None, typer.Option("--storage/--no-storage",
                                              help="May store (C-STORE) to this node.")]
Query = Annotated[bool | None, typer.Option("--query/--no-query",
                                            help="May query (C-FIND) this node.")]
Retrieve = Annotated[bool | None, typer.Option("--retrieve/--no-retrieve",
                                               help="May retrieve (C-MOVE/C-GET) from this node.")]

MaxPdu = Annotated[int | None, typer.Option(
    "--max-pdu", help="Max PDU size for associations to the device (0: the node's).")]
AcseTimeout = Annotated[float | None, typer.Option(
    "--acse-timeout", help="Seconds for association set-up with the device (0: the node's).")]
DimseTimeout = Annotated[float | None, typer.Option(
    "--dimse-timeout", help="Seconds to wait for the device's DIMSE answers (0: the node's).")]
NetworkTimeout = Annotated[float | None, typer.Option(
    "--network-timeout", help="Idle seconds before closing (0: the node's).")]
Syntaxes = Annotated[str | None, typer.Option(
    "--transfer-syntaxes", help="Syntaxes to offer the device besides each instance's own, "
    "comma separated (UIDs or keywords).")]

Forward = Annotated[bool | None, typer.Option(
    "--forward/--no-forward", help="Forward to this PARENT/BACKUP_TARGET/VIEWER device.")]
ForwardRule = Annotated[list[str] | None, typer.Option(
    "--forward-rule", help="Forward only what matches, e.g. 'modality CT MR', 'calling-ae CT1',"
    " 'sop-class 1.2.840...' (repeatable; all must hold; replaces the device's rules).")]
ClearForwardRules = Annotated[bool, typer.Option("--clear-forward-rules",
                                                 help="Forward everything again.")]
MaxTasks = Annotated[int | None, typer.Option(
    "--max-tasks", help="Most associations the node opens to the device at once (new "
    "devices: 2).")]
MaxInbound = Annotated[int | None, typer.Option(
    "--max-inbound", help="Most associations the device may hold open to this node at once "
    "(0: the node's dicom.max_associations_per_device).")]
CategoryOption = Annotated[str | None, typer.Option(
    "--category", help="Category whose members share a connection limit ('' = none).")]
Heartbeat = Annotated[str | None, typer.Option(
    "--heartbeat", metavar=SWITCH, help="Keep the association open between transmissions"
    " (default: the node's forwarding.heartbeat).")]
RemovePrivate = Annotated[str | None, typer.Option(
    "--remove-private-tags", metavar=SWITCH, help="Remove private tags when forwarding"
    " (default: the node's forwarding.remove_private_tags).")]
SendUpdates = Annotated[str | None, typer.Option(
    "--send-updates", metavar=SWITCH, help="Forward new instances of studies already sent"
    " (default: the node's forwarding.send_updates).")]

Commitment = Annotated[bool | None, typer.Option(
    "--storage-commitment/--no-storage-commitment",
    help="Ask the device to commit what it was sent (push model).")]

Scope = Annotated[str | None, typer.Option(
    "--scope", metavar="local|hierarchy", help="local: this node only (the default);"
    " hierarchy: replicated to every node of the tree.")]


def _forwarding(forward: bool | None, forward_rule: list[str] | None, clear: bool,
                max_tasks: int | None, category: str | None, heartbeat: str | None,
                remove_private: str | None, send_updates: str | None) -> dict[str, object]:
    values: dict[str, object] = {"forward": forward, "max_outbound_tasks": max_tasks,
                                 "category": category}
    if clear:
        values["forward_rules"] = ""
    elif forward_rule:
        values["forward_rules"] = "\n".join(forward_rule)
    for key, option, value in (("heartbeat", "--heartbeat", heartbeat),
                               ("remove_private_tags", "--remove-private-tags", remove_private),
                               ("send_updates", "--send-updates", send_updates)):
        if value is not None:
            values[key] = switch(option, value)
            if values[key] is None:
                values[key] = _NODE_DEFAULT
    return values


_NODE_DEFAULT = object()  # "default": store NULL, unlike an option that was not given


def _rules(rule: list[str] | None, rules_file: Path | None, clear: bool) -> str | None:
    if clear:
        return ""
    if rules_file is not None:
        try:
            return rules_file.read_text(encoding="utf-8")
        except OSError as exc:
            fail(f"cannot read {rules_file}: {exc.strerror}")
    if rule:
        return "\n".join(rule)
    return None


# CLI option -> device table field, for what `add` and `edit` share.
_FIELDS = {
    "name": "name", "ae_title": "ae_title", "host": "host", "port": "port",
    "tls_port": "tls_port", "device_type": "device_type", "partition": "partition",
    "description": "description", "enabled": "enabled", "storage": "allow_storage",
    "query": "allow_query", "retrieve": "allow_retrieve", "max_pdu": "max_pdu_size",
    "acse_timeout": "acse_timeout", "dimse_timeout": "dimse_timeout",
    "network_timeout": "network_timeout", "transfer_syntaxes": "transfer_syntaxes",
    "storage_commitment": "storage_commitment", "scope": "scope",
    "max_inbound": "max_inbound_associations",
}


def _device_values(options: dict[str, Any]) -> dict[str, Any]:
    """The table fields the given options set (options not given are left out)."""
    values: dict[str, Any] = {field: options[opt] for opt, field in _FIELDS.items()}
    values["coercion_rules"] = _rules(options["rule"], options["rules_file"],
                                      options.get("clear_rules", False))
    values.update(_forwarding(options["forward"], options["forward_rule"],
                              options["clear_forward_rules"], options["max_tasks"],
                              options["category"], options["heartbeat"],
                              options["remove_private_tags"], options["send_updates"]))
    return {k: (None if v is _NODE_DEFAULT else v) for k, v in values.items() if v is not None}


@app.command()
def add(
    name: NameArg,
    ae_title: AeTitle = None,
    host: Host = None,
    port: Port = None,
    tls_port: TlsPort = None,
    device_type: Type = None,
    partition: Partition_ = None,
    description: Description = None,
    enabled: Enabled = None,
    rule: Rule = None,
    rules_file: RulesFile = None,
    storage: Storage = None,
    query: Query = None,
    retrieve: Retrieve = None,
    max_pdu: MaxPdu = None,
    acse_timeout: AcseTimeout = None,
    dimse_timeout: DimseTimeout = None,
    network_timeout: NetworkTimeout = None,
    transfer_syntaxes: Syntaxes = None,
    forward: Forward = None,
    forward_rule: ForwardRule = None,
    clear_forward_rules: ClearForwardRules = False,
    max_tasks: MaxTasks = None,
    max_inbound: MaxInbound = None,
    category: CategoryOption = None,
    heartbeat: Heartbeat = None,
    remove_private_tags: RemovePrivate = None,
    send_updates: SendUpdates = None,
    storage_commitment: Commitment = None,
    scope: Scope = None,
    config: ConfigOption = None,
) -> None:
    """Add a device (AE title defaults to the id)."""
    values = _device_values({**locals(), "name": name,
                             "ae_title": ae_title if ae_title is not None else name})
    with transaction(config) as session:
        d = devices.add(session, **values)
        typer.echo(f"added device {d.name} ({d.ae_title} at {d.host or '?'}:{d.port})")
        if d.host and not d.ip:
            typer.echo(f"warning: host {d.host} does not resolve now", err=True)


@app.command("list")
def list_(
    partition: Annotated[str | None, typer.Option(help="Only this partition's devices.")] = None,
    as_json: JsonOption = False,
    config: ConfigOption = None,
) -> None:
    """List the device table."""
    with database(config) as (_settings, db), db.session() as session:
        try:
            rows = devices.listing(session, partition)
        except devices.AdminError as exc:
            fail(str(exc))
        if as_json:
            print_json([devices.as_dict(d) for d in rows])
            return
        table("Devices", ["id", "AE title", "host", "ip", "port", "TLS", "type", "enabled",
                          "partition", "scope", "rules", "description"],
              [[d.name, d.ae_title, d.host, d.ip, d.port, d.tls_port or "", d.device_type,
                d.enabled, d.partition.ae_title if d.partition else "(all)", _scope(d),
                len([x for x in d.coercion_rules.splitlines() if x.strip()]), d.description]
               for d in rows])


def _scope(d: Any) -> str:
    if d.scope == "hierarchy":
        return f"hierarchy ({d.origin_node})" if d.origin_node else "hierarchy"
    return f"local ({d.neighbour_id})" if d.neighbour_id else "local"


# What an unset value of `device show` means, in the words partition show uses: 0 or None
# stand for the node's setting, or for nothing.
_NODE_DEFAULT = "(node default)"
_UNSET: dict[str, tuple[object, str]] = {
    "max_pdu_size": (0, _NODE_DEFAULT), "acse_timeout": (0, _NODE_DEFAULT),
    "dimse_timeout": (0, _NODE_DEFAULT), "network_timeout": (0, _NODE_DEFAULT),
    "max_inbound_associations": (0, _NODE_DEFAULT), "heartbeat": (None, _NODE_DEFAULT),
    "remove_private_tags": (None, _NODE_DEFAULT), "send_updates": (None, _NODE_DEFAULT),
    "tls_port": (0, "(none)"), "category": (None, "(none)"),
    "partition": (None, "(every partition)"), "transfer_syntaxes": ("", "(none)"),
    "forward_rules": ("", "(none: everything)"),
}


def readable(data: dict[str, Any]) -> dict[str, Any]:
    """A device as `device show` prints it: unset values named, not None or 0.0."""
    shown = dict(data)
    for key, (unset, words) in _UNSET.items():
        value = shown.get(key, words)
        if value is unset if unset is None else (value is not None and value == unset):
            shown[key] = words
    return shown


@app.command()
def show(name: NameArg, as_json: JsonOption = False, config: ConfigOption = None) -> None:
    """Show a device, with its coercion rules."""
    with database(config) as (_settings, db), db.session() as session:
        try:
            d = devices.get(session, name)
        except devices.AdminError as exc:
            fail(str(exc))
        data = devices.as_dict(d)
        if as_json:
            print_json(data)
            return
        rules = data.pop("coercion_rules")
        fields(readable(data))
        typer.echo("coercion rules:" + ("" if rules.strip() else " (none)"))
        for line in rules.splitlines():
            typer.echo(f"  {line}")


@app.command()
def edit(
    name: NameArg,
    new_name: Annotated[str | None, typer.Option("--name", help="Rename the device.")] = None,
    ae_title: AeTitle = None,
    host: Host = None,
    port: Port = None,
    tls_port: TlsPort = None,
    device_type: Type = None,
    partition: Partition_ = None,
    description: Description = None,
    enabled: Enabled = None,
    rule: Rule = None,
    rules_file: RulesFile = None,
    clear_rules: ClearRules = False,
    storage: Storage = None,
    query: Query = None,
    retrieve: Retrieve = None,
    max_pdu: MaxPdu = None,
    acse_timeout: AcseTimeout = None,
    dimse_timeout: DimseTimeout = None,
    network_timeout: NetworkTimeout = None,
    transfer_syntaxes: Syntaxes = None,
    forward: Forward = None,
    forward_rule: ForwardRule = None,
    clear_forward_rules: ClearForwardRules = False,
    max_tasks: MaxTasks = None,
    max_inbound: MaxInbound = None,
    category: CategoryOption = None,
    heartbeat: Heartbeat = None,
    remove_private_tags: RemovePrivate = None,
    send_updates: SendUpdates = None,
    storage_commitment: Commitment = None,
    scope: Scope = None,
    config: ConfigOption = None,
) -> None:
    """Change a device; a running node uses the change from the next association."""
    values = _device_values({**locals(), "name": new_name})
    if not values:
        fail("nothing to change: give at least one option (see --help)")
    with transaction(config) as session:
        asked_before = devices.get(session, name).storage_commitment
        d = devices.edit(session, name, **values)
        typer.echo(f"updated device {d.name}")
        if d.storage_commitment and not asked_before:
            _commitment_switched_on(session, d.name)


def _commitment_switched_on(session: Session, name: str) -> None:
    """What was delivered before would silently stop counting as stored elsewhere: say so,
    and have the node ask for its commitment."""
    n, studies = queue_admin.ask_commitment(session, name)
    if n:
        typer.echo(f"storage commitment on: {n} instance(s) in {studies} study(ies) already"
                   f" delivered to {name} count as stored elsewhere (may be purged) only once"
                   f" {name} commits them; the running node asks it now")


@app.command()
def enable(name: NameArg, config: ConfigOption = None) -> None:
    """Enable a device."""
    change(config, lambda s: devices.edit(s, name, enabled=True), f"enabled device {name}")


@app.command()
def disable(name: NameArg, config: ConfigOption = None) -> None:
    """Disable a device: its associations are rejected, its settings kept."""
    change(config, lambda s: devices.edit(s, name, enabled=False), f"disabled device {name}")


@app.command()
def delete(name: NameArg, config: ConfigOption = None) -> None:
    """Delete a device and its settings."""
    change(config, lambda s: devices.delete(s, name), f"deleted device {name}")


@dataclass(frozen=True)
class Outbound:
    """An association the node requests to a device: whom it calls, where, as whom, and the
    device's own timeouts and PDU size."""

    called_ae: str
    endpoint: Endpoint
    calling_ae: str
    own: Own


def outbound(session: Session, settings: Settings, name: str, partition_ae: str | None = None
             ) -> Outbound:
    """The calling AE is the partition asked for, else the device's partition, else the
    first one."""
    try:
        d = devices.get(session, name)
        partition = (partitions.get(session, partition_ae) if partition_ae else
                     d.partition or session.scalar(select(Partition).order_by(Partition.id)))
    except AdminError as exc:
        fail(str(exc))
    address = d.ip or resolve_ip(d.host)
    if not address:
        fail(f"device {name} has no resolvable host ({d.host!r})")
    try:
        where = endpoint(settings, host=d.host, ip=address, port=d.port, tls_port=d.tls_port)
    except TlsError as exc:
        fail(str(exc))
    return Outbound(d.ae_title, where, partition.ae_title if partition else "PACSNODE",
                    Own(d.acse_timeout, d.dimse_timeout, d.network_timeout, d.max_pdu_size))


@app.command()
def echo(
    name: NameArg,
    calling_ae: Annotated[str | None, typer.Option(
        "--calling-ae", help="Calling AE title (default: the device's partition, or the first).")
    ] = None,
    as_json: JsonOption = False,
    config: ConfigOption = None,
) -> None:
    """Send a real C-ECHO to the device and print the result and round-trip time."""
    with database(config) as (settings, db), db.session() as session:
        peer = outbound(session, settings, name)
    called, where, calling_ae = peer.called_ae, peer.endpoint, calling_ae or peer.calling_ae
    result = send_echo(settings, endpoint=where, called_ae=called, calling_ae=calling_ae)
    if as_json:
        print_json({"device": name, "ok": result.ok, "status": result.status,
                    "round_trip_ms": round(result.round_trip_ms, 1), "detail": result.detail})
    else:
        typer.echo(f"C-ECHO {calling_ae} -> {called}@{where}: "
                   f"{result.detail} in {result.round_trip_ms:.1f} ms")
    if not result.ok:
        raise typer.Exit(1)


@app.command()
def ping(
    name: NameArg,
    count: Annotated[int, typer.Option("--count", min=1, max=100,
                                       help="Echo requests to send.")] = 3,
    timeout: Annotated[float, typer.Option(min=0.1, max=60.0,
                                           help="Seconds to wait for each answer.")] = 2.0,
    use_tcp: Annotated[bool, typer.Option(
        "--tcp", help="Time TCP connections to the device's DICOM port instead of ICMP echo"
        " (for hosts behind a firewall that drops ICMP).")] = False,
    as_json: JsonOption = False,
    config: ConfigOption = None,
) -> None:
    """Is the device's host reachable, and how fast: ICMP echo with the system's ping (a TCP
    connection to the DICOM port where there is none). `device echo` tests DICOM itself."""
    with database(config) as (_settings, db), db.session() as session:
        try:
            d = devices.get(session, name)
        except devices.AdminError as exc:
            fail(str(exc))
        host, port = d.host or d.ip, d.port or d.tls_port
    if not host:
        fail(f"device {name} has no host to ping (device edit {name} --host ...)")
    address, why = resolve(host)
    if not address:
        fail(f"device {name}: host {host!r} does not resolve: {why}")
    result, method = ping_host(address, port, count, timeout, use_tcp=use_tcp)
    if as_json:
        print_json({"device": name, "host": host, "address": address, "method": result.method,
                    "how": method, "reachable": result.reachable, "sent": result.sent,
                    "received": result.received,
                    "round_trip_ms": [round(t, 3) for t in result.times_ms],
                    "detail": result.detail})
    else:
        shown = host if host == address else f"{host} ({address})"
        typer.echo(f"ping {name} at {shown}, {method}: "
                   f"{'reachable' if result.reachable else 'not reachable'}; {result.summary()}")
    if not result.reachable:
        raise typer.Exit(1)


def refresh_ip(as_json: JsonOption = False, config: ConfigOption = None) -> None:
    """Re-resolve every device given by host name; report and store what changed."""
    with transaction(config) as session:
        changes = devices.refresh_ips(session)
    if as_json:
        print_json([vars(c) for c in changes])
        return
    if not changes:
        typer.echo("no device address changed")
        return
    table("Refreshed addresses", ["device", "host", "old IP", "new IP"],
          [[c.device, c.host, c.old, c.new or "(does not resolve)"] for c in changes])
