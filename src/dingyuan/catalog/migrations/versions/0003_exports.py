"""Exports: snapshots and clones the vault serves as block devices.

Revision ID: 0003
Revises: 0002
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision: str | None = "0002"
branch_labels: str | None = None
depends_on: str | None = None


def upgrade() -> None:
    op.create_table(
        "exports",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=255), nullable=False),
        sa.Column("protocol", sa.String(length=16), nullable=False),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("target", sa.String(length=64), nullable=False),
        sa.Column("writable", sa.Boolean(), nullable=False),
        sa.Column("allowed_clients", sa.JSON(), nullable=True),
        sa.Column("created", sa.DateTime(timezone=True), nullable=False),
        sa.Column("created_by", sa.String(length=255), nullable=False),
        sa.CheckConstraint("kind IN ('snapshot', 'clone')", name=op.f("ck_exports_kind")),
        sa.CheckConstraint("protocol IN ('nbd', 'iscsi')", name=op.f("ck_exports_protocol")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_exports")),
        sa.UniqueConstraint("name", name=op.f("uq_exports_name")),
    )


def downgrade() -> None:
    op.drop_table("exports")
