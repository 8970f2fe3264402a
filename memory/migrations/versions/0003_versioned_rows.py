"""Key user_memory by (user_id, model_version): a new model's memories are built beside the
old model's, which keeps serving, instead of overwriting them.

Upgrade keeps every row (each had one version per user). Downgrade keeps, for each user, the
most recently written row (ties: the greatest model_version) and deletes the others: the
pre-0003 schema holds one row a user.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-04
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | Sequence[str] | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # SQLite cannot alter a primary key: batch mode copies the table; PostgreSQL alters it.
    with op.batch_alter_table("user_memory") as batch:
        batch.drop_constraint("pk_user_memory", type_="primary")
        batch.create_primary_key("pk_user_memory", ["user_id", "model_version"])


def downgrade() -> None:
    t = sa.table("user_memory", sa.column("user_id"), sa.column("model_version"), sa.column("updated_at"))
    newer = sa.alias(t, "newer")
    op.execute(t.delete().where(sa.exists().where(
        newer.c.user_id == t.c.user_id,
        sa.or_(newer.c.updated_at > t.c.updated_at,
               sa.and_(newer.c.updated_at == t.c.updated_at, newer.c.model_version > t.c.model_version)),
    )))
    with op.batch_alter_table("user_memory") as batch:
        batch.drop_constraint("pk_user_memory", type_="primary")
        batch.create_primary_key("pk_user_memory", ["user_id"])
