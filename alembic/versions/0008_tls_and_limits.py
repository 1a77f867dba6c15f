"""DICOM TLS ports of partitions; association limits per partition and per device

Revision ID: 0008
Revises: 0007
Create Date: 2026-11-22 10:30:00
"""

from collections.abc import Sequence

import sqlalchemy as sa

from alembic import op

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # Plain ADD COLUMN (no batch copy on SQLite): keeps the expression indexes of 0003.
    op.add_column('partitions', sa.Column('tls_port', sa.Integer(), nullable=False,
                                          server_default='0'))
    op.add_column('partitions', sa.Column('max_associations', sa.Integer(), nullable=False,
                                          server_default='0'))
    op.add_column('devices', sa.Column('max_inbound_associations', sa.Integer(),
                                       nullable=False, server_default='0'))


def downgrade() -> None:
    with op.batch_alter_table('devices', schema=None) as batch_op:
        batch_op.drop_column('max_inbound_associations')
    with op.batch_alter_table('partitions', schema=None) as batch_op:
        batch_op.drop_column('max_associations')
        batch_op.drop_column('tls_port')
