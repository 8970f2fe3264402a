"""The status API on the same app factory the worker uses, against real services."""

from __future__ import annotations

import asyncio
import json

import numpy as np
import pytest
from aiohttp.test_utils import TestClient, TestServer
from kafka import KafkaConsumer

from persrec.embedded._proc import free_port
from persrec.memory import MemoryRecord, SqlMemoryStore, migrate
from persrec.serving.api import create_app
from persrec.settings import Settings


def run(app_settings: Settings, scenario) -> None:
    async def main():
        async with TestClient(TestServer(create_app(app_settings))) as client:
            await scenario(client)

    asyncio.run(main())


@pytest.fixture
def settings(tmp_path, served_model) -> Settings:
    db = f"sqlite:///{tmp_path / 'api.db'}"
    migrate(db)
    dead = f"127.0.0.1:{free_port()}"
    return Settings(work_dir=tmp_path, database_url=db, kafka_bootstrap=dead, triton_grpc_url=dead,
                    model_repository=served_model.repository)


def test_readyz_reports_each_dependency_that_is_down(settings) -> None:
    async def scenario(client):
        assert (await client.get("/healthz")).status == 200
        r = await client.get("/readyz")
        body = await r.json()
        assert r.status == 503 and body["ready"] is False
        assert body["checks"]["database"] == "ok"
        assert body["checks"]["broker"] != "ok" and body["checks"]["triton"] != "ok"

    run(settings, scenario)


@pytest.mark.kafka
@pytest.mark.triton
def test_ready_status_users_and_metrics(settings, kafka_bootstrap, topic_factory, triton, served_model) -> None:
    s = settings.model_copy(update={"kafka_bootstrap": kafka_bootstrap, "triton_grpc_url": triton.grpc_url,
                                    "topic_interactions": topic_factory(partitions=3)})
    store = SqlMemoryStore(s.resolved_database_url)
    tensor = np.ones(served_model.manifest.memory_shape, np.float32)
    store.put_many([MemoryRecord("u1", served_model.manifest.model_version, tensor, 30, 30, np.arange(1, 31))])
    store.put_many([MemoryRecord("old", "another-model", tensor, 5, 5)])

    async def scenario(client):
        r = await client.get("/readyz")
        assert r.status == 200, await r.text()
        status = await (await client.get("/status")).json()
        assert status["lag"] == {"0": 0, "1": 0, "2": 0}, status
        user = await (await client.get("/users/u1")).json()
        assert user["memory"]["events_folded"] == 30 and user["memory"]["history_len"] == 30
        assert user["memory"]["shape"] == list(served_model.manifest.memory_shape)
        missing = await client.get("/users/old")  # a memory of another model is not this model's state
        assert missing.status == 404 and "error" in await missing.json()
        bad = await client.get("/users/" + "x" * 300)
        assert bad.status == 400 and "user_id" in (await bad.json())["error"]
        metrics = await client.get("/metrics")
        assert metrics.status == 200
        spec = await (await client.get("/openapi.json")).json()
        assert "/users/{user_id}" in spec["paths"]

    run(s, scenario)


@pytest.mark.kafka
@pytest.mark.triton
def test_readyz_is_not_ready_while_triton_serves_another_version(settings, kafka_bootstrap, triton, served_model,
                                                                   tmp_path) -> None:
    """Workers call their manifest's Triton version; the API's readiness asks for that one."""
    from persrec.stream.manifest import MANIFEST

    manifest = json.loads((served_model.repository / MANIFEST).read_text())
    newer = tmp_path / "newer_repository"
    newer.mkdir()
    (newer / MANIFEST).write_text(json.dumps(manifest | {"triton_version": manifest["triton_version"] + 1}))
    s = settings.model_copy(update={"kafka_bootstrap": kafka_bootstrap, "triton_grpc_url": triton.grpc_url,
                                    "model_repository": newer})

    async def scenario(client):
        r = await client.get("/readyz")
        body = await r.json()
        assert r.status == 503 and body["checks"]["triton"] != "ok" and body["checks"]["broker"] == "ok"

    run(s, scenario)


@pytest.mark.kafka
def test_delete_needs_the_token_and_queues_an_erasure(settings, kafka_bootstrap, topic_factory) -> None:
    topic = topic_factory(partitions=4)
    no_token = settings.model_copy(update={"kafka_bootstrap": kafka_bootstrap, "topic_interactions": topic})

    async def disabled(client):
        r = await client.delete("/users/u1")
        assert r.status == 403

    run(no_token, disabled)
    with_token = Settings(**(no_token.model_dump() | {"api_token": "s3cret"}))

    async def scenario(client):
        assert (await client.delete("/users/u1")).status == 401
        assert (await client.delete("/users/u1", headers={"Authorization": "Bearer wrong"})).status == 401
        r = await client.delete("/users/u1", headers={"Authorization": "Bearer s3cret"})
        assert r.status == 202

    run(with_token, scenario)
    consumer = KafkaConsumer(topic, bootstrap_servers=kafka_bootstrap, auto_offset_reset="earliest",
                             consumer_timeout_ms=5000)
    messages = list(consumer)
    consumer.close()
    assert [(m.key, json.loads(m.value)) for m in messages] == [(b"u1", {"op": "delete_user", "user_id": "u1"})]
