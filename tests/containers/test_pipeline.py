"""The worker image, two containers of it, on Kafka, PostgreSQL and Triton containers: the
checks of the embedded end-to-end test (tests/stream/test_end_to_end.py) on the images a
deployment runs. Fewer events than there (PERSREC_CONTAINERS_EVENTS, default 4000): the
services are the same code, this test is about the images and their wiring."""

from __future__ import annotations

import os
import time

import pytest

from persrec.embedded._proc import free_ports
from persrec.embedded.kafka import create_topics

from ..stream import test_end_to_end as e2e

# docker_daemon first: without Docker the test skips before building anything.
pytestmark = [pytest.mark.containers, pytest.mark.slow, pytest.mark.usefixtures("docker_daemon")]

EVENTS = int(os.environ.get("PERSREC_CONTAINERS_EVENTS", "4000"))


def test_two_worker_containers_on_postgres(served_model, container_settings,
                                           container_database_url, worker_container_factory,
                                           monkeypatch):
    monkeypatch.setattr(e2e, "N_EVENTS", EVENTS)
    settings = container_settings(database_url=container_database_url)
    create_topics(settings.kafka_bootstrap, {settings.topic_interactions: settings.partitions,
                                             settings.topic_recommendations: settings.partitions,
                                             settings.topic_dlq: settings.partitions})
    workers = []
    for i in range(2):  # host network: each worker needs host ports of its own
        api_port, web_port = free_ports(2)
        workers.append(worker_container_factory(
            settings.model_copy(update={"api_port": api_port, "worker_web_port": web_port}),
            f"worker{i}"))
    time.sleep(8)  # let the group settle, so that no partition changes hands mid-replay
    messages, valid, bad = e2e.build_traffic(served_model)
    e2e.publish(settings.kafka_bootstrap, settings.topic_interactions, messages)
    e2e.check_pipeline(served_model, settings, settings.kafka_bootstrap, workers, valid, bad)
    assert all(w.status()["events_in"] > 0 for w in workers)
