"""`pacsnode partition`: the node's virtual archives (docs/how-to/partitions.md)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from sqlalchemy import or_, select
from sqlalchemy.orm import Session

from node import partitions
from node.cli.common import (
    SWITCH,
    ConfigOption,
    JsonOption,
    change,
    database,
    err,
    fail,
    fields,
    load_settings,
    print_json,
    switch,
    table,
    transaction,
)
from node.db.models import Partition
from node.policy.matching import MATCH_FIELDS
from node.ports import bind_reason, probe

app = typer.Typer(help="Partitions: AE title + port virtual archives.", no_args_is_help=True)

AeArg = Annotated[str, typer.Argument(help="The partition's AE title.")]
Port = Annotated[int | None, typer.Option(help="TCP listen port (may be shared; 0: none).")]
TlsPort = Annotated[int | None, typer.Option(
    "--tls-port", help="DICOM TLS listen port (may be shared; 0: none; needs [tls] cert).")]
MaxAssociations = Annotated[int | None, typer.Option(
    "--max-associations", help="Inbound associations at once (0: only the node's limit).")]
Folder = Annotated[str | None, typer.Option(help="Storage folder (default: the AE title).")]
Description = Annotated[str | None, typer.Option(help="Free text shown in listings and logs.")]
Enabled = Annotated[bool | None, typer.Option("--enabled/--disabled",
                                              help="Accept associations (default: enabled).")]
Duplicates = Annotated[str | None, typer.Option(
    "--duplicate-policy", metavar="send-success|reject|compare",
    help="What a duplicate instance gets (default: send-success).")]
AcceptAny = Annotated[bool | None, typer.Option(
    "--accept-any/--no-accept-any", help="Accept devices not in the device table (default: on).")]
AutoInsert = Annotated[bool | None, typer.Option(
    "--auto-insert/--no-auto-insert",
    help="Add accepted unknown devices to the device table (default: off).")]
RemotePort = Annotated[int | None, typer.Option(
    "--default-remote-port", help="Port given to auto-inserted devices (default: 104).")]
Match = Annotated[str | None, typer.Option(
    "--match", help="Study-matching fields, comma separated: "
    + ",".join(MATCH_FIELDS.values()) + ", or 'all' or 'none' (default: all).")]
TrackDeleted = Annotated[bool | None, typer.Option(
    "--track-deleted/--no-track-deleted",
    help="Keep deleted studies in a deleted folder (default: off).")]
CaseSensitive = Annotated[str | None, typer.Option(
    "--case-sensitive", metavar=SWITCH,
    help="Case-sensitive query matching (default: the node's query.case_sensitive).")]
EmptyMatching = Annotated[str | None, typer.Option(
    "--empty-matching", metavar=SWITCH,
    help="An empty value matches a non-empty query key (default: the node's"
    " query.empty_matching).")]
QueryLimit = Annotated[str | None, typer.Option(
    "--query-limit", metavar="N|default",
    help="Most matches a query or retrieve may have, 0: no limit (default: the node's"
    " query.limit).")]
Forwarding = Annotated[bool | None, typer.Option(
    "--forwarding/--no-forwarding", help="Queue what is stored here for forwarding (default on).")]
NewAe = Annotated[str | None, typer.Option("--ae-title", help="Rename the AE title.")]


def _match_values(spec: str) -> dict[str, bool]:
    by_keyword = {kw.lower(): flag for flag, kw in MATCH_FIELDS.items()}
    words = [w.strip().lower() for w in spec.split(",") if w.strip()]
    if words == ["all"]:
        chosen = set(MATCH_FIELDS)
    elif words == ["none"]:
        chosen = set()
    else:
        unknown = [w for w in words if w not in by_keyword]
        if unknown:
            fail(f"unknown study-matching field(s) {', '.join(unknown)}; use "
                 f"{', '.join(MATCH_FIELDS.values())}, all or none")
        chosen = {by_keyword[w] for w in words}
    return {flag: flag in chosen for flag in MATCH_FIELDS}


def _limit(value: str) -> int | None:
    if value.strip().lower() == "default":
        return None
    try:
        return int(value)
    except ValueError:
        fail(f"--query-limit must be a number or default, not {value!r}")


def _values(**options: Any) -> dict[str, Any]:
    match = options.pop("match")
    query = {key: options.pop(key) for key in ("case_sensitive", "empty_matching", "query_limit")}
    values = {k: v for k, v in options.items() if v is not None}
    if match is not None:
        values.update(_match_values(match))
    if query["case_sensitive"] is not None:
        values["case_sensitive_matching"] = switch("--case-sensitive", query["case_sensitive"])
    if query["empty_matching"] is not None:
        values["empty_matching"] = switch("--empty-matching", query["empty_matching"])
    if query["query_limit"] is not None:
        values["query_limit"] = _limit(query["query_limit"])
    return values


def _show(p: Any, studies: int) -> None:
    data = partitions.as_dict(p, studies)
    for key in ("case_sensitive_matching", "empty_matching", "query_limit"):
        if data[key] is None:
            data[key] = "(node default)"
    data["match"] = ",".join(kw for flag, kw in MATCH_FIELDS.items() if data.pop(flag)) or "none"
    fields(data)


def _check_tls(config: Path | None, values: dict[str, Any]) -> None:
    if values.get("tls_port") and not load_settings(config).tls.cert:
        fail("a TLS port needs the node's certificate: set tls.cert and tls.key in the settings"
             " file first")


def _warn_if_busy(config: Path | None, session: Session, p: Any,
                  before: tuple[int, int] = (0, 0)) -> None:
    """Warn when a port the partition now has is not free on this host. A port it had
    before, or that another enabled partition has, is the running node's own listener."""
    if not p.enabled:
        return
    host = load_settings(config).node.listen_host
    for port, kind in ((p.port, "port"), (p.tls_port, "TLS port")):
        if not port or port in before:
            continue
        shared = session.scalar(select(Partition.id).where(
            Partition.id != p.id, Partition.enabled.is_(True),
            or_(Partition.port == port, Partition.tls_port == port)).limit(1))
        refused = None if shared is not None else probe(host, port)
        if refused is not None:
            err.print(f"warning: {kind} {port} cannot be opened on this host now:"
                      f" {bind_reason(refused)}. A running node logs it and opens the port"
                      f" for {p.ae_title} as soon as it can.", highlight=False)


