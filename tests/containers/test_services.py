"""Each service container on its own, and the switch that puts the generic fixtures on them."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import textwrap
import uuid

import numpy as np
import pytest
from kafka import KafkaConsumer, KafkaProducer

from persrec.embedded.kafka import create_topics
from persrec.memory import SqlMemoryStore, migrate
from persrec.models.inputs import ModelInputs
from persrec.serving.inference import ModelRunner
from persrec.stream.triton import TritonModels

pytestmark = [pytest.mark.containers, pytest.mark.usefixtures("docker_daemon")]


def test_kafka_container_serves_a_partitioned_topic(kafka_container):
    bootstrap = kafka_container.bootstrap_servers
    topic = f"smoke-{uuid.uuid4().hex[:8]}"
    create_topics(bootstrap, {topic: 4})
    producer = KafkaProducer(bootstrap_servers=bootstrap, acks="all")
    for i in range(40):
        producer.send(topic, key=f"user-{i}".encode(), value=str(i).encode())
    producer.flush()
    producer.close()
    consumer = KafkaConsumer(topic, bootstrap_servers=bootstrap, auto_offset_reset="earliest",
                             consumer_timeout_ms=3000)
    try:
        records = list(consumer)
    finally:
        consumer.close()
    assert sorted(int(r.value) for r in records) == list(range(40))
    assert {r.partition for r in records} == {0, 1, 2, 3}


def test_postgres_container_runs_the_memory_store(container_database_url):
    migrate(container_database_url)
    store = SqlMemoryStore(container_database_url)
    assert store.count() == 0


def test_triton_container_serves_the_exported_models(served_triton, served_model):
    client = served_triton.client()
    try:
        index = {m["name"]: m.get("state") for m in client.get_model_repository_index()}
    finally:
        client.close()
    assert index == {"recommend": "READY", "fold": "READY"}
    # the container answers with the exported checkpoint: the same as the model run here
    shape = served_model.manifest.memory_shape
    x = ModelInputs.of_rows([[1, 2, 3], [7, 8]], [[0, 0, 0], [0, 0]],
                            memory=np.zeros((2, *shape), np.float32), has_memory=np.zeros(2, bool))

    async def ask():
        models = TritonModels(served_triton.grpc_url, timeout_s=30, max_attempts=2)
        try:
            return await models.recommend(x)
        finally:
            await models.close()

    ids, scores = asyncio.run(ask())
    want_ids, want_scores = ModelRunner(served_model.checkpoint, "cpu").recommend(x, served_model.manifest.top_k)
    assert np.array_equal(ids, want_ids) and np.allclose(scores, want_scores, atol=1e-5)


SWITCHED = """
    pytest_plugins = ["persrec.testing.kafka", "persrec.testing.postgres", "persrec.testing.triton"]
"""
PROBE = """
    from sqlalchemy.engine import make_url


    def test_generic_fixtures_are_the_containers(request, kafka_bootstrap, postgres_url):
        kafka = request.getfixturevalue("kafka_container")
        postgres = request.getfixturevalue("postgres_container")
        assert kafka_bootstrap == kafka.bootstrap_servers
        assert make_url(postgres_url).port == postgres.port(postgres.PORT)
        assert request.getfixturevalue("triton_factory") is request.getfixturevalue(
            "triton_container_factory")
"""


def test_services_option_puts_the_generic_fixtures_on_containers(tmp_path):
    """A suite written against the embedded fixtures (as tests/conftest.py loads them) gets
    containers from ``--persrec-services=containers``, with no change to the suite."""
    (tmp_path / "conftest.py").write_text(textwrap.dedent(SWITCHED))
    (tmp_path / "test_probe.py").write_text(textwrap.dedent(PROBE))
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "persrec.testing.containers",
         "--persrec-services=containers", "-p", "no:cacheprovider", "-q", str(tmp_path)],
        cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "1 passed" in done.stdout
