"""`pacsnode db`: the schema, changed only by the alembic migrations."""

from __future__ import annotations

import typer
from sqlalchemy.exc import SQLAlchemyError

from node.cli.common import ConfigOption, database, database_error, fail, load_settings
from node.db import migrate
from node.db.database import Database
from node.redact import redact_url

app = typer.Typer(help="Database schema (alembic migrations).", no_args_is_help=True)


@app.command()
def upgrade(config: ConfigOption = None) -> None:
    """Migrate the database to the newest schema (serve does this itself at start)."""
    with database(config) as (settings, db):
        typer.echo(f"{redact_url(settings.database_url)}: schema at revision "
                   f"{migrate.current_revision(db.engine)}")


@app.command()
def current(config: ConfigOption = None) -> None:
    """Print the database's schema revision and the newest one this version knows (no change)."""
    settings = load_settings(config)
    db: Database | None = None
    try:
        db = Database(settings.database_url)
        typer.echo(f"current {migrate.current_revision(db.engine) or '(empty)'}, "
                   f"head {migrate.head_revision(db.engine)}")
    except SQLAlchemyError as exc:
        fail(database_error(settings, exc))
    finally:
        if db is not None:
            db.dispose()
