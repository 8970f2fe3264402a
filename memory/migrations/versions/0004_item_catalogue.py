"""Add item_catalogue: items registered from the stream, by model version (issue 21).

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-05
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | Sequence[str] | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "item_catalogue",
        sa.Column("model_version", sa.String(128), nullable=False),
        sa.Column("item_id", sa.String(255), nullable=False),
        sa.Column("dense_id", sa.BigInteger(), nullable=False),
        sa.Column("revision", sa.BigInteger(), nullable=False),
        sa.Column("text_sha256", sa.String(64), nullable=False),
        sa.Column("embedding", sa.LargeBinary(), nullable=False),
        sa.Column("registered_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("model_version", "item_id", name="pk_item_catalogue"),
        sa.UniqueConstraint("model_version", "dense_id", name="uq_item_catalogue_dense"),
        sa.UniqueConstraint("model_version", "revision", name="uq_item_catalogue_revision"),
    )


def downgrade() -> None:
    op.drop_table("item_catalogue")
