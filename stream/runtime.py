"""What the worker does with events, apart from Faust: memories, model calls, messages, folds.

Recommendation path for a batch of requests (each: a user's window snapshot + its event):
  1. load the users' memories (LRU cache, then one batched DB read for misses);
  2. model input = window items after the memory's watermark, mapped to the model's item ids
     (items the model does not know are skipped);
  2. one Triton ``recommend`` call for the batch;
  4. one message per request (see ``recommendation_message``).

Fold path (``fold_once``), for users with ``recent_len + segment_len`` items after the watermark:
  1. segment = the oldest ``segment_len`` window items after the watermark (the model's fold
     cadence: INCREMENTAL folds one such segment per call, RECOMPRESS every whole one). A queued
     request keeps the memory its window snapshot was trimmed against, and reads the newest
     memory that folded none of its future events (``memory_for``), so folds need not wait for
     a user's queued requests. Only requests queued before the user's memory was loaded hold
     none: a fold never passes their window snapshot;
  2. one Triton ``compress`` call: RECOMPRESS compresses the last ``history_len`` aged-out items
     (kept in the DB row), INCREMENTAL folds the segment into the stored memory;
  3. write memories with compare-and-set on row_version (a concurrent writer wins, we retry);
  4. update the cache. The window is trimmed later, by the agent, from the new watermark.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from persrec.memory import MemoryRecord, MemoryStore, StaleMemoryError
from persrec.memory.codec import decode_tensor, encode_tensor
from persrec.models.data import IdMap
from persrec.serving.export import Manifest
from persrec.serving.triton_client import TritonModels

from . import window as win

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StreamConfig:
    top_k: int = 10
    fold_batch: int = 256  # users per compress call
    storage_dtype: str = "float16"  # memory tensors in the DB
    cache_size: int = 100_000  # memories kept decoded in the worker


@dataclass
class CachedMemory:
    tensor: np.ndarray | None  # [L, 2, M, H, Dh] float32 as stored; None = no memory yet
    events_folded: int = 0
    watermark: int = 0
    history: np.ndarray | None = None  # RECOMPRESS: dense ids of the last aged-out items
    row_version: int = 0  # 0 = no row for this model version
    history_ts: np.ndarray | None = None  # RECOMPRESS: their times (unix seconds)


@dataclass
class RecRequest:
    user_id: str
    window: win.Window
    event_id: str
    event_ts: float
    source: dict[str, Any]  # topic, partition, offset of the triggering event
    received: float  # monotonic time the worker read the event
    duplicate: bool = False
    ack: Callable[[], Any] | None = None
    # the user's memory when the request was queued (None: not loaded yet); see memory_for
    memory: CachedMemory | None = None
    value: bytes = b""  # the event as it came, for the dead-letter topic if it cannot be processed


@dataclass
class _Mapped:
    """A window's items after a watermark (``items``, ``ts``: as in the window) and the model ids
    and times of those the model knows; ``counts[n]``: how many of the first n it knows."""
    items: list[str]
    ts: list[int]
    ids: np.ndarray
    times: np.ndarray
    counts: np.ndarray


@dataclass
class Counters:
    events_in: int = 0
    recs_out: int = 0
    dlq: int = 0
    duplicates: int = 0
    rerouted: int = 0
    offset_rewinds: int = 0  # input partitions read again from a missing offset (stream.offsets)
    cold_start: int = 0
    folds: int = 0
    fold_conflicts: int = 0
    batches: int = 0
    seconds_model: float = 0.0  # in recommend_batch (memories + Triton)
    seconds_publish: float = 0.0  # producing and waiting for the broker's acks
    latencies_ms: collections.deque = field(default_factory=lambda: collections.deque(maxlen=10_000))

    def latency_quantiles(self) -> dict[str, float | None]:
        if not self.latencies_ms:
            return {"p50_ms": None, "p99_ms": None}
        arr = np.fromiter(self.latencies_ms, float)
        return {"p50_ms": float(np.percentile(arr, 50)), "p99_ms": float(np.percentile(arr, 99))}


class Runtime:
    def __init__(self, store: MemoryStore, models: TritonModels, id_map: IdMap, manifest: Manifest,
                 cfg: StreamConfig, read_window: Callable[[str], win.Window]) -> None:
        self.store, self.models, self.id_map, self.manifest, self.cfg = store, models, id_map, manifest, cfg
        self.read_window = read_window
        self.cache: collections.OrderedDict[str, CachedMemory] = collections.OrderedDict()
        self.fold_pending: set[str] = set()
        # seq of the window snapshot of each queued request without a memory, per user
        self.in_flight: dict[str, list[int]] = {}
        self.last_recs: collections.OrderedDict[str, dict] = collections.OrderedDict()
        self.counters = Counters()
        # A dict beats IdMap.encode's vectorised search on the few items of one request.
        self._index = {item: i + 1 for i, item in enumerate(id_map.items.tolist())}
        # the most items a request reads beside the memory (window.read_start)
        self._cap = max(manifest.window_len, manifest.recent_len + manifest.history_len)

    # -------------------------------------------------------------------------- memories
    def cached(self, user_id: str) -> CachedMemory | None:
        return self.cache.get(user_id)

    def _remember(self, user_id: str, mem: CachedMemory) -> None:
        self.cache[user_id] = mem
        self.cache.move_to_end(user_id)
        while len(self.cache) > self.cfg.cache_size:
            self.cache.popitem(last=False)

    async def memories(self, user_ids: list[str]) -> dict[str, CachedMemory]:
        missing = [u for u in user_ids if u not in self.cache]
        if missing:
            rows = await asyncio.to_thread(self.store.get_many, missing, self.manifest.model_version)
            for u in missing:
                r = rows.get(u)
                self._remember(u, CachedMemory(None) if r is None else CachedMemory(
                    r.tensor.astype(np.float32), r.events_folded, r.watermark, r.history, r.row_version,
                    r.history_ts))
        out = {}
        for u in user_ids:
            out[u] = self.cache[u]
            self.cache.move_to_end(u)
        return out

    def trimmed(self, user_id: str, w: win.Window) -> win.Window:
        """The window without what the model no longer reads: items folded into the user's
        cached memory, or, for a model without memory, items beyond its longest input."""
        if not self.manifest.has_memory:
            return win.trim(w, w.seq - self.manifest.window_len)
        cached = self.cache.get(user_id)
        return w if cached is None else win.trim(w, cached.watermark)

    def forget(self, user_ids) -> None:
        for u in user_ids:
            self.cache.pop(u, None)
            self.last_recs.pop(u, None)
            self.fold_pending.discard(u)

    def request_queued(self, r: RecRequest) -> None:
        """Call when ``r`` is queued, right after its window was trimmed (no await between):
        it keeps the memory the window was trimmed against; without one, it pins folds."""
        r.memory = self.cache.get(r.user_id)
        if r.memory is None:
            self.in_flight.setdefault(r.user_id, []).append(r.window.seq)

    def request_done(self, r: RecRequest) -> None:
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
    def memory_for(r: RecRequest, current: CachedMemory) -> CachedMemory:
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

    # ---------------------------------------------------------------------- recommending
    def known(self, items: list[str], ts: list[int]) -> tuple[list[int], list[int]]:
        """Model ids and times of the items the model knows (unknown items are skipped)."""
        ids = [self._index.get(i, 0) for i in items]
        if 0 not in ids:  # the usual case: one pass, times as they are
            return ids, list(ts)
        pairs = [(d, t) for d, t in zip(ids, ts) if d]
        return [p[0] for p in pairs], [p[1] for p in pairs]

    def model_inputs(self, w: win.Window, watermark: int) -> tuple[list[int], list[int]]:
        """Known items after the watermark, at most the model's max_len (the latest ones, from
        an aligned start: ``window.read_start``).

        The window after the watermark outgrows max_len only when folds lag behind (e.g. a
        backlog holding hundreds of one user's events, each pinning the watermark while queued).
        The model was trained on at most max_len items, and one long row would pad its whole
        batch to that length: attention is quadratic, so Triton took seconds per batch and the
        backlog grew until calls timed out (tests/reliability/test_soak.py). The skipped items
        are folded into the memory later; ``window`` in the message says how many were read.
        """
        mapped = self._mapped(w, watermark)
        ids, ts = self._read(mapped, len(mapped.items))
        return ids.tolist(), ts.tolist()

    def batch_inputs(self, reqs: list[RecRequest], used: list[CachedMemory]) -> list[tuple[np.ndarray, np.ndarray]]:
        """``model_inputs`` of every request (as arrays), mapping a user's items once per batch.

        A user's requests that read one memory usually hold snapshots of one window: what each
        reads after the watermark is the start of what the latest snapshot holds there. So the
        latest is mapped to model ids once and each request whose items and times are such a
        start (compared in full) reads from it; any other is mapped on its own."""
        latest: dict[tuple[str, int], int] = {}
        for i, (r, m) in enumerate(zip(reqs, used)):
            key = (r.user_id, id(m))
            j = latest.get(key)
            if j is None or r.window.seq > reqs[j].window.seq:
                latest[key] = i
        mapped: dict[int, _Mapped] = {}
        out = []
        for r, m in zip(reqs, used):
            j = latest[(r.user_id, id(m))]
            if j not in mapped:
                mapped[j] = self._mapped(reqs[j].window, m.watermark)
            top = mapped[j]
            items, ts = win.effective(r.window, m.watermark)
            n = len(items)
            if items != top.items[:n] or ts != top.ts[:n]:
                top = self._mapped(r.window, m.watermark)
            out.append(self._read(top, n))
        return out

    def _mapped(self, w: win.Window, watermark: int) -> _Mapped:
        items, ts = win.effective(w, watermark)
        dense = np.fromiter((self._index.get(x, 0) for x in items), np.int64, len(items))
        known = dense != 0
        return _Mapped(items, ts, dense[known], np.asarray(ts, np.int64)[known],
                       np.concatenate([[0], np.cumsum(known)]))

    def _read(self, mapped: _Mapped, n: int) -> tuple[np.ndarray, np.ndarray]:
        """What the model reads of the first ``n`` items of ``mapped``."""
        c = int(mapped.counts[n])
        s = win.read_start(c, self._cap)
        return mapped.ids[s:c], mapped.times[s:c]

    async def recommend_batch(self, reqs: list[RecRequest]) -> list[dict]:
        current = await self.memories(list(dict.fromkeys(r.user_id for r in reqs)))
        used = [self.memory_for(r, current[r.user_id]) for r in reqs]
        inputs = self.batch_inputs(reqs, used)
        live = [i for i, (items, _) in enumerate(inputs) if len(items)]
        top_ids = top_scores = None
        if live:
            width = max([self.manifest.window_len] + [len(inputs[i][0]) for i in live])
            items = np.zeros((len(live), width), np.int64)
            ts = np.zeros((len(live), width), np.int64)
            lengths = np.zeros(len(live), np.int64)
            for row, i in enumerate(live):
                n = len(inputs[i][0])
                items[row, :n], ts[row, :n], lengths[row] = inputs[i][0], inputs[i][1], n
            memory = has = None
            if self.manifest.has_memory:
                memory = np.zeros((len(live), *self.manifest.memory_shape), np.float32)
                has = np.zeros(len(live), bool)
                for row, i in enumerate(live):
                    m = used[i]
                    if m.tensor is not None:
                        memory[row], has[row] = m.tensor, True
            request_ts = None
            if self.manifest.request_time:  # the recommendation is asked for at its event's time
                request_ts = np.array([int(reqs[i].event_ts) for i in live], np.int64)
            top_ids, top_scores = await self.models.recommend(items, ts, lengths, memory, has, request_ts)
        now = time.time()
        messages, row_of = [], {i: row for row, i in enumerate(live)}
        threshold = self.manifest.recent_len + self.manifest.segment_len
        if live:  # the whole batch at once: per-row decoding was a tenth of the worker's time
            k = top_ids.shape[1]
            names = self.id_map.decode(top_ids)
            values = np.round(top_scores.astype(np.float64).ravel(), 6).tolist()
        for i, (r, m) in enumerate(zip(reqs, used)):
            if i in row_of:
                at = row_of[i] * k
                recs = [{"item_id": item, "score": s} for item, s in zip(names[at:at + k], values[at:at + k])]
            else:
                recs = []
                self.counters.cold_start += 1
            msg = recommendation_message(r, recs, self.manifest.model_version, m, len(inputs[i][0]), now)
            messages.append(msg)
            self.last_recs[r.user_id] = msg
            self.last_recs.move_to_end(r.user_id)
            if len(self.last_recs) > self.cfg.cache_size:
                self.last_recs.popitem(last=False)
            if self.manifest.has_memory and r.window.seq - current[r.user_id].watermark >= threshold:
                self.fold_pending.add(r.user_id)
        return messages

    # --------------------------------------------------------------------------- folding
    async def fold_once(self) -> int:
        """Fold one batch of pending users; returns how many memories were written."""
        users = list(self.fold_pending)[: self.cfg.fold_batch]
        if not users:
            return 0
        mems = await self.memories(users)
        recompress = self.manifest.policy == "recompress"
        plan = []  # (user, memory, segment items (dense), segment ts, new watermark, folded count)
        for u in users:
            w, m = self.read_window(u), mems[u]
            oldest = self.oldest_in_flight(u)
            limit = None if oldest is None else oldest - 1
            # INCREMENTAL folds one segment per call, as training does; RECOMPRESS all at once
            seg, seg_ts, new_wm = win.fold_segment(w, m.watermark, self.manifest.recent_len,
                                                   self.manifest.segment_len, limit, None if recompress else 1)
            if not seg:
                self.fold_pending.discard(u)
                continue
            plan.append((u, m, *self.known(seg, seg_ts), new_wm, len(seg)))
        if not plan:
            return 0
        rows = []  # (items, times, fold into the stored memory, history kept, its times)
        for u, m, seg, seg_ts, _, _ in plan:
            seg, seg_ts = np.asarray(seg, np.int64), np.asarray(seg_ts, np.int64)
            if recompress:
                hist, hist_ts = _history_after(m, seg, seg_ts, self.manifest.history_len)
                rows.append((hist, hist_ts, False, hist, hist_ts))
            else:
                rows.append((seg, seg_ts, m.tensor is not None, None, None))
        width = max(1, max(len(r[0]) for r in rows))
        items = np.zeros((len(rows), width), np.int64)
        ts = np.zeros_like(items)
        lengths = np.array([len(r[0]) for r in rows], np.int64)
        memory = np.zeros((len(rows), *self.manifest.memory_shape), np.float32)
        has = np.array([r[2] for r in rows], bool)
        for i, (it, t, h, _, _) in enumerate(rows):
            items[i, : len(it)], ts[i, : len(t)] = it, t
            if h:
                memory[i] = plan[i][1].tensor
        new = await self.models.compress(memory, has, items, ts, lengths)
        records, expected, fresh = [], {}, []
        for i, (u, m, _, _, new_wm, n) in enumerate(plan):
            stored = _as_stored(new[i], self.cfg.storage_dtype)
            rec = MemoryRecord(u, self.manifest.model_version, stored, m.events_folded + n, new_wm, rows[i][3],
                               history_ts=rows[i][4])
            (records if m.row_version else fresh).append(rec)
            if m.row_version:
                expected[u] = m.row_version
        written: dict[str, int] = {}
        try:
            if records:
                written |= await asyncio.to_thread(self.store.put_many, records, expected)
        except StaleMemoryError as exc:  # another worker owns these users now: reload later
            self.counters.fold_conflicts += len(exc.users)
            self.forget(exc.users)
            records = []
        if fresh:
            written |= await asyncio.to_thread(self.store.put_many, fresh)
        for rec in records + fresh:
            self._remember(rec.user_id, CachedMemory(rec.tensor, rec.events_folded, rec.watermark, rec.history,
                                                     written[rec.user_id], rec.history_ts))
            if self.read_window(rec.user_id).seq - rec.watermark < self.manifest.recent_len + self.manifest.segment_len:
                self.fold_pending.discard(rec.user_id)  # else: another whole segment waits
        self.counters.folds += len(written)
        return len(written)


def _history_after(m: CachedMemory, seg: np.ndarray, seg_ts: np.ndarray, keep: int) -> tuple[np.ndarray, np.ndarray]:
    """RECOMPRESS: the last ``keep`` aged-out items (and times) once ``seg`` has aged out too. A
    row written before times were kept has none for its history: those items get time 0."""
    old = m.history if m.history is not None else np.zeros(0, np.int64)
    old_ts = m.history_ts if m.history_ts is not None else np.zeros(len(old), np.int64)
    return np.concatenate([old, seg])[-keep:], np.concatenate([old_ts, seg_ts])[-keep:]


def _as_stored(tensor: np.ndarray, dtype: str) -> np.ndarray:
    """The tensor exactly as it will read back from the store (so cache == database)."""
    data, dt, shape = encode_tensor(tensor, dtype)
    return decode_tensor(data, dt, shape)


def recommendation_message(r: RecRequest, recs: list[dict], model_version: str, m: CachedMemory,
                           window_len: int, now: float) -> dict:
    return {
        "user_id": r.user_id,
        "items": recs,
        "model_version": model_version,
        "memory_version": m.watermark,  # events folded into the memory used (0 = none)
        "memory_row_version": m.row_version,
        "window": window_len,  # known items after the watermark that the model read
        "seq": r.window.seq,  # the user's event count including this event
        "event_id": r.event_id,
        "event": r.source,
        "event_ts": r.event_ts,
        "emit_ts": now,
        "duplicate": r.duplicate,
    }