def _ports(p: Any) -> str:
    ports = [f"port {p.port}"] if p.port else []
    ports += [f"TLS port {p.tls_port}"] if p.tls_port else []
    return " and ".join(ports)


@app.command()
def add(
    ae_title: AeArg,
    port: Port = None,
    tls_port: TlsPort = None,
    max_associations: MaxAssociations = None,
    folder: Folder = None,
    description: Description = None,
    enabled: Enabled = None,
    duplicate_policy: Duplicates = None,
    accept_any: AcceptAny = None,
    auto_insert: AutoInsert = None,
    default_remote_port: RemotePort = None,
    match: Match = None,
    track_deleted: TrackDeleted = None,
    case_sensitive: CaseSensitive = None,
    empty_matching: EmptyMatching = None,
    query_limit: QueryLimit = None,
    forwarding: Forwarding = None,
    config: ConfigOption = None,
) -> None:
    """Add a partition (port defaults to 11112)."""
    values = _values(port=port if port is not None else (0 if tls_port else 11112),
                     tls_port=tls_port, max_associations=max_associations, folder=folder,
                     description=description, enabled=enabled,
                     duplicate_policy=duplicate_policy, accept_any_device=accept_any,
                     auto_insert_devices=auto_insert, default_remote_port=default_remote_port,
                     match=match, track_deleted_studies=track_deleted,
                     case_sensitive=case_sensitive, empty_matching=empty_matching,
                     query_limit=query_limit, forwarding_enabled=forwarding)
    _check_tls(config, values)
    with transaction(config) as session:
        p = partitions.add(session, ae_title=ae_title, **values)
        typer.echo(f"added partition {p.ae_title} on {_ports(p)} (folder {p.folder})")
        _warn_if_busy(config, session, p)


