"""The memory store interface shared by the SQL and in-memory backends."""

from __future__ import annotations

import abc
from collections.abc import Iterable, Mapping, Sequence
from typing import Self

from persrec.memory.record import MemoryRecord, MemoryStats


class MemoryStore(abc.ABC):
    """Memory rows keyed by (user id, model version): a user has one row per model that wrote
    one, so a new model's memories are built while the old model's serve. Every method is
    thread-safe and atomic.

    Reads return float32 tensors whatever the storage dtype. Writes stamp `updated_at` and set
    `row_version` (1 on insert, +1 per update); the `updated_at` and `row_version` fields of the
    records passed in are ignored.
    """

    @abc.abstractmethod
    def get_many(self, user_ids: Iterable[str], model_version: str) -> dict[str, MemoryRecord]:
        """Records of the given users written by `model_version`; others are simply absent."""

    @abc.abstractmethod
    def put_many(
        self,
        records: Sequence[MemoryRecord],
        expected_versions: Mapping[str, int] | None = None,
    ) -> dict[str, int]:
        """Upsert all records in one transaction, each at (its user, its model version); return
        each user's new row_version.

        With `expected_versions` (compare-and-set), every record's user must have an entry:
        the row_version of that (user, model version) row read before (0 = it must not exist). If any row differs,
        raise StaleMemoryError naming those users and write nothing.
        Raises ValueError if a user appears twice in `records`.
        """

    @abc.abstractmethod
    def delete_many(self, user_ids: Iterable[str]) -> int:
        """Delete the users' rows, of every model version (an erasure); return how many existed."""

    @abc.abstractmethod
    def delete_version(self, model_version: str) -> int:
        """Delete every row written by `model_version` (a retired model); return how many."""

    @abc.abstractmethod
    def versions(self) -> dict[str, int]:
        """Rows per model version."""

    @abc.abstractmethod
    def count(self, model_version: str | None = None) -> int:
        """Rows in the store, or only those written by `model_version`."""

    @abc.abstractmethod
    def behind_users(self, source_version: str, target_version: str, limit: int, after: str = "") -> list[str]:
        """Up to `limit` users (sorted, each > `after`: pages) whose `source_version` row has no
        `target_version` row beside it, or one with a lower watermark (the source model folded
        more since it was built): the memories a rebuild for `target_version` has to make. Run
        while the source model still serves (a shadow build), then again after it stops: the
        second run redoes only the users the source model moved on."""

    @abc.abstractmethod
    def stats(self) -> MemoryStats:
        """Row count and payload bytes."""

    def close(self) -> None:
        """Release connections; the default has nothing to release."""

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def check_batch(
    records: Sequence[MemoryRecord], expected_versions: Mapping[str, int] | None
) -> None:
    """Validate a put_many batch the same way on every backend."""
    seen: set[str] = set()
    for rec in records:
        if rec.user_id in seen:
            raise ValueError(f"user {rec.user_id!r} appears twice in one put_many batch")
        seen.add(rec.user_id)
    if expected_versions is not None:
        missing = sorted(seen - expected_versions.keys())
        if missing:
            raise ValueError(f"compare-and-set needs an expected version for users {missing[:10]}")
