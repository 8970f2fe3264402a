"""The worker's output message and its counters."""

from __future__ import annotations

import collections
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from .memories import CachedMemory
    from .runtime import RecRequest


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
    items_in: int = 0  # messages read from the items topic
    items_registered: int = 0  # new items this worker added to the catalogue
    items_updated: int = 0  # items whose text this worker changed
    items_ignored: int = 0  # items for a model that reads items by id only
    seconds_items: float = 0.0  # registering items (encoder, database)
    latencies_ms: collections.deque = field(default_factory=lambda: collections.deque(maxlen=10_000))
    # item message published (its Kafka timestamp) -> served: in the catalogue every next request carries
    item_latencies_ms: collections.deque = field(default_factory=lambda: collections.deque(maxlen=10_000))

    def latency_quantiles(self, which: str = "latencies_ms") -> dict[str, float | None]:
        values = getattr(self, which)
        if not values:
            return {"p50_ms": None, "p99_ms": None}
        arr = np.fromiter(values, float)
        return {"p50_ms": float(np.percentile(arr, 50)), "p99_ms": float(np.percentile(arr, 99))}


def recommendation_message(r: RecRequest, recs: list[dict], model_version: str, m: CachedMemory,
                           window_len: int, now: float) -> dict:
    """One answer on the ``recommendations`` topic. ``memory_watermark``: how many of the
    user's events the memory used holds (0 = none); ``memory_version`` is its old name, kept
    for one release (README)."""
    return {
        "user_id": r.user_id,
        "items": recs,
        "model_version": model_version,
        "memory_watermark": m.watermark,
        "memory_version": m.watermark,  # deprecated: memory_watermark
        "memory_row_version": m.row_version,
        "window": window_len,  # known items after the watermark that the model read
        "seq": r.window.seq,  # the user's event count including this event
        "event_id": r.event_id,
        "event": r.source,
        "event_ts": r.event_ts,
        "emit_ts": now,
        "duplicate": r.duplicate,
    }