@app.command("list")
def list_(as_json: JsonOption = False, config: ConfigOption = None) -> None:
    """List partitions with the number of studies each holds."""
    with database(config) as (_settings, db), db.session() as session:
        rows = partitions.listing(session)
        if as_json:
            print_json([partitions.as_dict(r.partition, r.studies) for r in rows])
            return
        table("Partitions", ["AE title", "port", "TLS", "enabled", "studies", "folder",
                             "duplicates", "accept any", "auto insert", "description"],
              [[r.partition.ae_title, r.partition.port or "", r.partition.tls_port or "",
                r.partition.enabled, r.studies,
                r.partition.folder, r.partition.duplicate_policy, r.partition.accept_any_device,
                r.partition.auto_insert_devices, r.partition.description] for r in rows])


@app.command()
def show(ae_title: AeArg, as_json: JsonOption = False, config: ConfigOption = None) -> None:
    """Show every setting of a partition."""
    with database(config) as (_settings, db), db.session() as session:
        try:
            p = partitions.get(session, ae_title)
        except partitions.AdminError as exc:
            fail(str(exc))
        studies = partitions.study_counts(session).get(p.id, 0)
        if as_json:
            print_json(partitions.as_dict(p, studies))
        else:
            _show(p, studies)


@app.command()
def edit(
    ae_title: AeArg,
    new_ae_title: NewAe = None,
    port: Port = None,
    tls_port: TlsPort = None,
    max_associations: MaxAssociations = None,
    folder: Folder = None,
    description: Description = None,
    enabled: Enabled = None,
    duplicate_policy: Duplicates = None,
    accept_any: AcceptAny = None,
    auto_insert: AutoInsert = None,
    default_remote_port: RemotePort = None,
    match: Match = None,
    track_deleted: TrackDeleted = None,
    case_sensitive: CaseSensitive = None,
    empty_matching: EmptyMatching = None,
    query_limit: QueryLimit = None,
    forwarding: Forwarding = None,
    config: ConfigOption = None,
) -> None:
    """Change a partition's settings; a running node applies them without a restart."""
    values = _values(ae_title=new_ae_title, port=port, tls_port=tls_port,
                     max_associations=max_associations, folder=folder, description=description,
                     enabled=enabled, duplicate_policy=duplicate_policy,
                     accept_any_device=accept_any, auto_insert_devices=auto_insert,
                     default_remote_port=default_remote_port, match=match,
                     track_deleted_studies=track_deleted, case_sensitive=case_sensitive,
                     empty_matching=empty_matching, query_limit=query_limit,
                     forwarding_enabled=forwarding)
    if not values:
        fail("nothing to change: give at least one option (see --help)")
    _check_tls(config, values)
    with transaction(config) as session:
        current = partitions.get(session, ae_title)
        before = (current.port, current.tls_port) if current.enabled else (0, 0)
        p = partitions.edit(session, ae_title, **values)
        typer.echo(f"updated partition {p.ae_title}")
        _warn_if_busy(config, session, p, before)
        if folder is not None:
            typer.echo("note: studies already stored keep their files in the old folder")


@app.command()
def enable(ae_title: AeArg, config: ConfigOption = None) -> None:
    """Accept associations to the partition again."""
    change(config, lambda s: partitions.edit(s, ae_title, enabled=True),
           f"enabled partition {ae_title}")


@app.command()
def disable(ae_title: AeArg, config: ConfigOption = None) -> None:
    """Stop accepting associations to the partition (a running node stops within seconds)."""
    change(config, lambda s: partitions.edit(s, ae_title, enabled=False),
           f"disabled partition {ae_title}")


@app.command()
def delete(ae_title: AeArg, config: ConfigOption = None) -> None:
    """Delete a partition; refused while it holds studies."""
    change(config, lambda s: partitions.delete(s, ae_title), f"deleted partition {ae_title}")
