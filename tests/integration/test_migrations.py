"""The schema comes only from the alembic migrations, and they agree with the models."""

from __future__ import annotations

from pathlib import Path

from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import Connection, create_engine, inspect, text

from node.db import migrate
from node.db.database import Database
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
        migrate.upgrade(engine, "0009")  # 0010 replaces the name columns (tested below)
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


def _partition_at_0009(conn: Connection) -> None:
    conn.execute(text(
        "INSERT INTO partitions (id, ae_title, port, tls_port, max_associations, description, "
        "folder, enabled, duplicate_policy, accept_any_device, auto_insert_devices, "
        "default_remote_port, match_patient_name, match_patient_id, match_patient_sex, "
        "match_patient_birth_date, match_accession_number, match_issuer_of_patient_id, "
        "track_deleted_studies, forwarding_enabled, created_at) VALUES (1, 'P', 11112, 0, 0, "
        "'', 'P', true, 'send-success', true, false, 104, true, true, true, true, true, true, "
        "false, true, '2024-01-01 00:00:00')"))


def _study_at_0009(conn: Connection, pk: int, patient_pk: int, name: str, patient_id: str,
                   sex: str = "", referring: str = "") -> None:
    conn.execute(text(
        "INSERT INTO studies (id, partition_id, patient_pk, study_instance_uid, study_date, "
        "study_time, accession_number, study_id, study_description, referring_physician_name, "
        "patient_name, patient_id, issuer_of_patient_id, patient_birth_date, patient_sex, "
        "num_series, num_instances, modalities, received_at, updated_at, accessed_at) VALUES "
        "(:pk, 1, :patient, :uid, '20240101', '', :acc, '', 'Schädel', :referring, :name, "
        ":pid, '', '', :sex, 0, 0, '', '2024-01-01', '2024-01-01', '2024-01-01')"),
        {"pk": pk, "patient": patient_pk, "uid": f"1.2.{pk}", "acc": f"acc{pk}",
         "referring": referring, "name": name, "pid": patient_id, "sex": sex})


def test_matching_migration_splits_patients_without_id_and_folds_keys(db_url: str) -> None:
    """0009 -> 0010: studies without a Patient ID that shared a patient get one each, from
    their own demographics; key columns and person-name groups are filled; and back."""
    engine = create_engine(db_url)
    try:
        migrate.upgrade(engine, "0009")
        with engine.begin() as conn:
            _partition_at_0009(conn)
            conn.execute(text(
                "INSERT INTO patients (id, partition_id, patient_id, issuer_of_patient_id, "
                "patient_name, patient_birth_date, patient_sex, name_family, name_given, "
                "name_middle, name_prefix, name_suffix) VALUES "
                "(1, 1, '', '', 'Anonymized', '', '', 'Anonymized', '', '', '', ''), "
                "(2, 1, 'pid2', '', 'Buc^Jérôme', '', 'M', 'Buc', 'Jérôme', '', '', '')"))
            if conn.dialect.name == "postgresql":  # the rows above were given their ids
                conn.execute(text("SELECT setval('patients_id_seq', 2)"))
            _study_at_0009(conn, 1, 1, "Anonymized", "")
            _study_at_0009(conn, 2, 1, "Test^S R", "", sex="O")
            _study_at_0009(conn, 3, 1, "Last Name^First Name", "")
            _study_at_0009(conn, 4, 2, "Yamada^Tarou=山田^太郎=やまだ^たろう", "pid2",
                           referring="Διονυσιος")
        migrate.upgrade(engine)
        with engine.connect() as conn:
            owners = conn.execute(text(
                "SELECT s.id, p.id, p.patient_name, p.patient_sex FROM studies s "
                "JOIN patients p ON p.id = s.patient_pk ORDER BY s.id")).all()
            keys = conn.execute(text(
                "SELECT patient_id_key FROM patients WHERE id = 2")).scalar_one()
            study_keys = conn.execute(text(
                "SELECT accession_number_key, study_description_key FROM studies "
                "WHERE id = 4")).one()
            names = conn.execute(text(
                "SELECT study_pk, keyword, group_index, family, family_key, given_key "
                "FROM person_names ORDER BY study_pk, keyword, group_index")).all()
        assert [(o[0], o[2], o[3]) for o in owners] == [
            (1, "Anonymized", ""), (2, "Test^S R", "O"), (3, "Last Name^First Name", ""),
            (4, "Buc^Jérôme", "M")]
        assert owners[0][1] == 1 and len({o[1] for o in owners}) == 4
        assert keys == "PID2"
        assert tuple(study_keys) == ("ACC4", "SCHÄDEL")
        assert [tuple(n) for n in names if n[0] == 4] == [
            (4, "PatientName", 0, "Yamada", "YAMADA", "TAROU"),
            (4, "PatientName", 1, "山田", "山田", "太郎"),
            (4, "PatientName", 2, "やまだ", "やまだ", "たろう"),
            (4, "ReferringPhysicianName", 0, "Διονυσιος", "ΔΙΟΝΥΣΙΟΣ", "")]
        # Back to 0009: patients without an ID merge again, the name columns are refilled.
        migrate.downgrade(engine, "0009")
        with engine.connect() as conn:
            merged = conn.execute(text(
                "SELECT DISTINCT patient_pk FROM studies WHERE id < 4")).scalars().all()
            family = conn.execute(text(
                "SELECT name_family FROM patients WHERE id = 2")).scalar_one()
        assert merged == [1]
        assert family == "Buc"
        migrate.upgrade(engine)
        assert migrate.current_revision(engine) == migrate.head_revision(engine)
    finally:
        engine.dispose()


def test_a_migration_keeps_rows_that_refer_to_a_recreated_table(tmp_path: Path) -> None:
    """SQLite recreates tables in batch migrations: with foreign keys enforced, as the node's
    own connections have them, dropping the old table would delete its studies by cascade."""
    database = Database(f"sqlite:///{tmp_path / 'node.db'}")
    try:
        migrate.upgrade(database.engine, "0009")
        with database.engine.begin() as conn:
            _partition_at_0009(conn)
            conn.execute(text(
                "INSERT INTO patients (id, partition_id, patient_id, issuer_of_patient_id, "
                "patient_name, patient_birth_date, patient_sex, name_family, name_given, "
                "name_middle, name_prefix, name_suffix) VALUES "
                "(1, 1, 'P1', '', 'A^B', '', '', 'A', 'B', '', '', '')"))
            _study_at_0009(conn, 1, 1, "A^B", "P1")
            assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
        migrate.upgrade(database.engine)
        with database.engine.connect() as conn:
            assert conn.execute(text("SELECT count(*) FROM studies")).scalar() == 1
            assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
    finally:
        database.dispose()
