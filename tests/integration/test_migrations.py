"""The schema comes only from the alembic migrations, and they agree with the models."""

from __future__ import annotations

from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import create_engine, inspect, text

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


def test_query_retrieve_migration_backfills_existing_rows(db_url: str) -> None:
    """0001 -> 0002 on a database with studies: counters, modalities and name components."""
    engine = create_engine(db_url)
    try:
        migrate.upgrade(engine, "0001")
        now = "2024-01-01 00:00:00"
        with engine.begin() as conn:
            conn.execute(text(
                "INSERT INTO partitions (id, ae_title, port, description, folder, enabled, "
                "duplicate_policy, accept_any_device, auto_insert_devices, default_remote_port, "
                "match_patient_name, match_patient_id, match_patient_sex, "
                "match_patient_birth_date, match_accession_number, match_issuer_of_patient_id, "
                "track_deleted_studies, created_at) VALUES (1, 'P', 11112, '', 'P', true, "
                "'send-success', true, false, 104, true, true, true, true, true, true, false, "
                ":now)"), {"now": now})
            conn.execute(text(
                "INSERT INTO patients (id, partition_id, patient_id, issuer_of_patient_id, "
                "patient_name, patient_birth_date, patient_sex) VALUES "
                "(1, 1, 'PID1', '', 'SMITH^JOHN^Q', '', 'M')"))
            conn.execute(text(
                "INSERT INTO studies (id, partition_id, patient_pk, study_instance_uid, "
                "study_date, study_time, accession_number, study_id, study_description, "
                "referring_physician_name, patient_name, patient_id, issuer_of_patient_id, "
                "patient_birth_date, patient_sex, received_at, updated_at) VALUES (1, 1, 1, "
                "'1.2.3', '', '', '', '', '', '', '', '', '', '', '', :now, :now)"),
                {"now": now})
            for pk, modality, count in ((1, "CT", 2), (2, "SR", 1)):
                conn.execute(text(
                    "INSERT INTO series (id, study_pk, series_instance_uid, modality, "
                    "series_number, series_description, body_part_examined, series_date, "
                    "series_time) VALUES (:pk, 1, :uid, :m, '', '', '', '', '')"),
                    {"pk": pk, "uid": f"1.2.3.{pk}", "m": modality})
                for n in range(count):
                    conn.execute(text(
                        "INSERT INTO instances (partition_id, series_pk, sop_instance_uid, "
                        "sop_class_uid, instance_number, transfer_syntax_uid, path, size, "
                        "calling_ae_title, received_at) VALUES (1, :pk, :uid, '', '', '', '', "
                        "0, '', :now)"), {"pk": pk, "uid": f"1.2.3.{pk}.{n}", "now": now})
        migrate.upgrade(engine)
        with engine.connect() as conn:
            study = conn.execute(text(
                "SELECT num_series, num_instances, modalities FROM studies")).one()
            series = dict(conn.execute(text("SELECT modality, num_instances FROM series")).all())
            name = conn.execute(text(
                "SELECT name_family, name_given, name_middle FROM patients")).one()
        assert tuple(study) == (2, 3, "\\CT\\SR\\")
        assert series == {"CT": 2, "SR": 1}
        assert tuple(name) == ("SMITH", "JOHN", "Q")
    finally:
        engine.dispose()
