"""model_switch names the Triton server of each version, where it is not the workers' own: a new
version served by a second tritonserver instead of loaded beside the old one under traffic.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-07
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | Sequence[str] | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("model_switch") as batch:
        batch.add_column(sa.Column("from_triton_url", sa.String(512), nullable=True))
        batch.add_column(sa.Column("to_triton_url", sa.String(512), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("model_switch") as batch:
        batch.drop_column("to_triton_url")
        batch.drop_column("from_triton_url")
