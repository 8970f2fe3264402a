"""The embedded broker against real clients: kafka-python produces, aiokafka consumes."""

from __future__ import annotations

import asyncio
import socket
import time
from collections import Counter, defaultdict
from pathlib import Path

import pytest
from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition
from kafka import KafkaProducer

from persrec.embedded._proc import ServiceError, group_members, port_open
from persrec.embedded.kafka import EmbeddedKafka, create_topics

pytestmark = pytest.mark.kafka


def produce(bootstrap: str, topic: str, messages: list[tuple[str, str]]) -> None:
    producer = KafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=5)
    try:
        for key, value in messages:
            producer.send(topic, key=key.encode(), value=value.encode())
        producer.flush(timeout=30)
    finally:
        producer.close(timeout=10)


async def consume(bootstrap: str, topic: str, count: int, group_id: str | None = None,
                  timeout: float = 30.0) -> list[ConsumerRecord]:
    """Read ``count`` records (from the group's committed offsets, else the start) and commit."""
    consumer = AIOKafkaConsumer(
        topic, bootstrap_servers=bootstrap, group_id=group_id,
        auto_offset_reset="earliest", enable_auto_commit=False,
    )
    await consumer.start()
    try:
        records: list[ConsumerRecord] = []
        deadline = time.monotonic() + timeout
        while len(records) < count and time.monotonic() < deadline:
            batches = await consumer.getmany(timeout_ms=200)
            records.extend(r for batch in batches.values() for r in batch)
        # Nothing beyond `count` may be waiting.
        extra = await consumer.getmany(timeout_ms=500)
        records.extend(r for batch in extra.values() for r in batch)
        if group_id is not None:
            await consumer.commit()
        return records
    finally:
        await consumer.stop()


def contents(records: list[ConsumerRecord]) -> Counter[tuple[str, str]]:
    return Counter((r.key.decode(), r.value.decode()) for r in records)


def test_kafka_python_to_aiokafka_over_four_partitions(kafka_bootstrap, topic_factory):
    topic = topic_factory(partitions=4)
    messages = [(f"user-{i % 37}", f"event-{i}") for i in range(500)]

    produce(kafka_bootstrap, topic, messages)
    records = asyncio.run(consume(kafka_bootstrap, topic, len(messages)))

    assert len(records) == len(messages)
    assert contents(records) == Counter(messages)
    assert {r.partition for r in records} == {0, 1, 2, 3}
    # One key lands in one partition, in the order it was produced.
    by_key: dict[str, list[int]] = defaultdict(list)
    for r in sorted(records, key=lambda r: (r.partition, r.offset)):
        by_key[r.key.decode()].append(int(r.value.decode().removeprefix("event-")))
    assert all(seq == sorted(seq) for seq in by_key.values())
    assert all(len({r.partition for r in records if r.key == k}) == 1
               for k in {r.key for r in records})


def test_committed_offsets_and_data_survive_restart(tmp_path: Path):
    with EmbeddedKafka(tmp_path / "data") as kafka:
        bootstrap = kafka.bootstrap_servers
        create_topics(bootstrap, {"events": 4})
        first = [(f"k{i % 5}", f"a{i}") for i in range(100)]
        produce(bootstrap, "events", first)
        assert contents(asyncio.run(consume(bootstrap, "events", 100, "g1"))) == Counter(first)

        old_pid, port = kafka.pid, kafka.port
        kafka.restart()
        assert (kafka.port, kafka.bootstrap_servers) == (port, bootstrap)
        assert kafka.pid != old_pid
        assert not group_members(old_pid)

        second = [(f"k{i % 5}", f"b{i}") for i in range(50)]
        produce(bootstrap, "events", second)
        # The group resumes after what it committed before the restart ...
        assert contents(asyncio.run(consume(bootstrap, "events", 50, "g1"))) == Counter(second)
        # ... and everything written before the restart is still there.
        everything = asyncio.run(consume(bootstrap, "events", 150, "g2"))
        assert contents(everything) == Counter(first + second)


def test_end_offsets_after_restart(tmp_path: Path):
    """Partition end offsets must survive a restart (Faust table recovery relies on them)."""
    with EmbeddedKafka(tmp_path / "data") as kafka:
        create_topics(kafka.bootstrap_servers, {"t": 2})
        produce(kafka.bootstrap_servers, "t", [(f"k{i}", "v") for i in range(40)])
        before = asyncio.run(end_offsets(kafka.bootstrap_servers, "t", 2))
        kafka.restart()
        assert asyncio.run(end_offsets(kafka.bootstrap_servers, "t", 2)) == before
        assert sum(before.values()) == 40


async def end_offsets(bootstrap: str, topic: str, partitions: int) -> dict[int, int]:
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap)
    await consumer.start()
    try:
        tps = [TopicPartition(topic, p) for p in range(partitions)]
        return {tp.partition: o for tp, o in (await consumer.end_offsets(tps)).items()}
    finally:
        await consumer.stop()


def test_kill_stop_and_start_again(tmp_path: Path):
    kafka = EmbeddedKafka(tmp_path / "data").start()
    try:
        pid = kafka.pid
        kafka.kill()
        assert not kafka.running and not group_members(pid)
        assert not port_open("127.0.0.1", kafka.port)
        kafka.start()
        create_topics(kafka.bootstrap_servers, {"after-crash": 1})
        pid = kafka.pid
    finally:
        kafka.stop()
    assert not kafka.running and not group_members(pid)
    kafka.stop()  # stopping twice is harmless


def test_failed_start_reports_log_and_leaves_nothing(tmp_path: Path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        kafka = EmbeddedKafka(tmp_path / "data", port=taken.getsockname()[1], start_timeout=10)
        with pytest.raises(ServiceError, match="noida-db"):
            kafka.start()
    assert not kafka.running and not group_members(kafka.pid)


def test_create_topics_is_idempotent(kafka_bootstrap, topic_factory):
    name = topic_factory(partitions=3)
    assert create_topics(kafka_bootstrap, {name: 3}) == []
    compacted = f"{name}-compacted"
    assert create_topics(kafka_bootstrap, {compacted: 2}, {"cleanup.policy": "compact"}) == [
        compacted
    ]
    with pytest.raises(ValueError, match="3 partitions, wanted 5"):
        create_topics(kafka_bootstrap, {name: 5})


@pytest.mark.parametrize("unique_topic", [2], indirect=True)
def test_unique_topic_has_requested_partitions(kafka_bootstrap, unique_topic):
    assert asyncio.run(end_offsets(kafka_bootstrap, unique_topic, 2)) == {0: 0, 1: 0}


def test_missing_binary_points_to_setup(monkeypatch, tmp_path: Path):
    monkeypatch.setattr("importlib.util.find_spec", lambda name, *a: None)
    with pytest.raises(ServiceError, match="scripts/dev setup"):
        EmbeddedKafka(tmp_path / "data")
