"""The schema comes only from the alembic migrations, and they agree with the models."""

from __future__ import annotations

from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import create_engine, inspect

from node.db import migrate
from node.db.models import Base


def test_migrations_match_models(db_url: str) -> None:
    engine = create_engine(db_url)
    try:
        migrate.upgrade(engine)
        with engine.connect() as conn:
            context = MigrationContext.configure(conn, opts={"compare_type": True})
            assert compare_metadata(context, Base.metadata) == []
        assert migrate.current_revision(engine) == migrate.head_revision(engine)
    finally:
        engine.dispose()


def test_upgrade_is_idempotent_and_downgrade_empties(db_url: str) -> None:
    engine = create_engine(db_url)
    try:
        migrate.upgrade(engine)
        migrate.upgrade(engine)  # a second start changes nothing
        cfg = migrate.alembic_config(engine.url.render_as_string(hide_password=False))
        from alembic import command

        with engine.begin() as conn:
            cfg.attributes["connection"] = conn
            command.downgrade(cfg, "base")
        assert set(inspect(engine).get_table_names()) <= {"alembic_version"}
        migrate.upgrade(engine)
        assert {"partitions", "devices", "instances"} <= set(inspect(engine).get_table_names())
    finally:
        engine.dispose()
