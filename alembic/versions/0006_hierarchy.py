"""hierarchy: replicated devices, change log, neighbours, directory

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-22 20:11:10
"""

from collections.abc import Sequence

import sqlalchemy as sa

from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table('device_changes',
    sa.Column('seq', sa.BigInteger(), autoincrement=False, nullable=False),
    sa.Column('name', sa.String(length=64), nullable=False),
    sa.Column('origin_node', sa.String(length=64), nullable=False),
    sa.Column('version', sa.String(length=96), nullable=False),
    sa.Column('deleted', sa.Boolean(), nullable=False),
    sa.Column('payload', sa.Text(), nullable=False),
    sa.Column('received_from', sa.String(length=64), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('seq', name=op.f('pk_device_changes'))
    )
    op.create_table('directory_nodes',
    sa.Column('node_id', sa.String(length=64), nullable=False),
    sa.Column('parent_id', sa.String(length=64), nullable=False),
    sa.Column('site', sa.String(length=256), nullable=False),
    sa.Column('control_address', sa.String(length=255), nullable=False),
    sa.Column('dicom_host', sa.String(length=255), nullable=False),
    sa.Column('role', sa.String(length=16), nullable=False),
    sa.Column('version', sa.String(length=32), nullable=False),
    sa.Column('reachable', sa.Boolean(), nullable=False),
    sa.Column('error', sa.Text(), nullable=False),
    sa.Column('last_seen', sa.DateTime(timezone=True), nullable=True),
    sa.Column('collected_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('root_id', sa.String(length=64), nullable=False),
    sa.PrimaryKeyConstraint('node_id', name=op.f('pk_directory_nodes'))
    )
    op.create_table('neighbours',
    sa.Column('node_id', sa.String(length=64), nullable=False),
    sa.Column('role', sa.String(length=8), nullable=False),
    sa.Column('control_address', sa.String(length=255), nullable=False),
    sa.Column('site', sa.String(length=256), nullable=False),
    sa.Column('info', sa.Text(), nullable=False),
    sa.Column('heartbeat_seconds', sa.Float(), nullable=False),
    sa.Column('cursor', sa.BigInteger(), nullable=False),
    sa.Column('last_seen', sa.DateTime(timezone=True), nullable=True),
    sa.Column('reachable', sa.Boolean(), nullable=False),
    sa.Column('last_error', sa.Text(), nullable=False),
    sa.Column('queue_depth', sa.BigInteger(), nullable=False),
    sa.Column('registered_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('node_id', name=op.f('pk_neighbours'))
    )
    op.create_table('node_meta',
    sa.Column('key', sa.String(length=64), nullable=False),
    sa.Column('value', sa.Text(), nullable=False),
    sa.PrimaryKeyConstraint('key', name=op.f('pk_node_meta'))
    )
    # The change-log counter exists from the start, so the first two writers on PostgreSQL
    # both find the row to lock instead of racing to insert it.
    op.execute("INSERT INTO node_meta (key, value) VALUES ('change_seq', '0')")
    op.create_table('replicated_devices',
    sa.Column('name', sa.String(length=64), nullable=False),
    sa.Column('origin_node', sa.String(length=64), nullable=False),
    sa.Column('version', sa.String(length=96), nullable=False),
    sa.Column('deleted', sa.Boolean(), nullable=False),
    sa.Column('payload', sa.Text(), nullable=False),
    sa.Column('updated_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('name', name=op.f('pk_replicated_devices'))
    )
    with op.batch_alter_table('replicated_devices', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_replicated_devices_version'), ['version'],
                              unique=False)

    op.create_table('directory_partitions',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('node_id', sa.String(length=64), nullable=False),
    sa.Column('ae_title', sa.String(length=16), nullable=False),
    sa.Column('port', sa.Integer(), nullable=False),
    sa.Column('tls_port', sa.Integer(), nullable=False),
    sa.Column('enabled', sa.Boolean(), nullable=False),
    sa.ForeignKeyConstraint(['node_id'], ['directory_nodes.node_id'],
                            name=op.f('fk_directory_partitions_node_id_directory_nodes'),
                            ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_directory_partitions')),
    sa.UniqueConstraint('node_id', 'ae_title',
                        name=op.f('uq_directory_partitions_node_id_ae_title'))
    )
    with op.batch_alter_table('directory_partitions', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_directory_partitions_ae_title'), ['ae_title'],
                              unique=False)

    with op.batch_alter_table('devices', schema=None) as batch_op:
        # Existing devices are local ones an administrator added.
        batch_op.add_column(sa.Column('scope', sa.String(length=16), nullable=False,
                                      server_default=sa.text("'local'")))
        batch_op.add_column(sa.Column('origin_node', sa.String(length=64), nullable=False,
                                      server_default=sa.text("''")))
        batch_op.add_column(sa.Column('neighbour_id', sa.String(length=64), nullable=False,
                                      server_default=sa.text("''")))
        batch_op.create_index(batch_op.f('ix_devices_neighbour_id'), ['neighbour_id'],
                              unique=False)



def downgrade() -> None:
    with op.batch_alter_table('devices', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_devices_neighbour_id'))
        batch_op.drop_column('neighbour_id')
        batch_op.drop_column('origin_node')
        batch_op.drop_column('scope')

    with op.batch_alter_table('directory_partitions', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_directory_partitions_ae_title'))

    op.drop_table('directory_partitions')
    with op.batch_alter_table('replicated_devices', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_replicated_devices_version'))

    op.drop_table('replicated_devices')
    op.drop_table('node_meta')
    op.drop_table('neighbours')
    op.drop_table('directory_nodes')
    op.drop_table('device_changes')
