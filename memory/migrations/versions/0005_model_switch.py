"""Add model_switch and switch_offset: a model change made while the workers run (issue 22).

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-05
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | Sequence[str] | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "model_switch",
        sa.Column("app_id", sa.String(255), nullable=False),
        sa.Column("from_triton_version", sa.Integer(), nullable=False),
        sa.Column("to_triton_version", sa.Integer(), nullable=False),
        sa.Column("to_model_version", sa.String(128), nullable=False),
        sa.Column("requested_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("app_id", name="pk_model_switch"),
    )
    op.create_table(
        "switch_offset",
        sa.Column("app_id", sa.String(255), nullable=False),
        sa.Column("to_model_version", sa.String(128), nullable=False),
        sa.Column("partition_id", sa.Integer(), nullable=False),
        sa.Column("first_offset", sa.BigInteger(), nullable=False),
        sa.Column("recorded_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("app_id", "to_model_version", "partition_id", name="pk_switch_offset"),
    )


def downgrade() -> None:
    op.drop_table("switch_offset")
    op.drop_table("model_switch")
