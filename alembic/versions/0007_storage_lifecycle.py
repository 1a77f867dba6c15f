"""storage lifecycle: accessed_at, deleted studies, activity log

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-22 22:20:40
"""

from collections.abc import Sequence

import sqlalchemy as sa

from alembic import op

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table('activity',
    sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.Column('at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('kind', sa.String(length=16), nullable=False),
    sa.Column('partition', sa.String(length=16), nullable=False),
    sa.Column('calling_ae', sa.String(length=16), nullable=False),
    sa.Column('called_ae', sa.String(length=16), nullable=False),
    sa.Column('peer', sa.String(length=128), nullable=False),
    sa.Column('study_instance_uid', sa.String(length=64), nullable=False),
    sa.Column('count', sa.Integer(), nullable=False),
    sa.Column('failed', sa.Integer(), nullable=False),
    sa.Column('outcome', sa.String(length=16), nullable=False),
    sa.Column('detail', sa.Text(), nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_activity'))
    )
    with op.batch_alter_table('activity', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_activity_at'), ['at'], unique=False)
        batch_op.create_index('ix_activity_kind_at', ['kind', 'at'], unique=False)
        batch_op.create_index(batch_op.f('ix_activity_study_instance_uid'),
                              ['study_instance_uid'], unique=False)

    op.create_table('deleted_studies',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('partition_id', sa.Integer(), nullable=False),
    sa.Column('study_instance_uid', sa.String(length=64), nullable=False),
    sa.Column('patient_id', sa.String(length=64), nullable=False),
    sa.Column('patient_name', sa.String(length=324), nullable=False),
    sa.Column('study_date', sa.String(length=8), nullable=False),
    sa.Column('accession_number', sa.String(length=16), nullable=False),
    sa.Column('study_description', sa.String(length=64), nullable=False),
    sa.Column('modalities', sa.String(length=256), nullable=False),
    sa.Column('num_instances', sa.Integer(), nullable=False),
    sa.Column('size', sa.BigInteger(), nullable=False),
    sa.Column('folder', sa.String(length=512), nullable=False),
    sa.Column('reason', sa.Text(), nullable=False),
    sa.Column('deleted_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['partition_id'], ['partitions.id'],
                            name=op.f('fk_deleted_studies_partition_id_partitions'),
                            ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_deleted_studies'))
    )
    with op.batch_alter_table('deleted_studies', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_deleted_studies_partition_id'), ['partition_id'],
                              unique=False)
        batch_op.create_index(batch_op.f('ix_deleted_studies_study_instance_uid'),
                              ['study_instance_uid'], unique=False)

    # Plain ALTER TABLE, not a batch: SQLite's table copy would drop the expression index on
    # upper(accession_number), which it cannot reflect. Existing studies count as accessed when
    # they were received.
    op.add_column('studies', sa.Column('accessed_at', sa.DateTime(timezone=True), nullable=False,
                                       server_default=sa.text("'1970-01-01 00:00:00+00:00'")))
    op.execute("UPDATE studies SET accessed_at = received_at")
    op.create_index(op.f('ix_studies_accessed_at'), 'studies', ['accessed_at'], unique=False)
    op.create_index(op.f('ix_studies_received_at'), 'studies', ['received_at'], unique=False)


def downgrade() -> None:
    op.drop_index(op.f('ix_studies_received_at'), table_name='studies')
    op.drop_index(op.f('ix_studies_accessed_at'), table_name='studies')
    with op.batch_alter_table('studies', schema=None) as batch_op:
        batch_op.drop_column('accessed_at')
    if op.get_bind().dialect.name == "sqlite":
        # The batch copy lost the expression index 0003 made; give it back.
        op.execute("CREATE INDEX IF NOT EXISTS ix_studies_upper_accession_number"
                   " ON studies (upper(accession_number))")

    with op.batch_alter_table('deleted_studies', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_deleted_studies_study_instance_uid'))
        batch_op.drop_index(batch_op.f('ix_deleted_studies_partition_id'))

    op.drop_table('deleted_studies')
    with op.batch_alter_table('activity', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_activity_study_instance_uid'))
        batch_op.drop_index('ix_activity_kind_at')
        batch_op.drop_index(batch_op.f('ix_activity_at'))

    op.drop_table('activity')
