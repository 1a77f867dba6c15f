"""Matching that holds for real-world data: folded keys, person-name groups, patient identity

- Case-insensitive matching compares key columns (`<column>_key`) the node computes itself
  (node.dicomtext.fold) instead of the database's upper(), which folds ASCII only on SQLite
  and follows the locale on PostgreSQL. The upper() expression indexes become plain indexes
  on the key columns.
- Person names are matched component group by component group: `person_names` holds each
  group of each study's Patient's Name and Referring Physician's Name; the name columns of
  `patients` go.
- A patient is its Patient ID and issuer: studies without a Patient ID are no longer merged
  into one patient (the unique constraint becomes a unique index on patients that have an
  ID, and patients merged that way are split, one per study, from each study's own copy of
  the demographics).
- Index text is kept as received: columns that cut values (dates at 8 characters, CS and SH
  at 16, LO at 64) hold 256 characters.

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-06 12:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa

from alembic import op
from node.db.indexer import person_name_rows
from node.dicomtext import fold

revision: str = "0010"
down_revision: str | None = "0009"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

WIDE = 256
PN = 324
OLD_UPPER_INDEXES = (
    ("ix_patients_upper_patient_id", "patients", "patient_id", False),
    ("ix_patients_upper_name_family", "patients", "name_family", False),
    ("ix_patients_partition_upper_patient_id", "patients", "patient_id", True),
    ("ix_patients_partition_upper_name_family", "patients", "name_family", True),
    ("ix_studies_upper_accession_number", "studies", "accession_number", False),
    ("ix_studies_partition_upper_accession_number", "studies", "accession_number", True),
)
NAME_COLUMNS = ("name_family", "name_given", "name_middle", "name_prefix", "name_suffix")
# Table -> (column, width before this revision), for the columns widened to WIDE.
WIDENED = {
    "patients": (("patient_id", 64), ("issuer_of_patient_id", 64), ("patient_birth_date", 8),
                 ("patient_sex", 16)),
    "studies": (("study_date", 8), ("study_time", 16), ("accession_number", 16),
                ("study_id", 16), ("study_description", 64), ("patient_id", 64),
                ("issuer_of_patient_id", 64), ("patient_birth_date", 8), ("patient_sex", 16)),
    "series": (("modality", 16), ("series_number", 12), ("series_description", 64),
               ("body_part_examined", 16), ("series_date", 8), ("series_time", 16)),
    "deleted_studies": (("patient_id", 64), ("study_date", 8), ("accession_number", 16),
                        ("study_description", 64)),
}
KEYED = {
    "patients": ("patient_id", "issuer_of_patient_id", "patient_sex"),
    "studies": ("accession_number", "study_id", "study_description", "patient_sex"),
    "series": ("modality", "series_description", "body_part_examined"),
}
COMPONENTS = ("family", "given", "middle", "prefix", "suffix")
PATIENT_IDENTITY = "ix_patients_identity"
OLD_PATIENT_UNIQUE = "uq_patients_partition_id_patient_id_issuer_of_patient_id"


def _pattern_ops(column: str) -> dict[str, str]:
    return {column: "text_pattern_ops"}


def upgrade() -> None:
    # Batch mode (SQLite recreates the tables) cannot reflect expression indexes: dropped first.
    for name, table, _column, _partition in OLD_UPPER_INDEXES:
        op.drop_index(name, table_name=table)
    empty = sa.text("''")
    with op.batch_alter_table("patients") as batch:
        batch.drop_index("ix_patients_name_family")
        for column in NAME_COLUMNS:
            batch.drop_column(column)
        batch.drop_constraint(OLD_PATIENT_UNIQUE, type_="unique")
        _widen(batch, "patients")
        _add_keys(batch, "patients", empty)
    with op.batch_alter_table("studies") as batch:
        _widen(batch, "studies")
        _add_keys(batch, "studies", empty)
    with op.batch_alter_table("series") as batch:
        batch.drop_index("ix_series_modality")
        _widen(batch, "series")
        _add_keys(batch, "series", empty)
    with op.batch_alter_table("deleted_studies") as batch:
        _widen(batch, "deleted_studies")

    op.create_table(
        "person_names",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("study_pk", sa.Integer(), nullable=False),
        sa.Column("partition_id", sa.Integer(), nullable=False),
        sa.Column("keyword", sa.String(length=32), nullable=False),
        sa.Column("group_index", sa.Integer(), nullable=False),
        *(sa.Column(name + suffix, sa.String(length=PN), nullable=False)
          for name in COMPONENTS for suffix in ("", "_key")),
        sa.ForeignKeyConstraint(["study_pk"], ["studies.id"],
                                name=op.f("fk_person_names_study_pk_studies"),
                                ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_person_names")),
    )
    op.create_index("ix_person_names_study_pk", "person_names", ["study_pk"])

    _split_patients_without_id()
    _backfill_keys()
    _backfill_names()
    # After the split: patients without an ID may now repeat (partition, '', issuer).
    op.create_index(PATIENT_IDENTITY, "patients",
                    ["partition_id", "patient_id", "issuer_of_patient_id"], unique=True,
                    sqlite_where=sa.text("patient_id <> ''"),
                    postgresql_where=sa.text("patient_id <> ''"))
    op.create_index("ix_patients_partition_id_patient_id_key", "patients",
                    ["partition_id", "patient_id_key"],
                    postgresql_ops=_pattern_ops("patient_id_key"))
    op.create_index("ix_studies_partition_id_accession_number_key", "studies",
                    ["partition_id", "accession_number_key"],
                    postgresql_ops=_pattern_ops("accession_number_key"))
    op.create_index("ix_person_names_family_key", "person_names",
                    ["partition_id", "keyword", "family_key"],
                    postgresql_ops=_pattern_ops("family_key"))


def _widen(batch: object, table: str) -> None:
    for column, width in WIDENED[table]:
        batch.alter_column(column, existing_type=sa.String(length=width),  # type: ignore[attr-defined]
                           type_=sa.String(length=WIDE), existing_nullable=False)


def _add_keys(batch: object, table: str, empty: sa.TextClause) -> None:
    for column in KEYED[table]:
        batch.add_column(sa.Column(column + "_key", sa.String(length=WIDE),  # type: ignore[attr-defined]
                                   nullable=False, server_default=empty))


def _split_patients_without_id() -> None:
    """Each study without a Patient ID gets a patient of its own, made from the demographics
    the study was received with (the patient it shared keeps its first study)."""
    conn = op.get_bind()
    studies = conn.execute(sa.text(
        "SELECT s.id, s.partition_id, s.patient_pk, s.issuer_of_patient_id, s.patient_name, "
        "s.patient_birth_date, s.patient_sex FROM studies s JOIN patients p "
        "ON p.id = s.patient_pk WHERE p.patient_id = '' ORDER BY s.patient_pk, s.id")).all()
    seen: set[int] = set()
    for study_pk, partition_id, patient_pk, issuer, name, birth_date, sex in studies:
        if patient_pk not in seen:
            seen.add(patient_pk)
            continue
        new_pk = conn.execute(sa.text(
            "INSERT INTO patients (partition_id, patient_id, issuer_of_patient_id, "
            "patient_name, patient_birth_date, patient_sex) VALUES (:partition, '', :issuer, "
            ":name, :birth_date, :sex) RETURNING id"),
            {"partition": partition_id, "issuer": issuer, "name": name,
             "birth_date": birth_date, "sex": sex}).scalar_one()
        conn.execute(sa.text("UPDATE studies SET patient_pk = :new WHERE id = :study"),
                     {"new": new_pk, "study": study_pk})


def _backfill_keys() -> None:
    conn = op.get_bind()
    for table, columns in KEYED.items():
        rows = conn.execute(sa.text(f"SELECT id, {', '.join(columns)} FROM {table}")).all()
        if not rows:
            continue
        assignments = ", ".join(f"{column}_key = :{column}" for column in columns)
        conn.execute(sa.text(f"UPDATE {table} SET {assignments} WHERE id = :id"),
                     [{"id": row[0], **{column: fold(value or "")
                                        for column, value in zip(columns, row[1:], strict=True)}}
                      for row in rows])


def _backfill_names() -> None:
    conn = op.get_bind()
    rows = []
    for study_pk, partition_id, patient_name, referring in conn.execute(sa.text(
            "SELECT id, partition_id, patient_name, referring_physician_name FROM studies")):
        for keyword, value in (("PatientName", patient_name),
                               ("ReferringPhysicianName", referring)):
            for row in person_name_rows(keyword, value or ""):
                rows.append({"study_pk": study_pk, "partition_id": partition_id, **row,
                             **{f"{c}_key": fold(str(row[c])) for c in COMPONENTS}})
    if rows:
        columns = ["study_pk", "partition_id", "keyword", "group_index",
                   *(name + suffix for name in COMPONENTS for suffix in ("", "_key"))]
        conn.execute(sa.text(f"INSERT INTO person_names ({', '.join(columns)}) VALUES "
                             f"({', '.join(':' + c for c in columns)})"), rows)


def downgrade() -> None:
    op.drop_index("ix_person_names_family_key", table_name="person_names")
    op.drop_index("ix_person_names_study_pk", table_name="person_names")
    op.drop_table("person_names")
    op.drop_index("ix_studies_partition_id_accession_number_key", table_name="studies")
    op.drop_index("ix_patients_partition_id_patient_id_key", table_name="patients")
    op.drop_index(PATIENT_IDENTITY, table_name="patients")
    _merge_patients_without_id()
    empty = sa.text("''")
    for table in ("deleted_studies", "series", "studies", "patients"):
        with op.batch_alter_table(table) as batch:
            for column in KEYED.get(table, ()):
                batch.drop_column(column + "_key")
            for column, width in WIDENED[table]:
                batch.alter_column(column, existing_type=sa.String(length=WIDE),
                                   type_=sa.String(length=width), existing_nullable=False,
                                   postgresql_using=f"substr({column}, 1, {width})")
            if table == "series":
                batch.create_index("ix_series_modality", ["modality"])
            if table == "patients":
                batch.create_unique_constraint(
                    OLD_PATIENT_UNIQUE, ["partition_id", "patient_id", "issuer_of_patient_id"])
                for column in NAME_COLUMNS:
                    batch.add_column(sa.Column(column, sa.String(length=64), nullable=False,
                                               server_default=empty))
                batch.create_index("ix_patients_name_family", ["name_family"])
    conn = op.get_bind()
    names = conn.execute(sa.text("SELECT id, patient_name FROM patients")).all()
    if names:
        conn.execute(sa.text(
            "UPDATE patients SET name_family = :f, name_given = :g, name_middle = :m, "
            "name_prefix = :p, name_suffix = :s WHERE id = :id"),
            [dict(zip(("f", "g", "m", "p", "s"),
                      [part[:64] for part in ((name or "").split("=")[0].split("^")
                                              + [""] * 5)[:5]], strict=True), id=pk)
             for pk, name in names])
    for name, table, column, partition in OLD_UPPER_INDEXES:
        op.create_index(name, table,
                        [*([sa.text("partition_id")] if partition else []),
                         sa.func.upper(sa.text(column)).label("u")],
                        postgresql_ops={"u": "text_pattern_ops"})


def _merge_patients_without_id() -> None:
    """Back to one patient per (partition, '', issuer), as before this revision."""
    conn = op.get_bind()
    keep: dict[tuple[int, str], int] = {}
    for pk, partition_id, issuer in conn.execute(sa.text(
            "SELECT id, partition_id, issuer_of_patient_id FROM patients "
            "WHERE patient_id = '' ORDER BY id")).all():
        first = keep.setdefault((partition_id, issuer), pk)
        if first != pk:
            conn.execute(sa.text("UPDATE studies SET patient_pk = :first WHERE patient_pk = :pk"),
                         {"first": first, "pk": pk})
            conn.execute(sa.text("DELETE FROM patients WHERE id = :pk"), {"pk": pk})
