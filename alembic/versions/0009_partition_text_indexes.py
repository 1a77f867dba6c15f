"""Case-insensitive text indexes led by the partition: (partition_id, upper(column))

A query filters on its partition and on upper(column). Without statistics SQLite's planner
prefers the partition's equality over a range on the single-column upper() index, so a
name wildcard walked the whole partition (15 ms on 100,000 patients, against 0.1 ms with
this index). The single-column indexes stay: a query whose partition filter is on the study
still matches patient keys through them.

Revision ID: 0009
Revises: 0008
Create Date: 2026-11-23 08:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa

from alembic import op

revision: str = "0009"
down_revision: str | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

INDEXES = (
    ("ix_patients_partition_upper_patient_id", "patients", "patient_id"),
    ("ix_patients_partition_upper_name_family", "patients", "name_family"),
    ("ix_studies_partition_upper_accession_number", "studies", "accession_number"),
)


def upgrade() -> None:
    for name, table, column in INDEXES:
        op.create_index(
            name,
            table,
            [sa.text("partition_id"), sa.func.upper(sa.text(column)).label("u")],
            postgresql_ops={"u": "text_pattern_ops"},
        )


def downgrade() -> None:
    for name, table, _column in INDEXES:
        op.drop_index(name, table_name=table)
