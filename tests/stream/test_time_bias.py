"""A request-time time-bias model served by the stream, under both memory policies: real broker,
tritonserver and SQLite. The request time is the event's ``ts``; a RECOMPRESS memory row keeps
the aged-out items' times, and folds take whole segments of the model's ``segment_len``, so the
memory the stream builds is the one the model builds offline from the same events. The third
model carries each INCREMENTAL memory into the next fold (``memory_carry``, with a nonzero
projection), so a stored memory depends on the user's whole chain of folds."""

from __future__ import annotations

import collections
import json
import random
import time

import numpy as np
import pytest
import torch

from persrec.memory.sql_store import SqlMemoryStore
from persrec.models.checkpoint import make_checkpoint
from persrec.models.config import ModelConfig
from persrec.models.loss import build_model
from persrec.serving.export import export_repository
from persrec.serving.window_cache import METRICS, metrics_stats
from persrec.stack import wait_for
from persrec.replay import events_in_time_order
from persrec.testing.pipeline import consume, events_by_user, offline_memory, offline_top10, publish, same_top

from .test_worker_behaviour import events_of, topics

pytestmark = [pytest.mark.kafka, pytest.mark.triton, pytest.mark.slow]


@pytest.fixture(scope="module", params=["recompress", "incremental", "incremental+carry"])
def timed_triton(request, triton_factory, served_model, tmp_path_factory):
    policy, carry = request.param.split("+")[0], request.param.endswith("+carry")
    cfg = ModelConfig(num_items=served_model.id_map.num_items, dim=32, head_dim=16, num_memory_tokens=4,
                      recent_len=20, max_len=60, segment_len=10, policy=policy, dropout=0.0,
                      time_bias=True, request_time=True, num_time_buckets=129, bias_init_std=0.5,
                      memory_carry=carry)
    torch.manual_seed(2)
    model = build_model(cfg)
    if carry:  # zero-initialised, the carry would change nothing
        torch.nn.init.normal_(model.carry.weight, std=0.2)
    ck = make_checkpoint(model, served_model.id_map.to_json())
    repo = tmp_path_factory.mktemp(f"timed_{policy}{'_carry' if carry else ''}")
    manifest = export_repository(ck, repo, window_cache_metrics=True)
    assert manifest.request_time
    server = triton_factory(repo, ["recommend", "fold"])
    yield server, repo, manifest, ck
    server.stop()


def test_request_time_model_serves_under_both_policies(served_model, worker_settings, start_worker, timed_triton) -> None:
    server, repo, manifest, ck = timed_triton
    settings = worker_settings(model_repository=repo, triton_grpc_url=server.grpc_url)
    topics(settings)
    worker = start_worker(settings)
    events = events_of(served_model, 3000)
    publish(settings.kafka_bootstrap, settings.topic_interactions,
            [(e["user_id"].encode(), json.dumps(e).encode()) for e in events])
    recs = [json.loads(m.value) for m in consume(settings.kafka_bootstrap, settings.topic_recommendations,
                                                 len(events), timeout=300)]
    assert sorted(b["event_id"] for b in recs) == sorted(e["event_id"] for e in events)
    wait_for(lambda: worker.status()["fold_backlog"] == 0, 60, "folds")
    time.sleep(1)
    by_user = events_by_user(events)
    rows = SqlMemoryStore(settings.resolved_database_url).get_many(list(by_user), manifest.model_version)
    assert sum(r.events_folded for r in rows.values()) > len(events) // 3
    for user_id, row in rows.items():
        if manifest.policy == "recompress":  # the row keeps the aged-out items' times
            folded = [e for e in by_user[user_id][:row.watermark] if e["item_id"] in served_model.id_map]
            assert row.history_ts.tolist() == [int(e["ts"]) for e in folded][-manifest.history_len:]
        else:
            assert row.history is None and row.history_ts is None
    # Every answer is the offline model's at the event's time, under both policies: folds take
    # whole segments, so a memory depends on the user's events only, not on when folds ran.
    candidates = [b for b in recs if b["items"]]
    assert any(b["memory_version"] > 0 for b in candidates)
    for b in random.Random(0).sample(candidates, min(120, len(candidates))):
        ids, scores = offline_top10(ck, served_model.id_map, by_user[b["user_id"]], b["memory_version"], b["seq"])
        assert same_top(b["items"], ids, scores), (b["event_id"], b["items"], ids)
    # ... and most were computed from the recent window's cached keys/values: a miss is a user's
    # first batch of events, or the first after each fold (53 users, ~170 folds here)
    cache = metrics_stats(server.metrics(METRICS))
    print("window cache:", cache)
    assert cache["hits"] >= 0.8 * len(events) and cache["reused"] > 5 * cache["hits"]


def test_a_lifelong_users_memory_equals_the_offline_fold(served_model, worker_settings, start_worker, timed_triton) -> None:
    """2,000 events of ml-latest-small's longest user: the memory the stream stores after
    ~200 folds (float32 storage) equals the offline fold of the same events, max |diff| <= 1e-5."""
    server, repo, manifest, ck = timed_triton
    settings = worker_settings(model_repository=repo, triton_grpc_url=server.grpc_url)
    topics(settings)
    inter = served_model.interactions
    longest = collections.Counter(inter.users.tolist()).most_common(1)[0][0]
    events = [e for e in events_in_time_order(inter) if e["user_id"] == longest][:2000]
    assert len(events) == 2000
    worker = start_worker(settings)
    publish(settings.kafka_bootstrap, settings.topic_interactions,
            [(e["user_id"].encode(), json.dumps(e).encode()) for e in events])
    consume(settings.kafka_bootstrap, settings.topic_recommendations, len(events), timeout=300)
    whole = (len(events) - manifest.recent_len) // manifest.segment_len * manifest.segment_len
    store = SqlMemoryStore(settings.resolved_database_url)
    def folded() -> bool:
        row = store.get_many([longest], manifest.model_version).get(longest)
        return row is not None and row.watermark == whole

    wait_for(folded, 240, "the last whole segment folded")
    row = store.get_many([longest], manifest.model_version)[longest]
    assert row.events_folded == whole and worker.status()["folds"] >= 1
    model = ck.build_model("cpu")
    expected = offline_memory(model, served_model.id_map, events[:whole])[0].numpy()
    assert np.abs(row.tensor - expected).max() <= 1e-5
    if manifest.policy == "recompress":
        return
    # Without the carry a memory holds only its last L - 1 segments: the same segments folded
    # after the first one instead of after ~200 give the same memory. The carry reads the chain.
    seg, last = manifest.segment_len, (model.cfg.num_layers - 1) * manifest.segment_len
    short_chain = offline_memory(model, served_model.id_map, events[:seg] + events[whole - last:whole])[0].numpy()
    assert (np.abs(short_chain - expected).max() > 1e-2) == model.cfg.memory_carry
