"""The items topic on the images a deployment runs: the worker image, the Triton image (which
follows the item catalogue in PostgreSQL) and the Kafka and PostgreSQL containers. The scenario
is tests/stream/test_items.py's."""

from __future__ import annotations

import pytest

from ..stream import test_items

pytestmark = [pytest.mark.containers, pytest.mark.slow, pytest.mark.usefixtures("docker_daemon")]


def test_a_published_item_is_recommended_on_the_images(served_model, container_settings, container_database_url,
                                                       triton_container_factory, worker_container_factory,
                                                       tmp_path) -> None:
    repo = tmp_path / "text_repository"
    ck, texts = test_items.text_repository(served_model, repo)
    # host network, like the workers: Triton reaches the database at the address they use
    triton = triton_container_factory(repo, ["recommend", "fold", "encode_items"], host_network=True,
                                      env={"PERSREC_DATABASE_URL": container_database_url})
    settings = container_settings(model_repository=repo, triton_grpc_url=triton.grpc_url,
                                  database_url=container_database_url)
    test_items.check_items(served_model, settings, worker_container_factory, ck, texts)
    triton.stop()
