"""stream/members.py: which group members a starting worker may remove (never a live one)."""

import json
import os
import socket
import subprocess
import sys

import pytest

from persrec.stream import members


def test_only_members_recorded_dead_on_this_host_are_named(tmp_path) -> None:
    members.record(tmp_path, "alive-me")  # this process
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / "dead-1.json").write_text(json.dumps({"member_id": "dead-1", "host": socket.gethostname(),
                                                      "pid": dead.pid, "started": "1"}))
    # the pid runs, but it is another process than the one recorded (the pid was reused)
    (tmp_path / "reused.json").write_text(json.dumps({"member_id": "reused", "host": socket.gethostname(),
                                                      "pid": os.getpid(), "started": "not-this-start"}))
    (tmp_path / "elsewhere.json").write_text(json.dumps({"member_id": "elsewhere", "host": "another-host",
                                                         "pid": dead.pid, "started": None}))
    ids = ["alive-me", "dead-1", "reused", "elsewhere", "no-record"]
    assert members.known_dead(tmp_path, ids) == ["dead-1", "reused"]


def test_a_record_is_rewritten_atomically_per_member(tmp_path) -> None:
    members.record(tmp_path, "m/1")
    members.record(tmp_path, "m/1")
    body = json.loads((tmp_path / "m_1.json").read_text())
    assert body["pid"] == os.getpid() and body["member_id"] == "m/1"
    assert [p.name for p in tmp_path.iterdir()] == ["m_1.json"]


@pytest.mark.kafka
def test_a_member_id_the_consumer_gives_up_leaves_the_group(kafka_bootstrap) -> None:
    """aiokafka drops its member id when the broker refuses its generation and joins again as a
    new member; the old id must not stay behind for the next rebalance to wait for (on noida-db
    it stayed until the rebalance timeout, every time, so a busy group never settled)."""
    import asyncio
    import uuid

    from aiokafka import AIOKafkaConsumer
    from kafka import KafkaAdminClient

    from persrec.embedded.kafka import create_topics
    from persrec.stream.faust_adapter import install_abandoned_member_leave

    install_abandoned_member_leave()
    topic, group = f"members-{uuid.uuid4().hex[:8]}", f"g-{uuid.uuid4().hex[:8]}"
    create_topics(kafka_bootstrap, {topic: 2})
    admin = KafkaAdminClient(bootstrap_servers=kafka_bootstrap)

    def in_group() -> list[str]:
        return [m["member_id"] for m in admin.describe_groups([group])[group]["members"]]

    async def scenario() -> tuple[str, str, list[str]]:
        consumer = AIOKafkaConsumer(topic, bootstrap_servers=kafka_bootstrap, group_id=group)
        await consumer.start()
        try:
            coordinator = consumer._coordinator
            while not consumer.assignment():
                await asyncio.sleep(0.1)
            old = coordinator.member_id
            coordinator.reset_generation()  # what a refused commit or heartbeat does
            deadline = asyncio.get_running_loop().time() + 30
            while coordinator.member_id in ("", old) or not consumer.assignment() or old in in_group():
                assert asyncio.get_running_loop().time() < deadline, (old, coordinator.member_id, in_group())
                await asyncio.sleep(0.2)
            return old, coordinator.member_id, in_group()
        finally:
            await consumer.stop()

    try:
        old, new, members_now = asyncio.run(scenario())
    finally:
        admin.close()
    assert old != new and members_now == [new]
