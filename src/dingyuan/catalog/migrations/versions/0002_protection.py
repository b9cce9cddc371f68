"""Protection: volumes name their source and policy; policies carry transfer settings; backup jobs
belong to a volume and report progress; one-time enrollment tokens; hosts remember their agent.

Revision ID: 0002
Revises: 0001
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision: str | None = "0001"
branch_labels: str | None = None
depends_on: str | None = None

UTC_DATETIME = sa.DateTime(timezone=True)


def upgrade() -> None:
    with op.batch_alter_table("hosts") as b:
        b.add_column(sa.Column("last_seen", UTC_DATETIME, nullable=True))
        b.add_column(sa.Column("agent_version", sa.String(length=64), nullable=True))
    with op.batch_alter_table("policies") as b:
        b.add_column(sa.Column("bandwidth_limit", sa.BigInteger(), nullable=True))
        b.add_column(sa.Column("consistency", sa.String(length=32), nullable=False, server_default="crash"))
        b.add_column(sa.Column("quiesce", sa.String(length=255), nullable=True))
    with op.batch_alter_table("policies") as b:
        b.alter_column("consistency", server_default=None)
    with op.batch_alter_table("volumes") as b:
        b.add_column(sa.Column("source", sa.String(length=4096), nullable=True))
        b.add_column(sa.Column("policy_id", sa.Integer(), nullable=True))
        b.add_column(sa.Column("enabled", sa.Boolean(), nullable=False, server_default=sa.true()))
        b.create_foreign_key(op.f("fk_volumes_policy_id_policies"), "policies", ["policy_id"], ["id"])
        b.create_index(op.f("ix_volumes_policy_id"), ["policy_id"], unique=False)
    with op.batch_alter_table("volumes") as b:
        b.alter_column("enabled", server_default=None)
    with op.batch_alter_table("jobs") as b:
        b.add_column(sa.Column("volume_id", sa.Integer(), nullable=True))
        b.add_column(sa.Column("heartbeat", UTC_DATETIME, nullable=True))
        b.add_column(sa.Column("progress", sa.JSON(), nullable=False, server_default="{}"))
        b.add_column(sa.Column("snapshot_id", sa.String(length=64), nullable=True))
        b.create_foreign_key(op.f("fk_jobs_volume_id_volumes"), "volumes", ["volume_id"], ["id"])
        b.create_index(op.f("ix_jobs_volume_id"), ["volume_id"], unique=False)
    with op.batch_alter_table("jobs") as b:
        b.alter_column("progress", server_default=None)
    op.create_table(
        "enrollments",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("host_name", sa.String(length=255), nullable=False),
        sa.Column("secret_hash", sa.String(length=255), nullable=False),
        sa.Column("created", UTC_DATETIME, nullable=False),
        sa.Column("expires", UTC_DATETIME, nullable=False),
        sa.Column("used", UTC_DATETIME, nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_enrollments")),
        sa.UniqueConstraint("secret_hash", name=op.f("uq_enrollments_secret_hash")),
    )


def downgrade() -> None:
    op.drop_table("enrollments")
    with op.batch_alter_table("jobs") as b:
        b.drop_index(op.f("ix_jobs_volume_id"))
        b.drop_constraint(op.f("fk_jobs_volume_id_volumes"), type_="foreignkey")
        for c in ("snapshot_id", "progress", "heartbeat", "volume_id"):
            b.drop_column(c)
    with op.batch_alter_table("volumes") as b:
        b.drop_index(op.f("ix_volumes_policy_id"))
        b.drop_constraint(op.f("fk_volumes_policy_id_policies"), type_="foreignkey")
        for c in ("enabled", "policy_id", "source"):
            b.drop_column(c)
    with op.batch_alter_table("policies") as b:
        for c in ("quiesce", "consistency", "bandwidth_limit"):
            b.drop_column(c)
    with op.batch_alter_table("hosts") as b:
        for c in ("agent_version", "last_seen"):
            b.drop_column(c)
