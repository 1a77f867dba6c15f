"""Storage commitment: per device, and per forward job what the destination committed

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-22 19:15:00
"""

from collections.abc import Sequence

import sqlalchemy as sa

from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("devices", schema=None) as batch_op:
        batch_op.add_column(sa.Column("storage_commitment", sa.Boolean(), nullable=False,
                                      server_default=sa.false()))
    with op.batch_alter_table("forward_jobs", schema=None) as batch_op:
        batch_op.add_column(sa.Column("commitment", sa.String(length=16), nullable=False,
                                      server_default=sa.text("''")))
        batch_op.add_column(sa.Column("commitment_uid", sa.String(length=64), nullable=False,
                                      server_default=sa.text("''")))
        batch_op.add_column(sa.Column("committed_at", sa.DateTime(timezone=True),
                                      nullable=True))
        batch_op.create_index(batch_op.f("ix_forward_jobs_commitment_uid"), ["commitment_uid"],
                              unique=False)


def downgrade() -> None:
    with op.batch_alter_table("forward_jobs", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_forward_jobs_commitment_uid"))
        batch_op.drop_column("committed_at")
        batch_op.drop_column("commitment_uid")
        batch_op.drop_column("commitment")
    with op.batch_alter_table("devices", schema=None) as batch_op:
        batch_op.drop_column("storage_commitment")
