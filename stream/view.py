"""What the status API may see of a running worker: a typed, read-only view of its pipeline."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .pipeline import Pipeline


@dataclass(frozen=True)
class WindowState:
    events: int  # the user's events so far
    items_after_watermark: int  # events after the memory's watermark
    known_items: int  # of those, the items the model reads
    items: list[str]  # the events' items after the watermark, oldest first


class WorkerView:
    """Counters, fold backlog and per-user state of one worker (nothing to change them)."""

    def __init__(self, pipeline: Pipeline) -> None:
        self._pipeline = pipeline

    @property
    def triton_version(self) -> int | None:
        """The Triton version answering new events (after a switch: the new one)."""
        rt = self._pipeline.runtime
        return None if rt is None else rt.manifest.triton_version

    @property
    def memory_versions(self) -> list[str]:
        """Whose memory row holds a user's state, in order: the model answering new events, and
        during a switch the old one (a user the new model has not met yet is still in its rows)."""
        return [rt.manifest.model_version for rt in self._pipeline.runtimes()]

    @property
    def running(self) -> bool:
        """The worker's runtime exists (its event loop runs and its models are known)."""
        return self._pipeline.runtime is not None

    def counters(self) -> dict[str, Any]:
        rt = self._pipeline.runtime
        if rt is None:
            return {}
        c = rt.counters
        return {
            "events_in": c.events_in, "recs_out": c.recs_out, "dlq": c.dlq,
            "duplicates": c.duplicates, "rerouted": c.rerouted, "cold_start": c.cold_start,
            "offset_rewinds": c.offset_rewinds, "partition_stalls": self._pipeline.partitions.stalls,
            "recovery_stalls": self._pipeline.recovery.stalls,
            "folds": c.folds, "fold_backlog": len(rt.folds.pending), "batches": c.batches,
            "seconds_model": round(c.seconds_model, 3), "seconds_publish": round(c.seconds_publish, 3),
            "seconds_items": round(c.seconds_items, 3),
            "latency": c.latency_quantiles(), "model_version": rt.manifest.model_version,
            "items_in": c.items_in, "items_registered": c.items_registered, "items_updated": c.items_updated,
            "items_ignored": c.items_ignored, "catalogue": self.catalogue(),
            "item_latency": c.latency_quantiles("item_latencies_ms"),
            "switch": self.switch(),
        }

    def switch(self) -> dict[str, Any] | None:
        """The model switch this worker takes part in (stream.switch), if any."""
        switcher = self._pipeline.switcher
        return None if switcher is None or switcher.switching is None else switcher.switching.view()

    def catalogue(self) -> dict[str, Any] | None:
        """The items the model serves: trained, registered since, the newest registered (None
        for a model that reads items by id only)."""
        rt = self._pipeline.runtime
        cat = None if rt is None else rt.catalogue
        if cat is None:
            return None
        return {"items": cat.size, "trained": cat.base, "registered": len(cat.added), "changed": cat.changed, "revision": cat.revision,
                "newest": [{"item_id": r.item_id, "dense_id": r.dense_id, "revision": r.revision,
                            "updated_at": r.updated_at.isoformat()} for r in cat.newest]}

    def window(self, user_id: str, watermark: int) -> WindowState | None:
        rt = self._pipeline.runtime
        if rt is None:
            return None
        w = rt.read_window(user_id)
        items, _ = rt.reader.read(w, watermark)
        return WindowState(w.seq, w.seq - watermark, len(items), w.items[max(watermark - w.base, 0):])

    def last_recommendation(self, user_id: str) -> dict | None:
        rt = self._pipeline.runtime
        return None if rt is None else rt.last_recs.get(user_id)
