"""Policies may name a recovery drill to run on each new snapshot.

Revision ID: 0004
Revises: 0003
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision: str | None = "0003"
branch_labels: str | None = None
depends_on: str | None = None


def upgrade() -> None:
    with op.batch_alter_table("policies") as b:
        b.add_column(sa.Column("drill", sa.JSON(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("policies") as b:
        b.drop_column("drill")
