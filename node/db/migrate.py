"""Run the alembic migrations: the only way the schema is created or changed."""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from pathlib import Path

from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy.engine import Engine

from alembic import command
from node.db import timeouts


def migrations_dir() -> Path:
    """The alembic/ folder, installed as the namespace package `pacsnode_migrations`."""
    spec = importlib.util.find_spec("pacsnode_migrations")
    locations = spec.submodule_search_locations if spec else None
    for location in locations or []:
        if (Path(location) / "env.py").is_file():
            return Path(location)
    raise RuntimeError("the pacsnode migrations (alembic/) are not installed")


def alembic_config(url: str) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(migrations_dir()))
    # ConfigParser interpolation would mangle a '%' in a password.
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return cfg


def upgrade(engine: Engine, revision: str = "head") -> None:
    run(engine, lambda cfg: command.upgrade(cfg, revision))


def downgrade(engine: Engine, revision: str) -> None:
    run(engine, lambda cfg: command.downgrade(cfg, revision))


def run(engine: Engine, step: Callable[[Config], None]) -> None:
    """Run an alembic command in one transaction on a connection of `engine`.

    On SQLite, migrations recreate tables (alembic's batch mode): with foreign keys enforced,
    dropping the old table would delete, by cascade, every row that refers to it. So, as
    SQLite's documentation says for such changes, enforcement is off for the migration (it can
    only be switched outside a transaction), the references are checked before the commit,
    and enforcement is restored as it was.
    """
    cfg = alembic_config(engine.url.render_as_string(hide_password=False))
    # A migration may rewrite large tables: neither the node's database timeout nor the
    # server's statement_timeout applies to it.
    with timeouts.unlimited(), engine.connect() as connection:
        sqlite = connection.dialect.name == "sqlite"
        driver = connection.connection.driver_connection if sqlite else None
        # SQLite's connection, when it enforces foreign keys (off while the migration runs).
        enforcing = (driver if driver is not None
                     and driver.execute("PRAGMA foreign_keys").fetchone()[0] else None)
        if enforcing is not None:
            enforcing.execute("PRAGMA foreign_keys=OFF")
        try:
            with connection.begin():
                if connection.dialect.name == "postgresql":
                    connection.exec_driver_sql("SET LOCAL statement_timeout = 0")
                    connection.exec_driver_sql("SET LOCAL lock_timeout = 0")
                cfg.attributes["connection"] = connection
                step(cfg)
                if sqlite:
                    broken = connection.exec_driver_sql("PRAGMA foreign_key_check").fetchall()
                    if broken:
                        raise RuntimeError(f"the migration left broken references: {broken}")
        finally:
            if enforcing is not None:
                enforcing.execute("PRAGMA foreign_keys=ON")


def current_revision(engine: Engine) -> str | None:
    with engine.connect() as connection:
        return MigrationContext.configure(connection).get_current_revision()


def head_revision(engine: Engine) -> str | None:
    cfg = alembic_config(engine.url.render_as_string(hide_password=False))
    return ScriptDirectory.from_config(cfg).get_current_head()
