"""A second worker joins, then leaves, while events flow: partitions change hands twice under
traffic (real broker, tritonserver, SQLite, ``persrec worker`` processes). Every event is
answered; an answer that applied its event saw it at its true place in the user's sequence (no
event applied twice or skipped); every user's state equals their event log afterwards.

Skipped on the embedded broker (noida-db 0.2.2), where a rebalance under traffic does not
converge: the busy member's commit fails with IllegalGeneration, it rejoins under a new member
id, the broker waits out its 60 s rebalance timeout for the old one, and the next generation
repeats it (seen here: generations 2 and 3 each formed twice in 3 minutes, partitions never
assigned to the newcomer). Since the worker takes the id it gave up out of the group at once
(``faust_adapter.install_abandoned_member_leave``; the broker answers the LeaveGroup with no
error) noida-db still waits out the 60 s, then answers the newcomer's join with an empty
assignment, which aiokafka cannot decode (``struct.error`` in its coordinator routine; tried
2026-12-06). It runs where the broker is Apache Kafka (``--persrec-services=
containers`` with ``PERSREC_KAFKA_IMAGE=apache/kafka:...``). Traffic is paced (40 events/s) so
that it lasts through both hand-overs."""

from __future__ import annotations

import collections

import pytest

from persrec.embedded._proc import free_ports
from persrec.stack import WorkerProcess, wait_for
from persrec.testing.load import Collector, PacedProducer
from persrec.testing.pipeline import check_user_states, events_by_user

from .test_worker_behaviour import events_of, topics


def members_of(bootstrap: str, group: str) -> list[str]:
    from kafka import KafkaAdminClient

    admin = KafkaAdminClient(bootstrap_servers=bootstrap)
    try:
        return [m["member_id"] for m in admin.describe_groups([group])[group]["members"]]
    finally:
        admin.close()

pytestmark = [pytest.mark.kafka, pytest.mark.triton, pytest.mark.slow]


def test_a_worker_joins_and_leaves_under_traffic(served_model, worker_settings, start_worker, tmp_path) -> None:
    settings = worker_settings()
    topics(settings)
    boot = settings.kafka_bootstrap
    first = start_worker(settings, "first")
    if "noida-client" in (next(iter(members_of(boot, settings.app_id)), "")):
        pytest.skip("noida-db 0.2.2 does not complete a rebalance under traffic (see the module docstring)")
    events = events_of(served_model, 6000)
    by_user = events_by_user(events)
    position = {e["event_id"]: (u, k + 1) for u, evs in by_user.items() for k, e in enumerate(evs)}
    recs = Collector(boot, settings.topic_recommendations, keep_bodies=True)
    recs.start()
    producer = PacedProducer(boot, settings.topic_interactions, iter(events), rate=40)
    producer.start()
    api_port, web_port = free_ports(2)
    second = WorkerProcess(settings.model_copy(update={"api_port": api_port, "worker_web_port": web_port}),
                           tmp_path / "second.log", "second")
    try:
        wait_for(lambda: recs.count() >= 400, 120, "answers before the join")
        second.start(timeout=300)
        wait_for(lambda: second.status()["events_in"] >= 100, 300, "the second worker to take partitions")
        joined_at = recs.count()
        wait_for(lambda: recs.count() >= joined_at + 400, 300, "answers with two workers")
        assert producer.is_alive()  # still under traffic
        second.stop()  # leaves: its partitions go back to the first worker, still under traffic
        producer.join(300)
        assert producer.error is None and producer.sent == len(events)
        wait_for(lambda: recs.count() >= len(events), 600, "every event answered")
        wait_for(lambda: first.status()["fold_backlog"] == 0, 120, "folds")
    finally:
        second.stop()
        recs.close()
    with recs.lock:
        bodies = list(recs.bodies)
    counts = collections.Counter(b["event_id"] for b in bodies)
    assert set(counts) == set(position)
    for b in bodies:
        user_id, seq = position[b["event_id"]]
        assert b["user_id"] == user_id == b["_key"]
        assert b["seq"] == seq if not b["duplicate"] else b["seq"] >= seq, (b, seq)
    assert check_user_states([first.api], by_user) > 0
