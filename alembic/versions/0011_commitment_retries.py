"""Storage commitment asked again: when each delivered job is next asked, and how often it was

A forward job delivered to a device that asks for storage commitment is watched until the
device commits it: `commitment_due_at` is when the node asks (again): after a request that
failed (a backoff), or when the report did not come in time. Jobs an older version left
`failed` or `requested` for good, or delivered before commitment was switched on, are due
at once.

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-14 12:00:00
"""

from collections.abc import Sequence
from datetime import UTC, datetime

import sqlalchemy as sa

from alembic import op

revision: str = "0011"
down_revision: str | None = "0010"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

INDEX = "ix_forward_jobs_commitment_due_at"


def upgrade() -> None:
    # Plain ALTER TABLE ... ADD COLUMN (no batch mode): SQLite need not copy the queue.
    op.add_column("forward_jobs", sa.Column("commitment_attempts", sa.Integer(),
                                            nullable=False, server_default=sa.text("0")))
    op.add_column("forward_jobs", sa.Column("commitment_due_at", sa.DateTime(timezone=True),
                                            nullable=True))
    op.create_index(INDEX, "forward_jobs", ["commitment_due_at"], unique=False)
    jobs = sa.table("forward_jobs", sa.column("state", sa.String()),
                    sa.column("commitment", sa.String()), sa.column("device_id", sa.Integer()),
                    sa.column("commitment_due_at", sa.DateTime(timezone=True)))
    devices = sa.table("devices", sa.column("id", sa.Integer()),
                       sa.column("storage_commitment", sa.Boolean()))
    op.execute(jobs.update().where(
        jobs.c.state == "done", jobs.c.commitment.notin_(("committed", "unsupported")),
        jobs.c.device_id.in_(sa.select(devices.c.id).where(devices.c.storage_commitment)))
        .values(commitment_due_at=datetime.now(UTC)))


def downgrade() -> None:
    op.drop_index(INDEX, table_name="forward_jobs")
    with op.batch_alter_table("forward_jobs") as batch:
        batch.drop_column("commitment_due_at")
        batch.drop_column("commitment_attempts")
