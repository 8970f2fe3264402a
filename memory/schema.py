"""The `user_memory`, `item_catalogue`, `model_switch` and `switch_offset` tables (SQLAlchemy 2 typed declarative).

The Alembic revisions build exactly this table; tests check that the migrated schema and this
metadata agree on SQLite and PostgreSQL. Change both together, through a new revision.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import JSON, BigInteger, DateTime, Integer, LargeBinary, MetaData, String, UniqueConstraint
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

# Deterministic constraint names, so later migrations can refer to them on every backend.
NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class UserMemory(Base):
    """One row per (user, model version): while a new model's memories are built, the old
    model's keep serving (revision 0003)."""

    __tablename__ = "user_memory"

    user_id: Mapped[str] = mapped_column(String(255), primary_key=True)
    model_version: Mapped[str] = mapped_column(String(128), primary_key=True, index=True)
    dtype: Mapped[str] = mapped_column(String(16))  # storage dtype of `data`, e.g. "float16"
    shape: Mapped[list[int]] = mapped_column(JSON)  # (L, 2, M, H, D/H)
    data: Mapped[bytes] = mapped_column(LargeBinary)  # little-endian tensor bytes
    events_folded: Mapped[int] = mapped_column(BigInteger)
    # Per-user seq of the last folded event; after a crash the stream drops events <= it from
    # its recent window, since they are already in `data`.
    watermark: Mapped[int] = mapped_column(BigInteger)
    history: Mapped[bytes | None] = mapped_column(LargeBinary)  # (P,) int64 aged-out item ids
    history_len: Mapped[int] = mapped_column(Integer)  # P; 0 when history is NULL
    # (P,) int64 unix seconds of `history`; NULL when there is no history or it has no times.
    history_ts: Mapped[bytes | None] = mapped_column(LargeBinary)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))  # UTC
    # Optimistic concurrency: 1 on insert, +1 per update. The store's upsert maintains it in
    # SQL; ORM users get the same check through version_id_col.
    row_version: Mapped[int] = mapped_column(Integer)

    __mapper_args__ = {"version_id_col": row_version}


class ItemCatalogue(Base):
    """Items registered while a model serves (the ``items`` topic), one row per (model version,
    item): the text embedding the served model reads the item by, and the dense id it answers
    with (after the ids it was trained on). ``revision`` counts registrations per version: a
    reader that has seen revision r reads the rows after r (revision 0004)."""

    __tablename__ = "item_catalogue"

    model_version: Mapped[str] = mapped_column(String(128), primary_key=True)
    item_id: Mapped[str] = mapped_column(String(255), primary_key=True)
    dense_id: Mapped[int] = mapped_column(BigInteger)
    revision: Mapped[int] = mapped_column(BigInteger)
    text_sha256: Mapped[str] = mapped_column(String(64))  # of the UTF-8 text: a repeat changes nothing
    embedding: Mapped[bytes] = mapped_column(LargeBinary)  # (dim,) little-endian float32
    registered_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))  # UTC, first registration
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))  # UTC, latest text

    __table_args__ = (
        UniqueConstraint("model_version", "dense_id", name="uq_item_catalogue_dense"),
        UniqueConstraint("model_version", "revision", name="uq_item_catalogue_revision"),
    )


class ModelSwitch(Base):
    """The model change a worker group (``app_id``) is making, if any: from one Triton version
    of the repository to another, without stopping (revision 0005)."""

    __tablename__ = "model_switch"

    app_id: Mapped[str] = mapped_column(String(255), primary_key=True)
    from_triton_version: Mapped[int] = mapped_column(Integer)
    to_triton_version: Mapped[int] = mapped_column(Integer)
    to_model_version: Mapped[str] = mapped_column(String(128))
    requested_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))  # UTC
    # where each version is served, if not on the workers' own Triton (revision 0006)
    from_triton_url: Mapped[str | None] = mapped_column(String(512), nullable=True)
    to_triton_url: Mapped[str | None] = mapped_column(String(512), nullable=True)


class SwitchOffset(Base):
    """Per input partition, the first offset the new model answers (the first worker to switch
    the partition records it; every later owner keeps it). Revision 0005."""

    __tablename__ = "switch_offset"

    app_id: Mapped[str] = mapped_column(String(255), primary_key=True)
    to_model_version: Mapped[str] = mapped_column(String(128), primary_key=True)
    partition_id: Mapped[int] = mapped_column(Integer, primary_key=True)
    first_offset: Mapped[int] = mapped_column(BigInteger)
    recorded_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))  # UTC
