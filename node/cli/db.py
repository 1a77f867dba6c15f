"""`pacsnode db`: the schema, changed only by the alembic migrations."""

from __future__ import annotations

import typer

from node.cli.common import ConfigOption, database
from node.db import migrate

app = typer.Typer(help="Database schema (alembic migrations).", no_args_is_help=True)


@app.command()
def upgrade(config: ConfigOption = None) -> None:
    """Migrate the database to the newest schema (serve does this itself at start)."""
    with database(config) as (settings, db):
        typer.echo(f"{settings.database_url}: schema at revision "
                   f"{migrate.current_revision(db.engine)}")


@app.command()
def current(config: ConfigOption = None) -> None:
    """Print the schema revision of the database and the newest one this version knows."""
    with database(config) as (_settings, db):
        typer.echo(f"current {migrate.current_revision(db.engine)}, "
                   f"head {migrate.head_revision(db.engine)}")
