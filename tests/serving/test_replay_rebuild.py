"""INCREMENTAL memories rebuilt for a new model by reading the users' events again from the
input topic (a real broker): what the worker applied, each event once, folded up to the old
memory's watermark, equals a fresh offline fold of the same events."""

import json
import time

import numpy as np
import pytest
import torch

from persrec.embedded.kafka import create_topics
from persrec.memory import InMemoryMemoryStore, MemoryRecord
from persrec.models.checkpoint import make_checkpoint
from persrec.models.config import ModelConfig
from persrec.models.data import IdMap
from persrec.models.loss import build_model
from persrec.serving.inference import ModelRunner
from persrec.serving.rebuild import rebuild_by_replay, replayed_histories
from persrec.testing.pipeline import publish

pytestmark = [pytest.mark.kafka]
ITEMS = [f"m{i}" for i in range(40)]


def checkpoint(seed: int):
    cfg = ModelConfig(num_items=len(ITEMS), dim=16, head_dim=8, num_memory_tokens=3, recent_len=4, segment_len=5,
                      max_len=20, dropout=0.0, policy="incremental", time_bias=True, request_time=True,
                      bias_init_std=0.5)
    torch.manual_seed(seed)
    return make_checkpoint(build_model(cfg), IdMap(ITEMS).to_json())


def test_replayed_memories_equal_a_fresh_fold_of_the_same_events(kafka_bootstrap) -> None:
    topic = f"interactions-replay-{time.time_ns()}"
    create_topics(kafka_bootstrap, {topic: 3})
    rng = np.random.default_rng(0)
    applied = {u: [] for u in ("a", "b", "c")}
    messages = []
    for k in range(90):
        u = "abc"[k % 3]
        item = ITEMS[int(rng.integers(0, 40))] if k % 17 else "unknown-item"  # unknown items too
        e = {"user_id": u, "item_id": item, "ts": 1_000_000 + 37 * k, "event_id": f"e{k}"}
        messages.append((u.encode(), json.dumps(e).encode()))
        applied[u].append((item, e["ts"]))
        if k == 10:
            messages.append((u.encode(), json.dumps(e).encode()))  # a replayed event id: applied once
        if k == 20:
            messages.append((b"other", json.dumps(e | {"event_id": "e20-copy"}).encode()))  # mis-keyed: skipped
    messages.append((b"c", b"{not json"))  # dead-lettered by the worker: not applied
    messages.append((b"b", json.dumps({"op": "delete_user", "user_id": "b"}).encode()))
    messages.append((b"b", json.dumps({"user_id": "b", "item_id": "m1", "ts": 2_000_000, "event_id": "b-new"}).encode()))
    applied["b"] = [("m1", 2_000_000)]  # erased, then one event
    publish(kafka_bootstrap, topic, messages)

    histories = replayed_histories(kafka_bootstrap, topic, timeout_s=60)
    assert histories == applied

    old, new = checkpoint(0), ModelRunner(checkpoint(1), "cpu")
    store = InMemoryMemoryStore(storage_dtype="float32")
    zeros = np.zeros(old.config.memory_shape, np.float32)
    store.put_many([MemoryRecord("a", old.model_version, zeros, 22, 22),  # 4 segments of 5 and 2
                    MemoryRecord("c", old.model_version, zeros, 25, 25),
                    MemoryRecord("z", old.model_version, zeros, 5, 5)])  # no events in the topic
    report = rebuild_by_replay(store, old.model_version, new, histories, batch_size=2)
    assert (report.rebuilt, report.skipped_no_history) == (2, 1)
    rows = store.get_many(["a", "c"], new.model_version)
    model, id_map = new.model, IdMap(ITEMS)
    for u, wm in (("a", 22), ("c", 25)):
        assert (rows[u].watermark, rows[u].events_folded) == (wm, wm)
        memory, has = model.empty_memory(1), torch.tensor([False])
        with torch.no_grad():
            for a in range(0, wm, 5):
                seg = [(i, t) for i, t in applied[u][a:min(a + 5, wm)] if i in id_map]
                ids = torch.tensor([id_map.encode([i for i, _ in seg]).tolist() or [0]])
                ts = torch.tensor([[t for _, t in seg] or [0]])
                memory, has = model.fold(memory, has, ids, torch.tensor([len(seg)]), ts), torch.tensor([True])
        assert np.abs(rows[u].tensor - memory[0].numpy()).max() <= 1e-5, u
    # resumable: a second run finds nothing left to do
    assert rebuild_by_replay(store, old.model_version, new, histories).rebuilt == 0
