"""Alembic environment: runs against the connection the node hands over, or the configured URL."""

from __future__ import annotations

import warnings

from sqlalchemy import create_engine
from sqlalchemy.exc import SAWarning

from alembic import context
from node.db.models import Base

# SQLite batch migrations reflect related tables; SQLAlchemy cannot reflect expression indexes
# (the upper() ones of revision 0003) and says so, but batch mode never recreates those tables.
warnings.filterwarnings("ignore", "Skipped unsupported reflection of expression-based index",
                        SAWarning)

config = context.config
target_metadata = Base.metadata


def run() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        _run_with(connection)
        return
    engine = create_engine(config.get_main_option("sqlalchemy.url") or "")
    with engine.begin() as conn:
        _run_with(conn)
    engine.dispose()


def _run_with(connection: object) -> None:
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        render_as_batch=connection.dialect.name == "sqlite",  # type: ignore[attr-defined]
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()


run()
