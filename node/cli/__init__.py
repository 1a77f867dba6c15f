"""The `pacsnode` command: serve a node and administer it."""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated

import typer

from node.cli import (
    activity,
    category,
    configuration,
    db,
    deleted,
    device,
    importing,
    integrity,
    partition,
    query,
    queue,
    serve,
    status,
    study,
)
from node.implementation import version

HELP = "A hierarchical PACS node: DICOM archive, partitions, devices and their administration."


def _print_version(wanted: bool) -> None:
    if wanted:
        typer.echo(f"pacsnode {version()}")
        raise typer.Exit()


def _root(
    _version: Annotated[bool, typer.Option(
        "--version", callback=_print_version, is_eager=True,
        help="Print the installed version and exit.")] = False,
) -> None:
    """The options of `pacsnode` itself (before any command)."""


def build_app(serve_command: Callable[..., None] = serve.serve,
              refresh_ip_command: Callable[..., None] = device.refresh_ip) -> typer.Typer:
    """The node's commands; the hierarchy package builds the full `pacsnode` with its own
    serve (which adds the control plane) and refresh-ip (which adds --hierarchy)."""
    # A traceback never lists local variables: they hold the settings, passwords included
    # (older typer versions show them by default).
    # Plain help (click's layout), not typer's rich panels: those give every flag a type
    # column, so `--enabled/--disabled` read `<bool>` as if they took a value (typer's plain
    # layout leaves flags without one), and cut long option names at 80 columns.
    app = typer.Typer(name="pacsnode", help=HELP, no_args_is_help=True, add_completion=False,
                      pretty_exceptions_show_locals=False, rich_markup_mode=None)
    app.callback()(_root)
    app.command("serve")(serve_command)
    app.add_typer(db.app, name="db")
    app.add_typer(partition.app, name="partition")
    app.add_typer(device.app, name="device")
    app.add_typer(integrity.app, name="integrity")
    app.add_typer(queue.app, name="queue")
    app.add_typer(category.app, name="category")
    app.command("activity")(activity.activity)
    app.add_typer(study.app, name="study")
    app.add_typer(deleted.app, name="deleted")
    app.command("import")(importing.import_)
    app.command("query")(query.query)
    app.command("status")(status.status)
    app.command("refresh-ip")(refresh_ip_command)
    app.add_typer(configuration.app, name="config")
    return app


app = build_app()


def main() -> None:
    app()
