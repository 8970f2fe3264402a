"""The value a memory store holds per user, and the store's errors."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime

import numpy as np


@dataclass(frozen=True, eq=False)
class MemoryRecord:
    """One user's compressed long-term memory, valid only for the model that made it.

    `eq=False`: arrays have no single truth value, so records compare by identity.
    """

    user_id: str
    model_version: str  # the model that wrote `tensor`; another model must not read it
    tensor: np.ndarray  # (L, 2, M, H, D/H) float32 when read; any real dtype when written
    events_folded: int  # events ever folded into this memory
    watermark: int  # per-user seq of the last folded event: events with seq <= it are in memory
    history: np.ndarray | None = None  # (P,) int64 ids of the last aged-out items, or None
    history_ts: np.ndarray | None = None  # (P,) int64 unix seconds of `history`, or None
    updated_at: datetime | None = None  # UTC time of the write; set by the store
    row_version: int = 0  # 0 = never stored; the store returns 1 on insert, +1 per update

    def __post_init__(self) -> None:
        """Raise ValueError if `history_ts` is given without `history` or with another length."""
        if self.history_ts is None:
            return
        if self.history is None:
            raise ValueError(f"user {self.user_id!r}: history_ts given without history")
        if len(self.history_ts) != len(self.history):
            raise ValueError(
                f"user {self.user_id!r}: history_ts has {len(self.history_ts)} times "
                f"for {len(self.history)} history items"
            )


@dataclass(frozen=True)
class MemoryStats:
    rows: int
    bytes: int  # tensor, history and history_ts payload bytes, without row overhead


class StaleMemoryError(RuntimeError):
    """A compare-and-set write found rows whose row_version is not the expected one.

    Nothing of the batch was written. `users` lists the conflicting user ids (sorted).
    """

    def __init__(self, users: Iterable[str]):
        self.users: tuple[str, ...] = tuple(sorted(users))
        shown = ", ".join(self.users[:10]) + (" ..." if len(self.users) > 10 else "")
        super().__init__(
            f"{len(self.users)} memory row(s) changed since they were read "
            f"(concurrent writer): {shown}"
        )
