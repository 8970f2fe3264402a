"""Worker behaviour beyond the main pipeline: user erasure, and the incremental fold policy."""

from __future__ import annotations

import json
import time

import pytest
import torch

from persrec.embedded.kafka import create_topics
from persrec.memory import SqlMemoryStore
from persrec.models.checkpoint import make_checkpoint
from persrec.models.config import ModelConfig
from persrec.models.loss import build_model
from persrec.replay import events_in_time_order
from persrec.serving.export import export_repository
from persrec.stack import get_json, wait_for

from persrec.testing.pipeline import consume, publish

pytestmark = [pytest.mark.kafka, pytest.mark.triton]


def topics(settings) -> None:
    create_topics(settings.kafka_bootstrap, {settings.topic_interactions: settings.partitions,
                                             settings.topic_recommendations: settings.partitions,
                                             settings.topic_dlq: settings.partitions})


def events_of(served_model, n: int) -> list[dict]:
    return list(events_in_time_order(served_model.interactions, n))


def test_delete_user_erases_window_and_memory(served_model, worker_settings, start_worker) -> None:
    settings = worker_settings(api_token="t0ken")
    topics(settings)
    worker = start_worker(settings)
    events = events_of(served_model, 3000)
    victim = max({e["user_id"] for e in events}, key=lambda u: sum(e["user_id"] == u for e in events))
    publish(settings.kafka_bootstrap, settings.topic_interactions,
            [(e["user_id"].encode(), json.dumps(e).encode()) for e in events])
    consume(settings.kafka_bootstrap, settings.topic_recommendations, len(events), timeout=300, settle=0)
    wait_for(lambda: worker.status()["fold_backlog"] == 0, 60, "folds")
    code, before = get_json(f"{worker.api}/users/{victim}")
    assert code == 200 and before["memory"]["events_folded"] > 0

    import urllib.request
    req = urllib.request.Request(f"{worker.api}/users/{victim}", method="DELETE",
                                 headers={"Authorization": "Bearer t0ken"})
    with urllib.request.urlopen(req, timeout=10) as r:
        assert r.status == 202
    wait_for(lambda: get_json(f"{worker.api}/users/{victim}")[0] == 404, 30, "the erasure")
    store = SqlMemoryStore(settings.resolved_database_url)
    assert store.get_many([victim], served_model.manifest.model_version) == {}
    others = {e["user_id"] for e in events} - {victim}
    assert get_json(f"{worker.api}/users/{sorted(others)[0]}")[0] == 200


@pytest.fixture(scope="module")
def incremental_triton(triton_factory, served_model, tmp_path_factory):
    cfg = ModelConfig(num_items=served_model.id_map.num_items, dim=32, head_dim=16, num_memory_tokens=4,
                      recent_len=20, max_len=60, segment_len=10, policy="incremental", dropout=0.0)
    torch.manual_seed(1)
    ck = make_checkpoint(build_model(cfg), served_model.id_map.to_json())
    repo = tmp_path_factory.mktemp("incremental_repository")
    manifest = export_repository(ck, repo)
    return triton_factory(repo, ["recommend", "fold"]), repo, manifest


def test_incremental_policy_folds_every_event_once(served_model, worker_settings, start_worker,
                                                   incremental_triton) -> None:
    server, repo, manifest = incremental_triton
    settings = worker_settings(model_repository=repo, triton_grpc_url=server.grpc_url)
    topics(settings)
    worker = start_worker(settings)
    events = events_of(served_model, 4000)
    publish(settings.kafka_bootstrap, settings.topic_interactions,
            [(e["user_id"].encode(), json.dumps(e).encode()) for e in events])
    recs = consume(settings.kafka_bootstrap, settings.topic_recommendations, len(events), timeout=300)
    assert len({json.loads(m.value)["event_id"] for m in recs}) == len(events) == len(recs)
    wait_for(lambda: worker.status()["fold_backlog"] == 0, 60, "folds")
    time.sleep(1)
    per_user: dict[str, int] = {}
    for e in events:
        per_user[e["user_id"]] = per_user.get(e["user_id"], 0) + 1
    store = SqlMemoryStore(settings.resolved_database_url)
    rows = store.get_many(list(per_user), manifest.model_version)
    assert sum(r.events_folded for r in rows.values()) > len(events) // 3
    for user_id, n in per_user.items():
        body = get_json(f"{worker.api}/users/{user_id}")[1]
        folded = rows[user_id].events_folded if user_id in rows else 0
        assert folded + body["window"]["items_after_watermark"] == n
        if user_id in rows:
            assert rows[user_id].history is None  # the incremental policy keeps no raw history
