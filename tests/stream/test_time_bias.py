"""A request-time time-bias model served by the stream, under both memory policies: real broker,
tritonserver and SQLite. The request time is the event's ``ts``; a RECOMPRESS memory row keeps
the aged-out items' times, so the memory the stream builds is the one the model builds offline."""

from __future__ import annotations

import json
import random
import time

import pytest
import torch

from persrec.memory.sql_store import SqlMemoryStore
from persrec.models.checkpoint import make_checkpoint
from persrec.models.config import ModelConfig
from persrec.models.loss import build_model
from persrec.serving.export import export_repository
from persrec.stack import wait_for
from persrec.testing.pipeline import consume, events_by_user, offline_top10, publish, same_top

from .test_worker_behaviour import events_of, topics

pytestmark = [pytest.mark.kafka, pytest.mark.triton, pytest.mark.slow]


@pytest.fixture(scope="module", params=["recompress", "incremental"])
def timed_triton(request, triton_factory, served_model, tmp_path_factory):
    cfg = ModelConfig(num_items=served_model.id_map.num_items, dim=32, head_dim=16, num_memory_tokens=4,
                      recent_len=20, max_len=60, segment_len=10, policy=request.param, dropout=0.0,
                      time_bias=True, request_time=True, num_time_buckets=129, bias_init_std=0.5)
    torch.manual_seed(2)
    ck = make_checkpoint(build_model(cfg), served_model.id_map.to_json())
    repo = tmp_path_factory.mktemp(f"timed_{request.param}")
    manifest = export_repository(ck, repo, fold_every=10)
    assert manifest.request_time
    server = triton_factory(repo, ["recommend", "compress"])
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
    # Parity with the offline model at the event's time: every answer for RECOMPRESS, the
    # answers before a user's first fold for INCREMENTAL (whose memory depends on when folds ran).
    candidates = [b for b in recs if b["items"] and (manifest.policy == "recompress" or b["memory_version"] == 0)]
    assert any(b["memory_version"] > 0 for b in candidates) or manifest.policy == "incremental"
    for b in random.Random(0).sample(candidates, min(120, len(candidates))):
        ids, scores = offline_top10(ck, served_model.id_map, by_user[b["user_id"]], b["memory_version"], b["seq"])
        assert same_top(b["items"], ids, scores), (b["event_id"], b["items"], ids)
