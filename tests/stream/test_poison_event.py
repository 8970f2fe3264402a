"""A poison event: the model raises on it (a Triton model that fails on one item as the last of
a row). The worker retries, bisects its batch, dead-letters that event with reason
``processing_error`` and the exception's text, and answers every other event: real broker,
tritonserver and SQLite."""

from __future__ import annotations

import collections
import json
import shutil

import pytest

from persrec.serving.export import export_repository
from persrec.testing.pipeline import consume, publish

from .test_worker_behaviour import events_of, topics

pytestmark = [pytest.mark.kafka, pytest.mark.triton, pytest.mark.slow]

POISONED_MODEL = '''"""The recommend model, except that a row whose last item is POISON raises (a test fault)."""
import triton_python_backend_utils as pb_utils

from persrec.triton_models.recommend.model import TritonPythonModel as Recommend

POISON = {poison}


class TritonPythonModel(Recommend):
    def execute(self, requests):
        for r in requests:
            items = pb_utils.get_input_tensor_by_name(r, "ITEMS").as_numpy()
            lengths = pb_utils.get_input_tensor_by_name(r, "LENGTHS").as_numpy().reshape(-1)
            if any(items[i, n - 1] == POISON for i, n in enumerate(lengths)):
                raise ValueError("poisoned item as the last of a row")
        return super().execute(requests)
'''


@pytest.fixture(scope="module")
def poisoned_triton(triton_factory, served_model, tmp_path_factory):
    repo = tmp_path_factory.mktemp("poisoned_repository")
    shutil.copytree(served_model.repository, repo, dirs_exist_ok=True)
    events = events_of(served_model, 3000)
    poison_item = collections.Counter(e["item_id"] for e in events).most_common(30)[-1][0]
    poison_id = int(served_model.id_map.encode([poison_item])[0])
    (repo / "recommend" / "1" / "model.py").write_text(POISONED_MODEL.replace("{poison}", str(poison_id)))
    server = triton_factory(repo, ["recommend", "fold"])
    yield server, repo, poison_item
    server.stop()


def test_a_poison_event_is_dead_lettered_and_the_rest_answered(served_model, worker_settings, start_worker,
                                                               poisoned_triton) -> None:
    server, repo, poison_item = poisoned_triton
    settings = worker_settings(model_repository=repo, triton_grpc_url=server.grpc_url)
    topics(settings)
    worker = start_worker(settings)
    events = events_of(served_model, 3000)
    poisoned = {e["event_id"] for e in events if e["item_id"] == poison_item}
    assert 3 <= len(poisoned) <= 100
    publish(settings.kafka_bootstrap, settings.topic_interactions,
            [(e["user_id"].encode(), json.dumps(e).encode()) for e in events])
    recs = consume(settings.kafka_bootstrap, settings.topic_recommendations, len(events) - len(poisoned), timeout=300)
    dlq = consume(settings.kafka_bootstrap, settings.topic_dlq, len(poisoned), timeout=120)
    answered = collections.Counter(json.loads(m.value)["event_id"] for m in recs)
    assert set(answered) == {e["event_id"] for e in events} - poisoned, (len(answered), len(dlq), worker.log_tail(60))
    assert max(answered.values()) == 1
    dead = {json.loads(m.value)["event_id"]: dict(m.headers) for m in dlq}
    assert set(dead) == poisoned
    for headers in dead.values():
        assert headers["reason"] == b"processing_error"
        assert b"poisoned item as the last of a row" in headers["detail"]
    assert worker.status()["dlq"] == len(poisoned)
