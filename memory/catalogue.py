"""Items registered while a model serves, in table ``item_catalogue`` (SQLite or PostgreSQL).

A served model answers with the dense ids it was trained on, 1..``base``; an item registered
later gets the next free id after ``base`` for that model version and keeps it when its text
changes. Every registration or change takes the next ``revision`` of the version, so a reader
that has applied revision r catches up with ``since(version, r)``. The worker writes
(``register``); the worker and the Triton models read.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime

import numpy as np
from sqlalchemy import func, select, text

from persrec.memory.engine import EngineUser
from persrec.memory.rows import utc_now
from persrec.memory.schema import ItemCatalogue

_T = ItemCatalogue.__table__


def text_sha256(text_: str) -> str:
    return hashlib.sha256(text_.encode()).hexdigest()


@dataclass(frozen=True)
class CatalogueItem:
    item_id: str
    dense_id: int
    revision: int
    text_sha256: str
    embedding: np.ndarray  # (dim,) float32
    registered_at: datetime
    updated_at: datetime


@dataclass(frozen=True)
class CatalogueSummary:
    items: int  # registered items of the version
    revision: int  # its latest revision (0: none)
    newest: list[CatalogueItem]  # the latest registered, newest first


class SqlCatalogue(EngineUser):
    """Thread-safe like ``SqlMemoryStore``: each call is one short transaction."""

    def register(self, model_version: str, base: int, items: Sequence[tuple[str, str, np.ndarray]],
                 trained: Mapping[str, int] | None = None, clock=utc_now) -> list[CatalogueItem]:
        """Register ``(item_id, text sha256, embedding)`` for ``model_version``, whose trained
        ids are 1..``base``, in one transaction; returns the rows written (new items and changed
        texts) in revision order. An item registered again with the same text is left alone; an
        item of ``trained`` (item id -> its trained id) keeps that id and gets a new text.

        Writers are serialised (SQLite: BEGIN IMMEDIATE; PostgreSQL: a transaction-scoped
        advisory lock per version), so two workers never hand out the same id or revision."""
        latest: dict[str, tuple[str, np.ndarray]] = {}
        for item_id, sha, emb in items:  # the last text of an item in the batch wins
            latest.pop(item_id, None)
            latest[item_id] = (sha, np.asarray(emb, np.float32))
        if not latest:
            return []
        now = clock()
        with self._writer.begin() as conn:
            if conn.dialect.name == "postgresql":
                conn.execute(text("SELECT pg_advisory_xact_lock(hashtext(:v))"), {"v": "item_catalogue:" + model_version})
            mine = _T.c.model_version == model_version
            # one scalar subquery per max: SQLite answers a lone max() from its index, two in one
            # select by scanning the version's rows (O(items) a batch: 10,000 items cost 3x)
            top = conn.execute(select(select(func.max(_T.c.dense_id)).where(mine).scalar_subquery(),
                                      select(func.max(_T.c.revision)).where(mine).scalar_subquery())).one()
            next_id, revision = max(int(top[0] or 0), base) + 1, int(top[1] or 0)
            present = {r.item_id: r for r in conn.execute(
                select(_T.c.item_id, _T.c.dense_id, _T.c.text_sha256, _T.c.registered_at)
                .where(mine, _T.c.item_id.in_(list(latest)))).all()}
            written, inserts = [], []
            for item_id, (sha, emb) in latest.items():
                old = present.get(item_id)
                if old is not None and old.text_sha256 == sha:
                    continue
                revision += 1
                row = dict(model_version=model_version, item_id=item_id, revision=revision, text_sha256=sha,
                           embedding=emb.astype("<f4").tobytes(), updated_at=now)
                if old is None:
                    dense = (trained or {}).get(item_id)
                    if dense is None:
                        dense, next_id = next_id, next_id + 1
                    row |= dict(dense_id=dense, registered_at=now)
                    inserts.append(row)
                else:
                    row |= dict(dense_id=old.dense_id, registered_at=old.registered_at)
                    conn.execute(_T.update().where(mine, _T.c.item_id == item_id).values(**row))
                written.append(CatalogueItem(item_id, row["dense_id"], revision, sha, emb, row["registered_at"], now))
            if inserts:  # one executemany: 10,000 items cost one statement, not 10,000
                conn.execute(_T.insert(), inserts)
        return written

    def since(self, model_version: str, revision: int = 0, limit: int | None = None,
              embeddings: bool = True) -> list[CatalogueItem]:
        """The version's rows written after ``revision``, in revision order; without
        ``embeddings`` (what a worker needs: ids and revisions), each row's embedding is empty."""
        cols = list(_T.c) if embeddings else [c for c in _T.c if c.name != "embedding"]
        q = (select(*cols).where(_T.c.model_version == model_version, _T.c.revision > revision)
             .order_by(_T.c.revision).limit(limit))
        with self._engine.connect() as conn:
            return [_item(r) for r in conn.execute(q).mappings()]

    def summary(self, model_version: str, newest: int = 5) -> CatalogueSummary:
        mine = _T.c.model_version == model_version
        with self._engine.connect() as conn:
            count, revision = conn.execute(select(func.count(), func.max(_T.c.revision)).where(mine)).one()
            rows = conn.execute(select(_T).where(mine).order_by(_T.c.registered_at.desc(), _T.c.dense_id.desc())
                                .limit(newest)).mappings().all()
        return CatalogueSummary(int(count), int(revision or 0), [_item(r) for r in rows])

    def delete_version(self, model_version: str) -> int:
        """Delete a retired model's rows; returns how many."""
        with self._writer.begin() as conn:
            return conn.execute(_T.delete().where(_T.c.model_version == model_version)).rowcount


_EMPTY = np.zeros(0, np.float32)


def _item(row) -> CatalogueItem:
    emb = row.get("embedding")
    return CatalogueItem(row["item_id"], int(row["dense_id"]), int(row["revision"]), row["text_sha256"],
                         _EMPTY if emb is None else np.frombuffer(emb, "<f4").astype(np.float32),
                         row["registered_at"], row["updated_at"])
