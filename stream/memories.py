"""Users' memories in the worker: an LRU cache in front of the memory store, which memory a
queued request may read (folds run while requests wait), and what a new model recompresses of an
old model's rows."""

from __future__ import annotations

import asyncio
import collections
import contextlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from persrec.memory import MemoryRecord, MemoryStore
from persrec.models.data import IdMap
from persrec.models.inputs import ModelInputs

if TYPE_CHECKING:
    from .runtime import RecRequest


@dataclass
class CachedMemory:
    tensor: np.ndarray | None  # [L, 2, M, H, Dh] float32 as stored; None = no memory yet
    events_folded: int = 0
    watermark: int = 0
    history: np.ndarray | None = None  # RECOMPRESS: dense ids of the last aged-out items
    row_version: int = 0  # 0 = no row for this model version
    history_ts: np.ndarray | None = None  # RECOMPRESS: their times (unix seconds)


class Memories:
    """The memories of ``model_version``, ``cache_size`` of them decoded in memory."""

    def __init__(self, store: MemoryStore, model_version: str, cache_size: int) -> None:
        self.store, self.model_version, self.cache_size = store, model_version, cache_size
        # while the workers switch to this model: makes the memories it lacks from the old
        # model's rows (stream.switch.CatchUp)
        self.catch_up: Callable[[list[str], dict[str, MemoryRecord]], Awaitable[dict[str, MemoryRecord]]] | None = None
        self._making = asyncio.Lock()
        self.cache: collections.OrderedDict[str, CachedMemory] = collections.OrderedDict()
        # seq of the window snapshot of each queued request without a memory, per user
        self.in_flight: dict[str, list[int]] = {}

    def get(self, user_id: str) -> CachedMemory | None:
        return self.cache.get(user_id)

    def remember(self, user_id: str, mem: CachedMemory) -> None:
        self.cache[user_id] = mem
        self.cache.move_to_end(user_id)
        while len(self.cache) > self.cache_size:
            self.cache.popitem(last=False)

    async def load(self, user_ids: list[str]) -> dict[str, CachedMemory]:
        """Each user's memory: from the cache, the others in one batched read of the store."""
        if any(u not in self.cache for u in user_ids):
            # during a switch, two loads never make the same user's memory (stream.switch)
            async with self._making if self.catch_up is not None else contextlib.nullcontext():
                missing = [u for u in user_ids if u not in self.cache]
                rows = await asyncio.to_thread(self.store.get_many, missing, self.model_version) if missing else {}
                if missing and self.catch_up is not None:
                    rows = await self.catch_up(missing, rows)
                for u in missing:
                    r = rows.get(u)
                    self.remember(u, CachedMemory(None) if r is None else CachedMemory(
                        r.tensor.astype(np.float32), r.events_folded, r.watermark, r.history, r.row_version,
                        r.history_ts))
        out = {}
        for u in user_ids:
            out[u] = self.cache[u]
            self.cache.move_to_end(u)
        return out

    def forget(self, user_ids) -> None:
        for u in user_ids:
            self.cache.pop(u, None)

    # ------------------------------------------------------------------- queued requests
    def queued(self, r: RecRequest) -> None:
        """Call when ``r`` is queued, right after its window was trimmed (no await between):
        it keeps the memory the window was trimmed against; without one, it pins folds."""
        r.memory = self.cache.get(r.user_id)
        if r.memory is None:
            self.in_flight.setdefault(r.user_id, []).append(r.window.seq)

    def done(self, r: RecRequest) -> None:
        """The model has read this request's window snapshot (batches finish in any order)."""
        if r.memory is not None:
            return
        pending = self.in_flight[r.user_id]
        pending.remove(r.window.seq)
        if not pending:
            del self.in_flight[r.user_id]

    def oldest_in_flight(self, user_id: str) -> int | None:
        """seq of the oldest window snapshot that a queued request without memory will read."""
        pending = self.in_flight.get(user_id)
        return min(pending) if pending else None

    @staticmethod
    def for_request(r: RecRequest, current: CachedMemory) -> CachedMemory:
        """The newest memory ``r`` may read with its window snapshot: the current one unless a
        fold has passed the snapshot while ``r`` was queued (it would hold events after ``r``'s
        own), then the one ``r`` was queued with. Either way memory + window after its
        watermark = the user's events up to ``r``'s, each once."""
        if current.watermark <= r.window.seq:
            return current
        if r.memory is not None and r.memory.watermark <= r.window.seq:
            return r.memory
        # The store is ahead of this window: after a crash the table's changelog can lag the
        # database, and redelivered events are re-applied to a window the memory has already
        # folded. No memory without those events exists; this one leaves nothing to read.
        return current


@dataclass(frozen=True)
class Carried:
    """Old rows' aged-out items as a new model reads them: ids translated to its map, items it
    lacks dropped, the last ``keep`` kept. A switch (``stream.switch.CatchUp``) and a rebuild
    (``serving.rebuild``) recompress these with the new model's fold."""

    rows: list[MemoryRecord]
    histories: list[np.ndarray]
    times: list[np.ndarray]

    def fold_inputs(self, memory_shape: tuple[int, ...]) -> ModelInputs:
        """A fold from no memory over each row's carried items."""
        n = len(self.rows)
        return ModelInputs.of_rows(self.histories, self.times, memory=np.zeros((n, *memory_shape), np.float32),
                                   has_memory=np.zeros(n, bool))

    def records(self, model_version: str, tensors) -> list[MemoryRecord]:
        """The new model's rows: its fold's tensors, the old rows' counters and watermarks."""
        return [MemoryRecord(r.user_id, model_version, tensors[i], r.events_folded, r.watermark, self.histories[i],
                             history_ts=self.times[i] if r.history_ts is not None else None)
                for i, r in enumerate(self.rows)]


def carried(rows: list[MemoryRecord], old_map: IdMap, new_map: IdMap, keep: int) -> Carried:
    """``rows`` (each with a stored history) as the model of ``new_map`` reads them."""
    histories, times = [], []
    for r in rows:
        ids, known = old_map.translate(r.history, new_map)
        ts = r.history_ts if r.history_ts is not None else np.zeros(len(r.history), np.int64)
        histories.append(ids[known][-keep:])
        times.append(ts[known][-keep:])
    return Carried(list(rows), histories, times)
