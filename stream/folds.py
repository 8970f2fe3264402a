"""Folds: which users' windows have a whole segment to fold, the ``fold`` model call, and the
compare-and-set write of the new memories.

For users with ``recent_len + segment_len`` items after their memory's watermark:
  1. segment = the oldest ``segment_len`` window items after the watermark (the model's fold
     cadence: INCREMENTAL folds one such segment per call, RECOMPRESS every whole one). A queued
     request keeps the memory its window snapshot was trimmed against, and reads the newest
     memory that folded none of its future events (``Memories.for_request``), so folds need not
     wait for a user's queued requests. Only requests queued before the user's memory was
     loaded hold none: a fold never passes their window snapshot;
  2. one Triton ``fold`` call: RECOMPRESS compresses the last ``history_len`` aged-out items
     and their times (kept in the DB row), INCREMENTAL folds the segment into the stored memory;
  3. memories are written with compare-and-set on row_version (a concurrent writer wins; its
     users are reloaded later);
  4. the cache is updated. The window is trimmed later, by the agent, from the new watermark.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import numpy as np

from persrec.memory import MemoryRecord, StaleMemoryError
from persrec.memory.codec import decode_tensor, encode_tensor
from persrec.models.config import MemoryPolicy
from persrec.models.inputs import ModelInputs

from . import window as win
from .catalogue import Catalogue
from .inputs import ItemReader
from .manifest import Manifest
from .memories import CachedMemory, Memories
from .messages import Counters
from .triton import TritonModels


class Folds:
    def __init__(self, memories: Memories, models: TritonModels, reader: ItemReader, manifest: Manifest,
                 read_window: Callable[[str], win.Window], counters: Counters, *, batch: int, storage_dtype: str,
                 catalogue: Catalogue | None = None) -> None:
        self.memories, self.models, self.reader, self.manifest = memories, models, reader, manifest
        self.catalogue = catalogue  # items registered since training: the fold model must read them too
        self.read_window, self.counters = read_window, counters
        self.batch, self.storage_dtype = batch, storage_dtype
        self.pending: set[str] = set()  # users with a whole segment to fold

    def due(self, user_id: str, seq: int, watermark: int) -> None:
        """Note a user whose window (``seq`` events) holds a whole segment past ``watermark``."""
        if self.manifest.has_memory and seq - watermark >= self.manifest.recent_len + self.manifest.segment_len:
            self.pending.add(user_id)

    async def once(self) -> int:
        """Fold one batch of pending users; returns how many memories were written."""
        users = list(self.pending)[: self.batch]
        if not users:
            return 0
        mems = await self.memories.load(users)
        recompress = self.manifest.policy is MemoryPolicy.RECOMPRESS
        plan = []  # (user, memory, segment items (dense), segment ts, new watermark, folded count)
        for u in users:
            w, m = self.read_window(u), mems[u]
            oldest = self.memories.oldest_in_flight(u)
            limit = None if oldest is None else oldest - 1
            seg, seg_ts, new_wm = win.fold_segment(w, m.watermark, self.manifest.recent_len,
                                                   self.manifest.segment_len, limit, None if recompress else 1)
            if not seg:
                self.pending.discard(u)
                continue
            plan.append((u, m, *self.reader.known(seg, seg_ts), new_wm, len(seg)))
        if not plan:
            return 0
        rows = []  # (items, times, fold into the stored memory, history kept, its times)
        for u, m, seg, seg_ts, _, _ in plan:
            seg, seg_ts = np.asarray(seg, np.int64), np.asarray(seg_ts, np.int64)
            if recompress:
                hist, hist_ts = history_after(m, seg, seg_ts, self.manifest.history_len)
                rows.append((hist, hist_ts, False, hist, hist_ts))
            else:
                rows.append((seg, seg_ts, m.tensor is not None, None, None))
        memory = np.zeros((len(rows), *self.manifest.memory_shape), np.float32)
        for i, (_, _, has, _, _) in enumerate(rows):
            if has:
                memory[i] = plan[i][1].tensor
        x = ModelInputs.of_rows([r[0] for r in rows], [r[1] for r in rows], memory=memory,
                                has_memory=np.array([r[2] for r in rows], bool),
                                catalogue=None if self.catalogue is None else self.catalogue.state(len(rows)))
        new = await self.models.fold(x)
        return await self._write(plan, rows, new)

    async def _write(self, plan, rows, new: np.ndarray) -> int:
        records, expected, fresh = [], {}, []
        for i, (u, m, _, _, new_wm, n) in enumerate(plan):
            stored = as_stored(new[i], self.storage_dtype)
            rec = MemoryRecord(u, self.manifest.model_version, stored, m.events_folded + n, new_wm, rows[i][3],
                               history_ts=rows[i][4])
            (records if m.row_version else fresh).append(rec)
            if m.row_version:
                expected[u] = m.row_version
        store = self.memories.store
        written: dict[str, int] = {}
        try:
            if records:
                written |= await asyncio.to_thread(store.put_many, records, expected)
        except StaleMemoryError as exc:  # another worker owns these users now: reload later
            self.counters.fold_conflicts += len(exc.users)
            self.memories.forget(exc.users)
            self.pending.difference_update(exc.users)
            records = []
        if fresh:
            written |= await asyncio.to_thread(store.put_many, fresh)
        for rec in records + fresh:
            self.memories.remember(rec.user_id, CachedMemory(rec.tensor, rec.events_folded, rec.watermark, rec.history,
                                                             written[rec.user_id], rec.history_ts))
            if self.read_window(rec.user_id).seq - rec.watermark < self.manifest.recent_len + self.manifest.segment_len:
                self.pending.discard(rec.user_id)  # else: another whole segment waits
        self.counters.folds += len(written)
        return len(written)


def history_after(m: CachedMemory, seg: np.ndarray, seg_ts: np.ndarray, keep: int) -> tuple[np.ndarray, np.ndarray]:
    """RECOMPRESS: the last ``keep`` aged-out items (and times) once ``seg`` has aged out too. A
    row written before times were kept has none for its history: those items get time 0."""
    old = m.history if m.history is not None else np.zeros(0, np.int64)
    old_ts = m.history_ts if m.history_ts is not None else np.zeros(len(old), np.int64)
    return np.concatenate([old, seg])[-keep:], np.concatenate([old_ts, seg_ts])[-keep:]


def as_stored(tensor: np.ndarray, dtype: str) -> np.ndarray:
    """The tensor exactly as it will read back from the store (so cache == database)."""
    data, dt, shape = encode_tensor(tensor, dtype)
    return decode_tensor(data, dt, shape)
