"""The items topic end to end (issue 21): real broker, tritonserver (recommend, fold and
encode_items) and SQLite, with a PerSRec model that reads items by their text.

An item published while the model serves is recommended without a restart or a retrain; an
event for an item not in the catalogue yet stays in the window and is read once the item
arrives; bad item messages go to the dead-letter topic with their reason; a restarted worker
serves the same catalogue."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
import torch

from persrec.models.checkpoint import make_checkpoint
from persrec.models.config import ModelConfig
from persrec.models.data import data_dir
from persrec.models.inputs import ModelInputs
from persrec.models.loss import build_model
from persrec.models.text import HashingEncoder, item_texts, movielens_texts
from persrec.serving.export import export_repository
from persrec.serving.inference import ModelRunner
from persrec.stack import wait_for
from persrec.testing.pipeline import consume, publish, whole_topic

from .test_worker_behaviour import topics

pytestmark = [pytest.mark.kafka, pytest.mark.triton, pytest.mark.slow]

ENC = HashingEncoder(32)
T0 = 1_500_000_000


def text_repository(served_model, repo):
    """A PerSRec model that reads items by their text (hashing encoder, random weights),
    exported to ``repo``; returns its checkpoint and the trained items' texts."""
    texts = item_texts(served_model.id_map, movielens_texts(data_dir() / "ml-latest-small" / "movies.csv"))
    cfg = ModelConfig(num_items=served_model.id_map.num_items, dim=32, head_dim=16, num_heads=2, num_memory_tokens=4,
                      recent_len=20, max_len=60, segment_len=10, dropout=0.0, item_repr="text", text_dim=ENC.dim,
                      text_encoder=ENC.name)
    torch.manual_seed(3)
    model = build_model(cfg)
    model.item_emb.set_text(ENC.encode(texts))
    ck = make_checkpoint(model, served_model.id_map.to_json())
    manifest = export_repository(ck, repo)
    assert manifest.catalogue and manifest.triton_models == ["recommend", "fold", "encode_items"]
    return ck, texts


@pytest.fixture(scope="module")
def text_stack(triton_factory, served_model, tmp_path_factory):
    repo = tmp_path_factory.mktemp("text_repository")
    ck, texts = text_repository(served_model, repo)
    db_url = f"sqlite:///{tmp_path_factory.mktemp('text_db') / 'persrec.db'}"
    server = triton_factory(repo, ["recommend", "fold", "encode_items"], env={"PERSREC_DATABASE_URL": db_url})
    yield server, repo, ck, texts, db_url
    server.stop()


def item(item_id: str, text: str) -> tuple[bytes, bytes]:
    return item_id.encode(), json.dumps({"item_id": item_id, "text": text, "ts": T0}).encode()


def answers(bootstrap: str, topic: str, event_ids: list[str], timeout: float = 120.0) -> dict[str, dict]:
    """The recommendation of each of ``event_ids`` (waiting for them), by event id."""
    found: dict[str, dict] = {}
    deadline = time.monotonic() + timeout
    while set(event_ids) - set(found) and time.monotonic() < deadline:
        for m in consume(bootstrap, topic, 0, timeout=2, settle=0):
            body = json.loads(m.value)
            if body["event_id"] in event_ids:
                found[body["event_id"]] = body
    assert set(found) == set(event_ids), f"no answer to {set(event_ids) - set(found)}"
    return found


def event(user: str, item_id: str, n: int) -> tuple[bytes, bytes]:
    return user.encode(), json.dumps({"user_id": user, "item_id": item_id, "ts": T0 + n, "event_id": f"{user}-{n}"}).encode()


def test_a_published_item_is_recommended_without_a_restart(served_model, worker_settings, start_worker, text_stack) -> None:
    server, repo, ck, texts, db_url = text_stack
    settings = worker_settings(model_repository=repo, triton_grpc_url=server.grpc_url, database_url=db_url)
    check_items(served_model, settings, start_worker, ck, texts)


