"""What every command shares: the --config option, opening the node's database, output."""

from __future__ import annotations

import contextlib
import json
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer
from rich.console import Console
from rich.table import Table
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

from node import config
from node.db.database import Database
from node.partitions import AdminError
from node.permissions import tighten_umask
from node.redact import known_secrets, redact_url, scrub
from node.service import ensure_bootstrap_partition, open_database

ConfigOption = Annotated[
    Path | None,
    typer.Option("--config", "-c", envvar=config.ENV_CONFIG,
                 help="TOML settings file (default: embedded defaults).", show_default=False),
]
JsonOption = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]

# Piped output (scripts, logs) gets full-width tables instead of 80 truncated columns.
out = Console(width=None if sys.stdout.isatty() else 200)
err = Console(stderr=True, soft_wrap=True)  # an error message is one unbroken line


def fail(message: str) -> NoReturn:
    err.print(f"[bold red]Error:[/] {message}", highlight=False)
    raise typer.Exit(1)


# The value an on | off | default option takes, as its help shows it.
SWITCH = "on|off|default"


def switch(name: str, value: str) -> bool | None:
    """An on | off | default option; default (None) means: the node's setting."""
    word = value.strip().lower()
    if word not in ("on", "off", "default"):
        fail(f"{name} must be on, off or default, not {value!r}")
    return None if word == "default" else word == "on"


def load_settings(path: Path | None) -> config.Settings:
    try:
        return config.load(path)
    except config.ConfigError as exc:
        fail(str(exc))


@contextlib.contextmanager
def database(path: Path | None) -> Iterator[tuple[config.Settings, Database]]:
    settings = load_settings(path)
    # Commands create files too (the database, deleted and exported studies).
    tighten_umask()
    try:
        db = open_database(settings)
        ensure_bootstrap_partition(db, settings)
    except (SQLAlchemyError, OSError) as exc:
        fail(database_error(settings, exc))
    try:
        yield settings, db
    finally:
        db.dispose()


def database_error(settings: config.Settings, exc: Exception) -> str:
    """Why the database cannot be used, without its password."""
    return (f"cannot open the database {redact_url(settings.database_url)}:"
            f" {scrub(str(exc), known_secrets(settings))}")


@contextlib.contextmanager
def transaction(path: Path | None) -> Iterator[Session]:
    """A write transaction; an AdminError becomes a CLI error naming the problem."""
    with database(path) as (_settings, db):
        try:
            with db.transaction() as session:
                yield session
        except AdminError as exc:
            fail(str(exc))


def change(path: Path | None, action: Callable[[Session], object], done: str) -> None:
    """Run one administrative change in a transaction and say what was done."""
    with transaction(path) as session:
        action(session)
        typer.echo(done)


def print_json(data: Any) -> None:
    typer.echo(json.dumps(data, indent=2, default=str))


def table(title: str, columns: list[str], rows: list[list[Any]]) -> None:
    t = Table(title=title, title_justify="left")
    for column in columns:
        t.add_column(column)
    for row in rows:
        t.add_row(*["" if v is None else str(v) for v in row])
    # Never cut a value short with "…": what a listing shows (a Study Instance UID) is what the
    # next command takes. A table wider than the terminal is printed at its own width, one
    # line per row, and the terminal wraps the lines (rich would shrink every column to fit,
    # cutting even those that cannot wrap).
    needed = out.measure(t, options=out.options.update_width(1 << 16)).maximum
    width = out.width
    out.width = max(width, needed)
    try:
        out.print(t)
    finally:
        out.width = width


def fields(data: dict[str, Any]) -> None:
    width = max(len(k) for k in data)
    for key, value in data.items():
        typer.echo(f"{key:<{width}}  {value}")
