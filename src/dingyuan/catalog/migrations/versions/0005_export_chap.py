"""iSCSI exports may require CHAP: the initiator's credentials, and the target's for mutual CHAP.

Revision ID: 0005
Revises: 0004
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision: str | None = "0004"
branch_labels: str | None = None
depends_on: str | None = None

_COLUMNS = ("chap_user", "chap_secret", "mutual_chap_user", "mutual_chap_secret")


def upgrade() -> None:
    with op.batch_alter_table("exports") as b:
        for name in _COLUMNS:
            b.add_column(sa.Column(name, sa.String(length=255), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("exports") as b:
        for name in _COLUMNS:
            b.drop_column(name)
