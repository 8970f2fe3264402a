"""The recent window's keys/values, kept between a user's events (issue 20).

A PerSRec request is a user's memory plus recent items. Between two folds the memory does not
change and the window only grows at its end, so the keys/values of the items already seen can
be kept and each event computes its new item only (``PerSRec.extend_cache``), instead of the
whole window again.

The cache is keyed by what the answer depends on, not by who asks: the memory (its bytes, or
"new user"), and the row's first item and time. An entry holds the items and times it was
computed from; a request uses the longest common prefix of its row and the entry's, so a stale
entry (a fold changed the memory; a retried or reordered event) is never used wrongly, only
missed. Nothing is invalidated by hand except on a catalogue change, which can change items'
embeddings (``clear``).

A ``request_time`` model asks each item's query at the next item's time, so an item's
keys/values hold only while the next item's time is the same: the entry keeps them for all
but its row's last item, and the prefix must match one time further.

Entries are evicted least recently used first, within a byte budget.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import torch

SLACK = 32  # positions an entry's buffer is allocated beyond its row, for the next events
METRICS = "persrec_window_cache_"  # the Triton metrics' prefix (triton_models/recommend)


@dataclass
class Entry:
    """Keys/values of the first ``size`` items of the row ``items``/``ts``, position first:
    ``kv[:size]`` ``[size, L, 2, H, Dh]`` (``size`` = n, n - 1 for a request_time model) in a
    buffer with room for a few more, which the next events append to in place."""

    items: np.ndarray  # [n]
    ts: np.ndarray  # [n]
    kv: torch.Tensor  # [capacity, L, 2, H, Dh]
    size: int

    @property
    def nbytes(self) -> int:
        return self.kv.numel() * self.kv.element_size() + self.items.nbytes + self.ts.nbytes


def row_key(memory: np.ndarray | None, has_memory: bool, first_item: int, first_ts: int) -> tuple:
    """What a cached row's keys/values depend on besides its items: its memory (its bytes; a new
    user's is the model's own) and, so that new users do not share one entry, its first item and
    time. Exact: the key holds the bytes, not a digest of them."""
    mem = np.ascontiguousarray(memory).tobytes() if has_memory and memory is not None else b""
    return (first_item, first_ts, has_memory, mem)


def usable_prefix(entry: Entry, items: np.ndarray, ts: np.ndarray, request_time: bool) -> int:
    """How many of the entry's cached keys/values hold for a row ``items``/``ts`` (unpadded):
    those of the longest common prefix of the two rows, one fewer under ``request_time``
    (an item's query is asked at the next item's time, which must match too)."""
    n = min(len(entry.items), len(items))
    if entry.items[:n].tobytes() == items[:n].tobytes() and entry.ts[:n].tobytes() == ts[:n].tobytes():
        common = n  # the usual case: one row extends the other
    else:
        same = (entry.items[:n] == items[:n]) & (entry.ts[:n] == ts[:n])
        common = int(np.argmin(same))
    if request_time:
        common -= 1
    return max(0, min(common, entry.size))


def metrics_stats(samples: dict[str, float]) -> dict[str, float]:
    """The cache's figures (hits, misses, reused, evictions, entries, bytes) from Prometheus
    samples by name (``EmbeddedTriton.metrics(METRICS)``): prefix and counters' ``_total`` off."""
    return {name.removeprefix(METRICS).removesuffix("_total"): v for name, v in samples.items() if name.startswith(METRICS)}


def _cost(key: tuple, entry: Entry) -> int:
    """Bytes an entry holds, its key's memory bytes included."""
    return entry.nbytes + len(key[3])


class WindowCache:
    """Least-recently-used entries within ``max_bytes``; counts hits, misses and evictions."""

    def __init__(self, max_bytes: int, request_time: bool) -> None:
        self.max_bytes = max_bytes
        self.request_time = request_time
        self._entries: OrderedDict[tuple, Entry] = OrderedDict()
        self.nbytes = 0
        self.hits = self.misses = self.evictions = 0
        self.reused = 0  # items whose keys/values came from the cache

    def __len__(self) -> int:
        return len(self._entries)

    def lookup(self, key: tuple, items: np.ndarray, ts: np.ndarray, at_most: int) -> tuple[int, Entry | None]:
        """-> (p, entry): the first p (<= ``at_most``) items' keys/values are ``entry.kv[:p]``;
        (0, None) on a miss."""
        entry = self._entries.get(key)
        p = 0 if entry is None else min(at_most, usable_prefix(entry, items, ts, self.request_time))
        if p == 0:
            self.misses += 1
            return 0, None
        self._entries.move_to_end(key)
        self.hits += 1
        self.reused += p
        return p, entry

    def store(self, key: tuple, items: np.ndarray, ts: np.ndarray, entry: Entry | None, p: int,
              fresh: torch.Tensor) -> None:
        """Keep the keys/values of row ``items``/``ts``: ``entry.kv[:p]`` (the ones looked up)
        followed by ``fresh`` ``[m, L, 2, H, Dh]``. Appended in place when they extend the
        entry's own row and its buffer has room; else written to a new buffer. A row whose keys/values
        the key's entry holds already (an earlier event of the same user) changes nothing."""
        size = p + len(fresh)
        current = self._entries.get(key)
        if size == 0 or (current is not None and usable_prefix(current, items, ts, self.request_time) >= size):
            return  # nothing to keep, or the entry there holds it already (e.g. this row is an earlier event's)
        if entry is not None and p == entry.size and size <= len(entry.kv) and current is entry:
            entry.kv[p:size] = fresh
            self.nbytes -= entry.nbytes
            entry.items, entry.ts, entry.size = np.array(items, np.int64), np.array(ts, np.int64), size
            self.nbytes += entry.nbytes
            return
        kv = fresh.new_empty((size + SLACK, *fresh.shape[1:]))
        if p:
            kv[:p] = entry.kv[:p]
        kv[p:size] = fresh
        new = Entry(np.array(items, np.int64), np.array(ts, np.int64), kv, size)
        if _cost(key, new) > self.max_bytes:
            return
        if current is not None:
            self.nbytes -= _cost(key, self._entries.pop(key))
        self._entries[key] = new
        self.nbytes += _cost(key, new)
        while self.nbytes > self.max_bytes:
            self.nbytes -= _cost(*self._entries.popitem(last=False))
            self.evictions += 1

    def clear(self) -> None:
        self._entries.clear()
        self.nbytes = 0
