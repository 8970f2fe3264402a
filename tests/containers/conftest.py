"""The containers suite: persrec's services, and its worker image, in Docker containers.

The fixtures come from the persrec.testing.containers plugin; ``scripts/containers-test.sh``
starts a Docker daemon, builds stand-in images where no registry is reachable, and runs this
directory. Fixture names here differ from the embedded ones (``triton``, ``worker_settings``),
so a run that also collects tests/stream keeps the two apart.
"""

from __future__ import annotations

import uuid

import pytest

from persrec.embedded._proc import free_ports
from persrec.settings import Settings

PLUGIN = "persrec.testing.containers"


def pytest_configure(config: pytest.Config) -> None:
    # Normally loaded by the top-level conftest (pytest_plugins) or `-p`; a conftest below the
    # top may not declare pytest_plugins, so load it here when it is missing.
    if not config.pluginmanager.has_plugin(PLUGIN):
        config.pluginmanager.import_plugin(PLUGIN)


@pytest.fixture(scope="session")
def served_triton(triton_container_factory, served_model):
    """The Triton image serving the test model (tests/conftest.py: served_model)."""
    return triton_container_factory(served_model.repository, ["recommend", "fold"])


@pytest.fixture
def container_database_url(postgres_container):
    with postgres_container.fresh_database() as url:
        yield url


@pytest.fixture
def container_settings(tmp_path, kafka_container, served_triton, served_model):
    """Settings for one isolated pipeline on the containers: own topics, group and ports."""

    def make(**overrides) -> Settings:
        tag = uuid.uuid4().hex[:8]
        api_port, web_port = free_ports(2)
        base = dict(
            app_id=f"persrec-{tag}", kafka_bootstrap=kafka_container.bootstrap_servers,
            topic_interactions=f"interactions-{tag}",
            topic_recommendations=f"recommendations-{tag}", topic_dlq=f"interactions-{tag}.dlq",
            topic_items=f"items-{tag}", partitions=4, triton_grpc_url=served_triton.grpc_url,
            model_repository=served_model.repository, work_dir=tmp_path / tag, api_port=api_port,
            worker_web_port=web_port, storage_dtype="float32",
        )
        return Settings(**(base | overrides))

    return make
