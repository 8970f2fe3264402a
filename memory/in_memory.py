"""A dict-backed memory store for unit tests and single-process demos.

It stores the same encoded column values as the SQL store (tensors cast to the storage dtype),
so a test passing here sees the same rounding as on SQLite or PostgreSQL.
"""

from __future__ import annotations

import collections
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import datetime
from typing import Any

from persrec.memory.codec import check_storage_dtype
from persrec.memory.record import MemoryRecord, MemoryStats, StaleMemoryError
from persrec.memory.rows import columns_to_record, record_to_columns, utc_now
from persrec.memory.store import MemoryStore, check_batch


class InMemoryMemoryStore(MemoryStore):
    def __init__(
        self, storage_dtype: str = "float16", clock: Callable[[], datetime] = utc_now
    ) -> None:
        check_storage_dtype(storage_dtype)  # fail at construction on an unknown dtype
        self.storage_dtype = storage_dtype
        self._clock = clock
        self._rows: dict[tuple[str, str], dict[str, Any]] = {}  # (user, model version) -> columns
        self._lock = threading.Lock()

    def get_many(self, user_ids: Iterable[str], model_version: str) -> dict[str, MemoryRecord]:
        with self._lock:
            rows = [self._rows.get((u, model_version)) for u in set(user_ids)]
        return {r["user_id"]: columns_to_record(r) for r in rows if r is not None}

    def put_many(
        self,
        records: Sequence[MemoryRecord],
        expected_versions: Mapping[str, int] | None = None,
    ) -> dict[str, int]:
        check_batch(records, expected_versions)
        now = self._clock()
        # Encode before taking the lock: a bad tensor raises with nothing written.
        new_rows = [record_to_columns(rec, self.storage_dtype, now) for rec in records]
        with self._lock:
            current = {r["user_id"]: self._version(r) for r in new_rows}
            if expected_versions is not None:
                stale = [u for u, v in current.items() if v != expected_versions[u]]
                if stale:
                    raise StaleMemoryError(stale)
            for row in new_rows:
                row["row_version"] = current[row["user_id"]] + 1
                self._rows[row["user_id"], row["model_version"]] = row
        return {u: v + 1 for u, v in current.items()}

    def delete_many(self, user_ids: Iterable[str]) -> int:
        users = set(user_ids)
        return self._delete(lambda user, _: user in users)

    def delete_version(self, model_version: str) -> int:
        return self._delete(lambda _, version: version == model_version)

    def _delete(self, which: Callable[[str, str], bool]) -> int:
        with self._lock:
            gone = [key for key in self._rows if which(*key)]
            for key in gone:
                del self._rows[key]
        return len(gone)

    def versions(self) -> dict[str, int]:
        with self._lock:
            return dict(collections.Counter(version for _, version in self._rows))

    def count(self, model_version: str | None = None) -> int:
        with self._lock:
            if model_version is None:
                return len(self._rows)
            return sum(r["model_version"] == model_version for r in self._rows.values())

    def behind_users(self, source_version: str, target_version: str, limit: int, after: str = "") -> list[str]:
        with self._lock:
            behind = [
                u for (u, v), row in self._rows.items()
                if v == source_version and u > after
                and ((u, target_version) not in self._rows
                     or self._rows[u, target_version]["watermark"] < row["watermark"])
            ]
        return sorted(behind)[:limit]

    def stats(self) -> MemoryStats:
        with self._lock:
            rows = list(self._rows.values())
        payload = ("data", "history", "history_ts")
        return MemoryStats(
            rows=len(rows), bytes=sum(len(r[c] or b"") for r in rows for c in payload)
        )

    def _version(self, new_row: dict[str, Any]) -> int:
        row = self._rows.get((new_row["user_id"], new_row["model_version"]))
        return 0 if row is None else row["row_version"]
