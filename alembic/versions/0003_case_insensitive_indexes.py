"""Indexes for case-insensitive matching: upper(patient_id), upper(name_family), upper(accession)

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-22 19:05:00
"""

from collections.abc import Sequence

import sqlalchemy as sa

from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

INDEXES = (
    ("ix_patients_upper_patient_id", "patients", "patient_id"),
    ("ix_patients_upper_name_family", "patients", "name_family"),
    ("ix_studies_upper_accession_number", "studies", "accession_number"),
)


def upgrade() -> None:
    for name, table, column in INDEXES:
        op.create_index(
            name,
            table,
            [sa.func.upper(sa.text(column)).label("u")],
            postgresql_ops={"u": "text_pattern_ops"},
        )


def downgrade() -> None:
    for name, table, _column in INDEXES:
        op.drop_index(name, table_name=table)
