"""Rebuild memories for a new model version from the history stored with the old ones.

A memory is only valid for the model that wrote it. After a rollout, users whose memory was
written by the previous model are found with ``stale_users``; for the RECOMPRESS policy the row
keeps the last aged-out items, so the new model recompresses them: old dense ids -> original ids
(old id map) -> new dense ids (items the new model does not know are dropped). Watermark and
fold count carry over, so the stream's windows stay consistent; the items' times (kept since the
row format has them) carry over too, for models with a time bias. INCREMENTAL memories keep no
raw history and cannot be rebuilt this way (they need a replay of the user's events).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import numpy as np

from persrec.memory import MemoryRecord, MemoryStore
from persrec.models.checkpoint import Checkpoint
from persrec.models.config import MemoryPolicy
from persrec.models.data import IdMap
from persrec.models.inputs import ModelInputs

from .inference import ModelRunner

log = logging.getLogger(__name__)


@dataclass
class RebuildReport:
    rebuilt: int
    skipped_no_history: int
    seconds: float


def rebuild_memories(store: MemoryStore, old: Checkpoint, new: ModelRunner, *, batch_size: int = 256,
                     storage_dtype: str = "float16") -> RebuildReport:
    if new.cfg.policy is not MemoryPolicy.RECOMPRESS:
        raise ValueError("only RECOMPRESS memories can be rebuilt from stored history; replay events instead")
    old_map, new_map = IdMap.from_json(old.id_map_json), IdMap.from_json(new.checkpoint.id_map_json)
    history_len = new.cfg.max_len - new.cfg.recent_len
    started, rebuilt, skipped, seen = time.monotonic(), 0, 0, set()
    while True:
        users = [u for u in store.stale_users(new.model_version, batch_size + len(seen)) if u not in seen][:batch_size]
        if not users:
            break
        seen.update(users)
        rows = store.get_many(users, old.model_version)
        usable = [r for r in rows.values() if r.history is not None]
        skipped += len(users) - len(usable)
        if not usable:
            continue
        histories, times = [], []
        for r in usable:
            known = np.array([i in new_map for i in old_map.decode(r.history.tolist())], bool)
            original = old_map.decode(r.history[known].tolist())
            ts = r.history_ts if r.history_ts is not None else np.zeros(len(r.history), np.int64)
            histories.append(new_map.encode(original)[-history_len:])
            times.append(ts[known][-history_len:])
        memory = np.zeros((len(usable), *new.cfg.memory_shape), np.float32)
        tensors = new.fold(ModelInputs.of_rows(histories, times, memory=memory, has_memory=np.zeros(len(usable), bool)))
        store.put_many([
            MemoryRecord(r.user_id, new.model_version, tensors[i], r.events_folded, r.watermark, histories[i],
                         history_ts=times[i] if r.history_ts is not None else None)
            for i, r in enumerate(usable)
        ])
        rebuilt += len(usable)
        log.info("rebuilt %d memories", rebuilt)
    return RebuildReport(rebuilt, skipped, time.monotonic() - started)
