"""Pytest fixtures for a real Kafka-protocol broker (noida-db), started only when requested.

    def test_roundtrip(kafka_bootstrap, topic_factory):
        topic = topic_factory(partitions=4)

The broker is shared by the whole session; tests isolate themselves with fresh topic names.
A test that needs to stop or crash a broker starts its own ``EmbeddedKafka``.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Callable, Iterator, Mapping
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from persrec.embedded.kafka import EmbeddedKafka

TopicFactory = Callable[..., str]


@pytest.fixture(scope="session")
def embedded_kafka(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedKafka]:
    # Imported here so that loading the plugin costs nothing for tests without a broker.
    from persrec.embedded.kafka import EmbeddedKafka

    kafka = EmbeddedKafka(tmp_path_factory.mktemp("kafka") / "data")
    try:
        kafka.start()
        yield kafka
    finally:
        kafka.stop()


@pytest.fixture(scope="session")
def kafka_bootstrap(embedded_kafka: EmbeddedKafka) -> str:
    return embedded_kafka.bootstrap_servers


@pytest.fixture
def topic_factory(kafka_bootstrap: str, request: pytest.FixtureRequest) -> TopicFactory:
    """``make(partitions=1, configs=None, prefix=None) -> name``: creates a fresh topic."""
    from persrec.embedded.kafka import create_topics

    default_prefix = re.sub(r"[^a-zA-Z0-9._-]+", "-", request.node.name).strip("-")[:120]

    def make(partitions: int = 1, configs: Mapping[str, str] | None = None,
             prefix: str | None = None) -> str:
        name = f"{prefix or default_prefix}-{uuid.uuid4().hex[:8]}"
        create_topics(kafka_bootstrap, {name: partitions}, configs)
        return name

    return make


@pytest.fixture
def unique_topic(topic_factory: TopicFactory, request: pytest.FixtureRequest) -> str:
    """A fresh topic; one partition unless parametrized indirectly with the count."""
    return topic_factory(partitions=getattr(request, "param", 1))
