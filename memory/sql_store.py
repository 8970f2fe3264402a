"""The memory store on a SQL database (SQLite or PostgreSQL) through SQLAlchemy Core.

Tables are not created here: run `persrec.memory.migrate(url)` first.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, Engine, func, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import URL

from persrec.memory.codec import check_storage_dtype
from persrec.memory.engine import SQLITE_WRITE, create_engine_for
from persrec.memory.record import MemoryRecord, MemoryStats, StaleMemoryError
from persrec.memory.rows import columns_to_record, record_to_columns, utc_now
from persrec.memory.schema import UserMemory
from persrec.memory.store import MemoryStore, check_batch

_T = UserMemory.__table__
_KEY = ("user_id", "model_version")
# Columns an upsert overwrites from the incoming row (all but the key and row_version).
_UPDATED = [c.name for c in _T.columns if c.name not in (*_KEY, "row_version")]
_DIALECT_INSERT = {"sqlite": sqlite.insert, "postgresql": postgresql.insert}


class SqlMemoryStore(MemoryStore):
    """Memory rows in table `user_memory`, keyed by (user, model version).

    Thread-safe: each call checks a connection out of the engine's pool for one short
    transaction. `batch_size` bounds the ids per IN (...) list; larger batches are chunked
    inside the same transaction.
    """

    def __init__(
        self,
        url_or_engine: str | URL | Engine,
        storage_dtype: str = "float16",
        *,
        batch_size: int = 1000,
        clock: Callable[[], datetime] = utc_now,
    ) -> None:
        check_storage_dtype(storage_dtype)
        if isinstance(url_or_engine, Engine):
            self._engine, self._owns_engine = url_or_engine, False
        else:
            self._engine, self._owns_engine = create_engine_for(url_or_engine), True
        dialect = self._engine.dialect.name
        if dialect not in _DIALECT_INSERT:
            raise ValueError(f"unsupported database {dialect!r}: use SQLite or PostgreSQL")
        self._insert = _DIALECT_INSERT[dialect]
        self._writer = self._engine.execution_options(**SQLITE_WRITE)
        self.storage_dtype = storage_dtype
        self.batch_size = batch_size
        self._clock = clock

    @property
    def engine(self) -> Engine:
        return self._engine

    def get_many(self, user_ids: Iterable[str], model_version: str) -> dict[str, MemoryRecord]:
        query = select(_T).where(_T.c.model_version == model_version)
        rows = []
        with self._engine.connect() as conn:  # one read transaction across the chunks
            for chunk in self._chunks(set(user_ids)):
                rows += conn.execute(query.where(_T.c.user_id.in_(chunk))).mappings().all()
        return {r["user_id"]: columns_to_record(r) for r in rows}

    def put_many(
        self,
        records: Sequence[MemoryRecord],
        expected_versions: Mapping[str, int] | None = None,
    ) -> dict[str, int]:
        """Upsert in one transaction.

        Compare-and-set, in one transaction:
        1. Read the rows' versions, locking them (PostgreSQL FOR UPDATE; SQLite holds the
           database write lock since BEGIN IMMEDIATE). Any mismatch: raise, write nothing.
        2. Upsert with row_version = expected + 1, updating a conflicting row only while its
           row_version is still the expected one. This catches a row inserted concurrently
           after step 1 (which no lock covered): it is not updated, so not returned.
        3. If fewer rows came back than were sent, raise (the transaction rolls back).
        """
        check_batch(records, expected_versions)
        if not records:
            return {}
        now = self._clock()
        rows = [record_to_columns(rec, self.storage_dtype, now) for rec in records]
        rows.sort(key=lambda r: r["user_id"])  # every writer locks rows in one order: no deadlock
        ins = self._insert(_T)
        set_: dict[str, Any] = {name: ins.excluded[name] for name in _UPDATED}
        if expected_versions is None:
            for row in rows:
                row["row_version"] = 1
            stmt = ins.on_conflict_do_update(
                index_elements=[_T.c[k] for k in _KEY],
                set_={**set_, "row_version": _T.c.row_version + 1},
            )
        else:
            for row in rows:
                row["row_version"] = expected_versions[row["user_id"]] + 1
            stmt = ins.on_conflict_do_update(
                index_elements=[_T.c[k] for k in _KEY],
                set_={**set_, "row_version": ins.excluded.row_version},
                where=_T.c.row_version + 1 == ins.excluded.row_version,
            )
        stmt = stmt.returning(_T.c.user_id, _T.c.row_version)
        with self._write() as conn:
            if expected_versions is not None:
                # Step 1.
                current = self._versions(conn, {r["user_id"]: r["model_version"] for r in rows})
                stale = [u for u in current if current[u] != expected_versions[u]]
                if stale:
                    raise StaleMemoryError(stale)
            # Step 2.
            written = {u: v for u, v in conn.execute(stmt, rows).all()}
            # Step 3.
            if len(written) != len(rows):
                raise StaleMemoryError({r["user_id"] for r in rows} - written.keys())
        return written

    def delete_many(self, user_ids: Iterable[str]) -> int:
        deleted = 0
        with self._write() as conn:
            for chunk in self._chunks(set(user_ids)):
                deleted += conn.execute(_T.delete().where(_T.c.user_id.in_(chunk))).rowcount
        return deleted

    def delete_version(self, model_version: str) -> int:
        with self._write() as conn:
            return conn.execute(_T.delete().where(_T.c.model_version == model_version)).rowcount

    def versions(self) -> dict[str, int]:
        query = select(_T.c.model_version, func.count()).group_by(_T.c.model_version)
        with self._engine.connect() as conn:
            return {v: int(n) for v, n in conn.execute(query).all()}

    def count(self, model_version: str | None = None) -> int:
        query = select(func.count()).select_from(_T)
        if model_version is not None:
            query = query.where(_T.c.model_version == model_version)
        with self._engine.connect() as conn:
            return int(conn.scalar(query))

    def behind_users(self, source_version: str, target_version: str, limit: int, after: str = "") -> list[str]:
        src, dst = _T.alias("src"), _T.alias("dst")
        query = (
            select(src.c.user_id)
            .outerjoin(dst, (dst.c.user_id == src.c.user_id) & (dst.c.model_version == target_version))
            .where(src.c.model_version == source_version, src.c.user_id > after,
                   dst.c.user_id.is_(None) | (dst.c.watermark < src.c.watermark))
            .order_by(src.c.user_id)
            .limit(limit)
        )
        with self._engine.connect() as conn:
            return list(conn.scalars(query))

    def stats(self) -> MemoryStats:
        payload = (
            func.length(_T.c.data)
            + func.coalesce(func.length(_T.c.history), 0)
            + func.coalesce(func.length(_T.c.history_ts), 0)
        )
        query = select(func.count(), func.coalesce(func.sum(payload), 0))
        with self._engine.connect() as conn:
            rows, nbytes = conn.execute(query).one()
        return MemoryStats(rows=int(rows), bytes=int(nbytes))

    def close(self) -> None:
        if self._owns_engine:
            self._engine.dispose()

    @contextmanager
    def _write(self) -> Iterator[Connection]:
        with self._writer.begin() as conn:
            yield conn

    def _versions(self, conn: Connection, model_of: dict[str, str]) -> dict[str, int]:
        """Current row_version of each user's row of the given model version (0 if absent),
        locking the users' rows."""
        versions = dict.fromkeys(model_of, 0)
        for chunk in self._chunks(model_of):
            query = (
                select(_T.c.user_id, _T.c.model_version, _T.c.row_version)
                .where(_T.c.user_id.in_(chunk))
                .with_for_update()
            )
            versions.update({u: v for u, m, v in conn.execute(query).all() if model_of[u] == m})
        return versions

    def _chunks(self, user_ids: Iterable[str]) -> Iterator[list[str]]:
        it = iter(sorted(user_ids))  # sorted: rows are locked in one order by every writer
        while chunk := list(itertools.islice(it, self.batch_size)):
            yield chunk
