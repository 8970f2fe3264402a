"""A factory for isolated pipelines (own topics, group, DB) run by real ``persrec worker`` processes."""

from __future__ import annotations

import uuid

import pytest

from persrec.embedded._proc import free_ports
from persrec.settings import Settings
from persrec.stack import WorkerProcess


@pytest.fixture
def worker_settings(tmp_path, kafka_bootstrap, triton, served_model):
    """Settings for one isolated pipeline: its own topics, consumer group and SQLite file."""

    def make(**overrides) -> Settings:
        tag = uuid.uuid4().hex[:8]
        api_port, web_port = free_ports(2)
        base = dict(
            app_id=f"persrec-{tag}", kafka_bootstrap=kafka_bootstrap,
            topic_interactions=f"interactions-{tag}", topic_recommendations=f"recommendations-{tag}",
            topic_dlq=f"interactions-{tag}.dlq", partitions=4, triton_grpc_url=triton.grpc_url,
            model_repository=served_model.repository, work_dir=tmp_path / tag, api_port=api_port,
            worker_web_port=web_port, fold_every=10, storage_dtype="float32",
        )
        return Settings(**(base | overrides))

    return make


@pytest.fixture
def start_worker(tmp_path):
    started: list[WorkerProcess] = []

    def start(settings: Settings, name: str = "worker") -> WorkerProcess:
        w = WorkerProcess(settings, tmp_path / f"{name}-{len(started)}.log", name)
        started.append(w)
        return w.start()

    yield start
    for w in started:
        w.stop()
