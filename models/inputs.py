"""A padded batch of users on the serving path (``recommend``, ``fold``), as numpy arrays: the
one form in which the worker sends inputs to Triton and the Triton models hand them to the
model. Pure numpy."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np


def pad_rows(rows: Sequence[Sequence[int] | np.ndarray], width: int | None = None,
             dtype=np.int64) -> np.ndarray:
    """Right-pad rows with 0 into ``[B, W]``, W = ``width`` or the longest row (at least 1)."""
    w = max([1] + [len(r) for r in rows]) if width is None else width
    out = np.zeros((len(rows), w), dtype)
    for i, r in enumerate(rows):
        out[i, : len(r)] = r
    return out


@dataclass
class ModelInputs:
    """B users: ``items`` ``[B, W]`` dense ids right-padded with 0, ``timestamps`` ``[B, W]``
    unix seconds, ``lengths`` ``[B]``; for a model with memory tokens ``memory``
    ``[B, L, 2, M, H, Dh]`` float32 and ``has_memory`` ``[B]`` (False: a new user's); for a
    request-time model ``request_ts`` ``[B]`` (when each recommendation is asked for); for a
    model that reads items by their text ``catalogue`` ``[B, 2]``: the item-catalogue revision
    the row's worker has applied, and the highest dense id it can name (the answer holds no
    item after it; ``serving.catalogue``)."""

    items: np.ndarray
    timestamps: np.ndarray
    lengths: np.ndarray
    memory: np.ndarray | None = None
    has_memory: np.ndarray | None = None
    request_ts: np.ndarray | None = None
    catalogue: np.ndarray | None = None

    @classmethod
    def of_rows(cls, items: Sequence, timestamps: Sequence | None = None, width: int | None = None,
                **rest) -> "ModelInputs":
        """From ragged rows of ids (and times), padded to ``width`` or the longest row."""
        ids = pad_rows(items, width)
        ts = np.zeros_like(ids) if timestamps is None else pad_rows(timestamps, ids.shape[1])
        return cls(ids, ts, np.array([len(r) for r in items], np.int64), **rest)

    def __len__(self) -> int:
        return len(self.lengths)

    def take(self, rows: np.ndarray, width: int | None = None) -> "ModelInputs":
        """Rows ``rows``, cut to ``width`` columns (default: their longest row)."""
        w = max(1, int(self.lengths[rows].max())) if width is None else width
        pick = lambda a: None if a is None else a[rows]  # noqa: E731
        return replace(self, items=self.items[rows, :w], timestamps=self.timestamps[rows, :w],
                       lengths=self.lengths[rows], memory=pick(self.memory), has_memory=pick(self.has_memory),
                       request_ts=pick(self.request_ts), catalogue=pick(self.catalogue))
