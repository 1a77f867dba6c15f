"""`pacsnode db`: the schema, changed only by the alembic migrations."""

from __future__ import annotations

import typer
from sqlalchemy.exc import SQLAlchemyError

from node.cli.common import ConfigOption, database, fail, load_settings
from node.db import migrate
from node.db.database import Database

app = typer.Typer(help="Database schema (alembic migrations).", no_args_is_help=True)


@app.command()
def upgrade(config: ConfigOption = None) -> None:
    """Migrate the database to the newest schema (serve does this itself at start)."""
    with database(config) as (settings, db):
        typer.echo(f"{settings.database_url}: schema at revision "
                   f"{migrate.current_revision(db.engine)}")


@app.command()
def current(config: ConfigOption = None) -> None:
    """Print the database's schema revision and the newest one this version knows (no change)."""
    settings = load_settings(config)
    db = Database(settings.database_url)
    try:
        typer.echo(f"current {migrate.current_revision(db.engine) or '(empty)'}, "
                   f"head {migrate.head_revision(db.engine)}")
    except SQLAlchemyError as exc:
        fail(f"cannot open the database {settings.database_url}: {exc}")
    finally:
        db.dispose()
