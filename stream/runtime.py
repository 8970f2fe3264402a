"""What the worker does with a batch of requests, apart from Faust: memories, the model call,
the messages; and the folds that run beside it.

Recommendation path for a batch of requests (each: a user's window snapshot + its event):
  1. load the users' memories (``Memories``: LRU cache, then one batched DB read for misses) and
     pick the one each request may read (``Memories.for_request``);
  2. model input = window items after the memory's watermark, mapped to the model's item ids
     (``ItemReader``: items the model does not know are skipped);
  3. one Triton ``recommend`` call for the batch;
  4. one message per request (``messages.recommendation_message``), and the users with a whole
     segment to fold noted for ``Folds``.
"""

from __future__ import annotations

import collections
import logging
import time
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from persrec.memory import MemoryStore
from persrec.models.data import IdMap
from persrec.models.inputs import ModelInputs

from . import window as win
from .catalogue import Catalogue
from .folds import Folds
from .inputs import ItemReader
from .manifest import Manifest
from .memories import CachedMemory, Memories
from .messages import Counters, recommendation_message
from .triton import TritonModels

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StreamConfig:
    fold_batch: int = 256  # users per fold call
    storage_dtype: str = "float16"  # memory tensors in the DB
    cache_size: int = 100_000  # memories kept decoded in the worker


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
    # the user's memory when the request was queued (None: not loaded yet); see Memories.for_request
    memory: CachedMemory | None = None
    value: bytes = b""  # the event as it came, for the dead-letter topic if it cannot be processed
    runtime: Runtime | None = None  # the model that answers it (two during a switch: stream.switch)


class Runtime:
    def __init__(self, store: MemoryStore, models: TritonModels, id_map: IdMap, manifest: Manifest,
                 cfg: StreamConfig, read_window: Callable[[str], win.Window], counters: Counters | None = None) -> None:
        self.store, self.models, self.id_map, self.manifest, self.cfg = store, models, id_map, manifest, cfg
        self.read_window = read_window
        self.counters = Counters() if counters is None else counters  # shared by the runtimes of a switch
        self.memories = Memories(store, manifest.model_version, cfg.cache_size)
        self.reader = ItemReader(id_map, max(manifest.window_len, manifest.recent_len + manifest.history_len))
        # items registered since training (the items topic), for a model that reads their text
        self.catalogue = Catalogue(id_map, self.reader.index) if manifest.catalogue else None
        self.folds = Folds(self.memories, models, self.reader, manifest, read_window, self.counters,
                           batch=cfg.fold_batch, storage_dtype=cfg.storage_dtype, catalogue=self.catalogue)
        self.last_recs: collections.OrderedDict[str, dict] = collections.OrderedDict()

    def trimmed(self, user_id: str, w: win.Window) -> win.Window:
        """The window without what the model no longer reads: items folded into the user's
        cached memory, or, for a model without memory, items beyond its longest input."""
        if not self.manifest.has_memory:
            return win.trim(w, w.seq - self.manifest.window_len)
        cached = self.memories.get(user_id)
        return w if cached is None else win.trim(w, cached.watermark)

    def forget(self, user_ids) -> None:
        """Drop everything held of these users (erased)."""
        self.memories.forget(user_ids)
        for u in user_ids:
            self.last_recs.pop(u, None)
            self.folds.pending.discard(u)

    def request_queued(self, r: RecRequest) -> None:
        self.memories.queued(r)

    def request_done(self, r: RecRequest) -> None:
        self.memories.done(r)

    async def recommend_batch(self, reqs: list[RecRequest]) -> list[dict]:
        """One message per request, in order (one Triton call for the batch)."""
        current = await self.memories.load(list(dict.fromkeys(r.user_id for r in reqs)))
        used = [Memories.for_request(r, current[r.user_id]) for r in reqs]
        inputs = self.reader.read_batch([r.window for r in reqs], [r.user_id for r in reqs],
                                        [m.watermark for m in used], used)
        live = [i for i, (items, _) in enumerate(inputs) if len(items)]
        names: list[str] = []
        if live:
            top_ids, top_scores = await self.models.recommend(self.model_inputs(reqs, used, inputs, live))
            # the whole batch at once: per-row decoding was a tenth of the worker's time
            k = top_ids.shape[1]
            names = (self.id_map if self.catalogue is None else self.catalogue).decode(top_ids)
            values = np.round(top_scores.astype(np.float64).ravel(), 6).tolist()
        now, row_of, messages = time.time(), {i: row for row, i in enumerate(live)}, []
        for i, (r, m) in enumerate(zip(reqs, used)):
            if i in row_of:
                at = row_of[i] * k
                recs = [{"item_id": item, "score": s} for item, s in zip(names[at:at + k], values[at:at + k])]
            else:
                recs = []
                self.counters.cold_start += 1
            msg = recommendation_message(r, recs, self.manifest.model_version, m, len(inputs[i][0]), now)
            messages.append(msg)
            self._last(r.user_id, msg)
            self.folds.due(r.user_id, r.window.seq, current[r.user_id].watermark)
        return messages

    def model_inputs(self, reqs: list[RecRequest], used: list[CachedMemory],
                     inputs: list[tuple[np.ndarray, np.ndarray]], live: list[int]) -> ModelInputs:
        """The ``recommend`` inputs of the requests ``live`` (those with an item to read)."""
        width = max([self.manifest.window_len] + [len(inputs[i][0]) for i in live])
        memory = has = request_ts = None
        if self.manifest.has_memory:
            memory = np.zeros((len(live), *self.manifest.memory_shape), np.float32)
            has = np.array([used[i].tensor is not None for i in live])
            for row, i in enumerate(live):
                if has[row]:
                    memory[row] = used[i].tensor
        if self.manifest.request_time:  # the recommendation is asked for at its event's time
            request_ts = np.array([int(reqs[i].event_ts) for i in live], np.int64)
        catalogue = None if self.catalogue is None else self.catalogue.state(len(live))
        return ModelInputs.of_rows([inputs[i][0] for i in live], [inputs[i][1] for i in live], width,
                                   memory=memory, has_memory=has, request_ts=request_ts, catalogue=catalogue)

    def _last(self, user_id: str, msg: dict) -> None:
        self.last_recs[user_id] = msg
        self.last_recs.move_to_end(user_id)
        if len(self.last_recs) > self.cfg.cache_size:
            self.last_recs.popitem(last=False)
