"""Shared fixtures. Fixtures that start real services (broker, Triton, PostgreSQL) ship with
the package so users can import them in their own suites: see persrec/testing/."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from persrec.models.checkpoint import Checkpoint, make_checkpoint
from persrec.models.config import ModelConfig
from persrec.models.data import IdMap, build_sequences, data_dir
from persrec.models.logs import Interactions, load_interactions
from persrec.models.loss import build_model
from persrec.embedded._proc import free_ports
from persrec.serving.export import export_repository
from persrec.stream.manifest import Manifest
from persrec.settings import Settings
from persrec.stack import WorkerProcess

pytest_plugins = [
    "persrec.testing.kafka",
    "persrec.testing.triton",
    "persrec.testing.postgres",
    "persrec.testing.containers",
]

def pytest_addoption(parser):
    parser.addoption("--reliability", choices=["short", "long"], default="short",
                     help="size of tests/reliability scenarios (long = the figures of RELIABILITY.md)")


RATINGS = data_dir() / "ml-latest-small" / "ratings.csv"


@dataclass
class ServedModel:
    repository: Path
    checkpoint: Checkpoint
    manifest: Manifest
    id_map: IdMap
    interactions: Interactions


@pytest.fixture(scope="session")
def served_model(tmp_path_factory) -> ServedModel:
    if not RATINGS.is_file():
        pytest.fail(f"{RATINGS} is missing: the end-to-end tests replay ml-latest-small (set PERSREC_DATA_DIR)")
    inter = load_interactions(RATINGS)
    _, id_map = build_sequences(inter)
    cfg = ModelConfig(num_items=id_map.num_items, dim=32, head_dim=16, num_heads=2, num_memory_tokens=4,
                      recent_len=20, max_len=60, segment_len=10, dropout=0.0)  # a fold every 10 events
    torch.manual_seed(0)
    model = build_model(cfg)
    with torch.no_grad():  # random but non-trivial biases, so parity covers them
        model.backbone.bias.pos_w.normal_(0, 0.5)
    ck = make_checkpoint(model, id_map.to_json())
    repo = tmp_path_factory.mktemp("model_repository")
    # the cache's Triton metrics (test_soak reads them): nothing reloads this repository in place
    manifest = export_repository(ck, repo, top_k=10, window_cache_metrics=True)
    return ServedModel(repo, ck, manifest, id_map, inter)


@pytest.fixture(scope="session")
def triton(triton_factory, served_model):
    return triton_factory(served_model.repository, ["recommend", "fold"])


@pytest.fixture
def worker_settings(tmp_path, kafka_bootstrap, triton, served_model):
    """Settings for one isolated pipeline: its own topics, consumer group and SQLite file."""

    def make(**overrides) -> Settings:
        tag = uuid.uuid4().hex[:8]
        api_port, web_port = free_ports(2)
        base = dict(
            app_id=f"persrec-{tag}", kafka_bootstrap=kafka_bootstrap,
            topic_interactions=f"interactions-{tag}", topic_recommendations=f"recommendations-{tag}",
            topic_dlq=f"interactions-{tag}.dlq", topic_items=f"items-{tag}", partitions=4, triton_grpc_url=triton.grpc_url,
            model_repository=served_model.repository, work_dir=tmp_path / tag, api_port=api_port,
            worker_web_port=web_port, storage_dtype="float32",
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
