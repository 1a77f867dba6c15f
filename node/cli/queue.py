"""`pacsnode queue`: the forwarding queue, per destination."""

from __future__ import annotations

import time
from typing import Annotated

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn

from node.cli.common import (
    ConfigOption,
    JsonOption,
    database,
    fail,
    fields,
    out,
    print_json,
    table,
    transaction,
)
from node.db.database import Database
from node.forwarding import admin
from node.partitions import AdminError

app = typer.Typer(help="Forwarding queue: what waits for which destination.",
                  no_args_is_help=True)
DeviceOption = Annotated[str | None, typer.Option("--device", help="Only this destination.")]
Ids = Annotated[list[int] | None, typer.Argument(help="Job ids (or use --device).")]


@app.command("list")
def list_(
    state: Annotated[str | None, typer.Option(help=" | ".join(admin.STATES))] = None,
    device: DeviceOption = None,
    limit: Annotated[int, typer.Option(help="Newest N jobs.")] = 100,
    as_json: JsonOption = False,
    config: ConfigOption = None,
) -> None:
    """List forward jobs, newest first."""
    with database(config) as (_settings, db), db.session() as session:
        try:
            rows = admin.listing(session, state=state, device=device, limit=limit)
        except AdminError as exc:
            fail(str(exc))
    if as_json:
        print_json(rows)
        return
    table("Forward jobs", ["id", "destination", "state", "attempts", "next attempt",
                           "SOP instance", "last error"],
          [[r["id"], r["device"], r["state"], r["attempts"], r["next_attempt_at"],
            r["sop_instance_uid"], r["last_error"][:60]] for r in rows])


@app.command()
def show(job_id: Annotated[int, typer.Argument(help="The job's id.")],
         as_json: JsonOption = False, config: ConfigOption = None) -> None:
    """Show one forward job."""
    with database(config) as (_settings, db), db.session() as session:
        try:
            data = admin.show(session, job_id)
        except AdminError as exc:
            fail(str(exc))
    if as_json:
        print_json(data)
    else:
        fields(data)


@app.command()
def retry(ids: Ids = None, device: DeviceOption = None, config: ConfigOption = None) -> None:
    """Send failed, cancelled or backing-off jobs again now (attempts start over), and ask
    again now for the storage commitment delivered jobs still wait for."""
    with transaction(config) as session:
        n, asked = admin.retry(session, ids or [], device)
    typer.echo(f"{n} job(s) queued again")
    if asked:
        typer.echo(f"{asked} delivered job(s) not committed yet: storage commitment asked"
                   " again now")


@app.command()
def commit(
    device: Annotated[str, typer.Option("--device", help="The destination to ask.")],
    study: Annotated[str | None, typer.Option(
        "--study", help="Only this study (Study Instance UID).")] = None,
    config: ConfigOption = None,
) -> None:
    """Ask a destination that does storage commitment to commit what was delivered to it
    and is not committed (delivered before commitment was on, failed, no report)."""
    with transaction(config) as session:
        n, studies = admin.ask_commitment(session, device, study)
    if n:
        typer.echo(f"storage commitment of {n} delivered instance(s) in {studies} study(ies)"
                   f" is asked from {device} now (by the running node)")
    else:
        typer.echo(f"nothing delivered to {device} waits for storage commitment")


@app.command()
def cancel(ids: Ids = None, device: DeviceOption = None, config: ConfigOption = None) -> None:
    """Cancel waiting or failed jobs (they stay listed as cancelled; retry brings them back)."""
    with transaction(config) as session:
        n = admin.cancel(session, ids or [], device)
    typer.echo(f"{n} job(s) cancelled")


@app.command()
def stats(
    follow: Annotated[bool, typer.Option("--follow", help="Show progress bars until the "
                                         "queue is empty (Ctrl-C to stop watching).")] = False,
    as_json: JsonOption = False,
    config: ConfigOption = None,
) -> None:
    """Jobs per destination and state."""
    with database(config) as (_settings, db):
        with db.session() as session:
            rows = admin.stats(session)
        if follow and not as_json and any(r.waiting for r in rows):
            _follow(db)
            return
    if as_json:
        print_json([{"device": r.device, **r.counts} for r in rows])
        return
    if not rows:
        typer.echo("the forwarding queue is empty: no job for any destination")
        return
    if follow:
        typer.echo("nothing waits to be forwarded:")
    table("Forwarding queue", ["destination", *admin.STATES],
          [[r.device, *(r.counts.get(s, 0) for s in admin.STATES)] for r in rows])


def _follow(db: Database) -> None:
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TextColumn("{task.fields[detail]}"), console=out) as progress:
        tasks: dict[str, TaskID] = {}
        try:
            while True:
                with db.session() as session:
                    rows = admin.stats(session)
                for r in rows:
                    finished = r.total - r.waiting
                    detail = f"failed {r.counts.get('failed', 0)}"
                    if r.device not in tasks:
                        tasks[r.device] = progress.add_task(r.device, total=r.total,
                                                            detail=detail)
                    progress.update(tasks[r.device], total=r.total, completed=finished,
                                    detail=detail)
                if all(r.waiting == 0 for r in rows):
                    return
                time.sleep(0.5)
        except KeyboardInterrupt:
            return
