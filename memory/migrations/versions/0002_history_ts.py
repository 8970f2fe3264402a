"""Add user_memory.history_ts (NULL for existing rows).

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-04
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | Sequence[str] | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("user_memory") as batch:
        batch.add_column(sa.Column("history_ts", sa.LargeBinary(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("user_memory") as batch:
        batch.drop_column("history_ts")
