"""Rebuild memories for a new model version from the history stored with the old ones.

A memory is only valid for the model that wrote it. The memories to make for the new model are
the old model's rows with no new row beside them, or a new row behind the old (``behind_users``):
a rebuild can run while the old model still serves (a shadow build), and again once it has
stopped, which then redoes only the users it folded meanwhile; for the RECOMPRESS policy the row
keeps the last aged-out items, so the new model recompresses them: old dense ids -> original ids
(old id map) -> new dense ids (items the new model does not know are dropped). Watermark and
fold count carry over, so the stream's windows stay consistent; the items' times (kept since the
row format has them) carry over too, for models with a time bias. INCREMENTAL memories keep no
raw history: ``rebuild_by_replay`` folds them again from the input topic (``replayed_histories``).
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
from persrec.stream.memories import carried

from .inference import ModelRunner

log = logging.getLogger(__name__)


@dataclass
class RebuildReport:
    rebuilt: int
    skipped_no_history: int
    seconds: float


def rebuild_memories(store: MemoryStore, old: Checkpoint, new: ModelRunner, *, batch_size: int = 256) -> RebuildReport:
    if new.cfg.policy is not MemoryPolicy.RECOMPRESS:
        raise ValueError("only RECOMPRESS memories can be rebuilt from stored history; replay events instead")
    old_map, new_map = IdMap.from_json(old.id_map_json), IdMap.from_json(new.checkpoint.id_map_json)
    history_len = new.cfg.max_len - new.cfg.recent_len
    started, rebuilt, skipped, after = time.monotonic(), 0, 0, ""
    while users := store.behind_users(old.model_version, new.model_version, batch_size, after):
        after = users[-1]
        rows = store.get_many(users, old.model_version)
        usable = [r for r in rows.values() if r.history is not None]
        skipped += len(users) - len(usable)
        if not usable:
            continue
        carry = carried(usable, old_map, new_map, history_len)
        store.put_many(carry.records(new.model_version, new.fold(carry.fold_inputs(new.cfg.memory_shape))))
        rebuilt += len(usable)
        log.info("rebuilt %d memories", rebuilt)
    return RebuildReport(rebuilt, skipped, time.monotonic() - started)


# ------------------------------------------------------------------ INCREMENTAL: by replay
def replayed_histories(bootstrap: str, topic: str, *, timeout_s: float = 600.0) -> dict[str, list[tuple[str, int]]]:
    """Each user's events, ``(item, ts)`` in order, as the worker applied them, read again from
    the input topic up to its current end: valid events keyed by their user (a mis-keyed one is
    applied from its re-keyed copy), each once (``stream.window.seen``, the worker's own rule),
    a ``delete_user`` starting the user over. Events are judged valid as of their append time."""
    from kafka import KafkaConsumer, TopicPartition

    from persrec.stream import window as win
    from persrec.stream.events import InvalidEvent, UserDeletion, parse_event

    consumer = KafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False, consumer_timeout_ms=1000,
                             max_partition_fetch_bytes=8 << 20)
    windows: dict[str, win.Window] = {}
    events: dict[str, list[tuple[str, int]]] = {}
    try:
        partitions = sorted(consumer.partitions_for_topic(topic) or ())
        deadline = time.monotonic() + timeout_s
        for p in partitions:  # a user's events all live in one partition, in offset order
            tp = TopicPartition(topic, p)
            consumer.assign([tp])
            consumer.seek_to_beginning(tp)
            end = consumer.end_offsets([tp])[tp]
            while consumer.position(tp) < end:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{topic}[{p}] not read to offset {end} in {timeout_s:.0f}s")
                for m in consumer:
                    try:
                        ev = parse_event(m.value, now=m.timestamp / 1000)
                    except InvalidEvent:
                        continue
                    if m.key != ev.user_id.encode():
                        continue  # the worker re-keyed it: its copy comes later in some partition
                    if isinstance(ev, UserDeletion):
                        windows.pop(ev.user_id, None)
                        events.pop(ev.user_id, None)
                        continue
                    event_id = ev.event_id or f"{m.topic}:{m.partition}:{m.offset}"
                    where = (m.topic, m.partition, m.offset)
                    w = windows.get(ev.user_id, win.Window())
                    if win.seen(w, event_id, where):
                        continue
                    windows[ev.user_id] = win.Window(w.seq + 1, [], [], win.append(w, event_id, "", 0, where).recent,
                                                     list(where))
                    events.setdefault(ev.user_id, []).append((ev.item_id, int(ev.ts)))
                    if m.offset + 1 >= end:
                        break
    finally:
        consumer.close()
    return events


def rebuild_by_replay(store: MemoryStore, old_version: str, new: ModelRunner, histories: dict[str, list[tuple[str, int]]],
                      *, batch_size: int = 256, max_minutes: float | None = None, progress=None) -> RebuildReport:
    """INCREMENTAL memories for ``new`` from the users' replayed events (``replayed_histories``):
    each user's first ``watermark`` events (the old row's) folded in order, in whole segments of
    the new model's ``segment_len`` and the rest as a last, shorter one, so the new memory holds
    exactly what the old one did and the stream's windows stay consistent. Resumable (users whose
    new row is level with the old are done) and bounded (``max_minutes``: stops after the batch
    that passes it); a user whose events the topic no longer holds all of is skipped.
    ``progress(done, skipped)`` after each batch."""
    if new.cfg.policy is not MemoryPolicy.INCREMENTAL:
        raise ValueError("rebuild by replay is for INCREMENTAL models; RECOMPRESS ones use rebuild_memories")
    id_map = IdMap.from_json(new.checkpoint.id_map_json)
    seg = new.cfg.segment_len
    started, rebuilt, skipped, after = time.monotonic(), 0, 0, ""
    while max_minutes is None or time.monotonic() - started < max_minutes * 60:
        users = store.behind_users(old_version, new.model_version, batch_size, after)
        if not users:
            break
        after = users[-1]
        rows = store.get_many(users, old_version)
        usable = [r for r in rows.values() if len(histories.get(r.user_id, ())) >= r.watermark]
        skipped += len(users) - len(usable)
        segments = []  # per user: (items, times) of each segment to fold, in order
        for r in usable:
            evs = histories[r.user_id][: r.watermark]
            cuts = list(range(0, r.watermark, seg)) + [r.watermark]
            segments.append([_known(evs[a:b], id_map) for a, b in zip(cuts, cuts[1:])])
        tensors = fold_in_order(new, segments)
        store.put_many([MemoryRecord(r.user_id, new.model_version, tensors[i], r.watermark, r.watermark)
                        for i, r in enumerate(usable)])
        rebuilt += len(usable)
        if progress is not None:
            progress(rebuilt, skipped)
        log.info("rebuilt %d memories by replay (%d skipped)", rebuilt, skipped)
    return RebuildReport(rebuilt, skipped, time.monotonic() - started)


def _known(events: list[tuple[str, int]], id_map: IdMap) -> tuple[np.ndarray, np.ndarray]:
    kept = [(i, t) for i, t in events if i in id_map]
    return id_map.encode([i for i, _ in kept]).astype(np.int64), np.array([t for _, t in kept], np.int64)


def fold_in_order(runner: ModelRunner, segments: list[list[tuple[np.ndarray, np.ndarray]]]) -> np.ndarray:
    """Each user's segments folded one after the other, users side by side: memories
    ``[U, L, 2, M, H, Dh]`` (a user with no segment gets the new-user memory's zeros row)."""
    memory = np.zeros((len(segments), *runner.cfg.memory_shape), np.float32)
    has = np.zeros(len(segments), bool)
    for j in range(max([len(s) for s in segments], default=0)):
        active = np.array([u for u, s in enumerate(segments) if j < len(s)])
        x = ModelInputs.of_rows([segments[u][j][0] for u in active], [segments[u][j][1] for u in active],
                                memory=memory[active], has_memory=has[active])
        memory[active] = runner.fold(x)
        has[active] = True
    return memory