def check_items(served_model, settings, start_worker, ck, texts) -> None:
    """The scenario, on any worker (``start_worker(settings, name)``: a process or a container)."""
    topics(settings)
    worker = start_worker(settings)
    boot = settings.kafka_bootstrap
    # The model's favourite after three films, offline: a new item with the same text is its twin.
    history = ["1", "50", "260"]
    dense = served_model.id_map.encode(history).tolist()
    x = ModelInputs.of_rows([dense], [[T0, T0 + 1, T0 + 2]],
                            memory=np.zeros((1, *ck.config.memory_shape), np.float32), has_memory=np.array([False]))
    top = served_model.id_map.decode(ModelRunner(ck, "cpu").recommend(x, 1)[0])[0]

    # 1. an event for an item nobody published yet: kept, not read
    publish(boot, settings.topic_interactions, [event("early", "1", 0), event("early", "late-film", 1)])
    first = answers(boot, settings.topic_recommendations, ["early-0", "early-1"])
    assert [first["early-0"]["window"], first["early-1"]["window"]] == [1, 1]

    # 2. the items, and bad item messages
    bad = [(b"x", b"{oops", "not_json"), (b"x", json.dumps({"item_id": "x", "ts": T0}).encode(), "missing_field"),
           (b"x", json.dumps({"item_id": "x", "text": 7, "ts": T0}).encode(), "bad_type"),
           (b"x", json.dumps({"item_id": "x", "text": "  ", "ts": T0}).encode(), "bad_value"),
           (b"x", json.dumps({"text": "a film", "ts": T0}).encode(), "missing_field")]
    publish(boot, settings.topic_items, [item("twin-film", texts[served_model.id_map.encode([top])[0] - 1]),
                                         item("late-film", "A late film (2030) | Drama")]
            + [(k, v) for k, v, _ in bad])
    wait_for(lambda: (worker.status().get("catalogue") or {}).get("registered") == 2, 120, "two items registered")
    status = worker.status()
    assert status["items_in"] == 7 and status["items_registered"] == 2 and status["seconds_items"] > 0
    assert status["catalogue"]["items"] == served_model.id_map.num_items + 2
    assert {n["item_id"] for n in status["catalogue"]["newest"]} == {"twin-film", "late-film"}
    dlq = [m for m in whole_topic(boot, settings.topic_dlq)
           if json.loads(dict(m.headers)["source"])["topic"] == settings.topic_items]
    assert sorted(dict(m.headers)["reason"].decode() for m in dlq) == sorted(r for _, _, r in bad)

    # 3. the next recommendations: the twin beside its original, the late film read in the window
    publish(boot, settings.topic_interactions,
            [event("probe", i, n) for n, i in enumerate(history)] + [event("early", "2", 2)])
    recs = answers(boot, settings.topic_recommendations, ["probe-2", "early-2"])
    answer = recs["probe-2"]
    scores = {r["item_id"]: r["score"] for r in answer["items"]}
    assert "twin-film" in scores and top in scores and abs(scores["twin-film"] - scores[top]) < 1e-4
    assert recs["early-2"]["window"] == 3  # 1, late-film, 2

    # 4. a restarted worker serves the same catalogue, read from the database
    worker.stop()
    worker = start_worker(settings, "restarted")
    wait_for(lambda: (worker.status().get("catalogue") or {}).get("registered") == 2, 60, "catalogue after restart")
    publish(boot, settings.topic_interactions, [event("probe2", i, n) for n, i in enumerate(history)])
    assert answers(boot, settings.topic_recommendations, ["probe2-2"])["probe2-2"]["items"] == answer["items"]


def test_a_catalogue_triton_cannot_read_is_an_outage_not_a_bad_input(text_stack, triton_factory, served_model) -> None:
    """Triton without the database (here: no PERSREC_DATABASE_URL) answers a request that needs
    catalogue rows with an error the worker retries and waits out: never a dead letter."""
    import asyncio

    from persrec.stream.triton import TritonModels, TritonUnavailable

    _, repo, ck, _, _ = text_stack
    server = triton_factory(repo, ["recommend"])
    x = ModelInputs.of_rows([[1, 2, 3]], [[T0, T0 + 1, T0 + 2]], memory=np.zeros((1, *ck.config.memory_shape), np.float32),
                            has_memory=np.array([False]), catalogue=np.array([[0, served_model.id_map.num_items]]))

    async def calls():
        models = TritonModels(server.grpc_url, timeout_s=5, max_attempts=2, version="1")
        ids, _ = await models.recommend(x)  # revision 0: nothing to read
        assert ids.shape == (1, 10)
        x.catalogue = np.array([[1, served_model.id_map.num_items + 1]])
        with pytest.raises(TritonUnavailable, match="PERSREC_DATABASE_URL is not set"):
            await models.recommend(x)
        await models.close()

    asyncio.run(calls())
    server.stop()
