"""The whole pipeline on real services: noida-db broker, tritonserver, SQLite/PostgreSQL, and
real ``persrec worker`` processes; 20,000 ml-latest-small events plus injected bad ones."""

from __future__ import annotations

import collections
import json
import os
import random
import time

import pytest

from persrec.embedded._proc import free_ports
from persrec.embedded.kafka import create_topics
from persrec.replay import events_in_time_order
from persrec.stack import wait_for
from persrec.stream import window as win
from persrec.testing.pipeline import (check_user_states, consume, events_by_user, offline_top10, publish, same_top,
                                     whole_topic)

pytestmark = [pytest.mark.kafka, pytest.mark.triton, pytest.mark.slow]

N_EVENTS = int(os.environ.get("PERSREC_E2E_EVENTS", "20000"))
NOW = time.time()


def bad_events() -> list[tuple[bytes, bytes, str]]:
    """(key, value, expected reason) for events that must land in the dead-letter topic."""
    good = {"user_id": "1", "item_id": "1", "ts": 1_000_000_000}
    cases = [
        (b"{not json", "not_json"), (b"\xff\xfe\x00", "not_json"), (b"[1, 2]", "not_object"),
        (b"42", "not_object"), (json.dumps({"item_id": "1", "ts": 1}).encode(), "missing_field"),
        (json.dumps({"user_id": "1", "ts": 1}).encode(), "missing_field"),
        (json.dumps({"user_id": "1", "item_id": "1"}).encode(), "missing_field"),
        (json.dumps(good | {"user_id": 1.5}).encode(), "bad_type"),
        (json.dumps(good | {"user_id": True}).encode(), "bad_type"),
        (json.dumps(good | {"item_id": ["x"]}).encode(), "bad_type"),
        (json.dumps(good | {"user_id": -3}).encode(), "bad_value"),
        (json.dumps(good | {"item_id": 2**70}).encode(), "bad_value"),
        (json.dumps(good | {"user_id": ""}).encode(), "bad_value"),
        (json.dumps(good | {"user_id": "x" * 300}).encode(), "bad_value"),
        (b'{"user_id": "1", "item_id": "1", "ts": NaN}', "bad_value"),
        (b'{"user_id": "1", "item_id": "1", "ts": Infinity}', "bad_value"),
        (json.dumps(good | {"ts": NOW + 10 * 86400}).encode(), "ts_out_of_range"),
        (json.dumps(good | {"ts": -5}).encode(), "ts_out_of_range"),
        (json.dumps(good | {"ts": "yesterday"}).encode(), "bad_value"),
        (json.dumps(good | {"ts": None}).encode(), "bad_type"),
        (json.dumps(good | {"event_id": 7}).encode(), "bad_value"),
        (json.dumps(good | {"pad": "x" * 20_000}).encode(), "oversized"),
        (json.dumps({"op": "drop_table", "user_id": "1"}).encode(), "bad_value"),
    ]
    return [(b"1", value, reason) for value, reason in cases]


def build_traffic(served_model, seed: int = 0):
    """Valid events (in time order) with bad ones mixed in; returns (messages, valid, bad)."""
    valid = list(events_in_time_order(served_model.interactions, N_EVENTS))
    # Valid but special: items the model does not know, a brand-new user with only such items
    # (answered with an empty list), and events keyed by something else than their user.
    valid += [
        {"user_id": valid[0]["user_id"], "item_id": "never-seen-item", "ts": NOW, "event_id": "unknown-1"},
        {"user_id": "new-user-1", "item_id": "never-seen-item", "ts": NOW, "event_id": "cold-1"},
    ]
    messages = [(e["user_id"].encode(), json.dumps(e).encode()) for e in valid]
    for k in (100, N_EVENTS // 10, N_EVENTS * 3 // 4):  # re-keyed copies: the worker must route them to the right user
        e = dict(valid[k], event_id=f"rekeyed-{k}", ts=valid[k]["ts"])
        valid.append(e)
        messages.append((b"not-" + e["user_id"].encode(), json.dumps(e).encode()))
    bad = bad_events()
    rng = random.Random(seed)
    for key, value, _ in bad:
        messages.insert(rng.randrange(len(messages)), (key, value))
    return messages, valid, bad


def check_pipeline(served_model, settings, bootstrap, workers, valid, bad, *, parity_sample=150):
    by_user = events_by_user(valid)  # replay order, re-keyed copies last
    recs = consume(bootstrap, settings.topic_recommendations, len(valid), timeout=600)
    bodies = [json.loads(m.value) for m in recs]
    counts = collections.Counter(b["event_id"] for b in bodies)

    # 1. every valid event got exactly one recommendation
    assert set(counts) == {e["event_id"] for e in valid}
    assert max(counts.values()) == 1 and len(bodies) == len(valid)
    assert all(m.key.decode() == b["user_id"] for m, b in zip(recs, bodies))
    cold = [b for b in bodies if b["event_id"] == "cold-1"][0]
    assert cold["items"] == [] and cold["user_id"] == "new-user-1"

    # 2. the DLQ holds exactly the injected bad events, each with its reason
    dlq = consume(bootstrap, settings.topic_dlq, len(bad), timeout=60)
    got = collections.Counter((m.value, dict(m.headers)["reason"].decode()) for m in dlq)
    assert got == collections.Counter((v, r) for _, v, r in bad)

    # 3. folded + window = every event of the user, and the window is the user's latest events
    wait_for(lambda: all(w.status()["fold_backlog"] == 0 for w in workers), 120, "folds to finish")
    total_folded = check_user_states([w.api for w in workers], by_user)
    assert total_folded > N_EVENTS // 3  # folds really happened

    # 4. the windows' changelog, what a restarted worker restores, holds every event of every
    #    user, in fewer records than events: one write per user per batch, not one per event
    changelog = whole_topic(bootstrap, f"{settings.app_id}-windows-changelog")
    latest = {m.key.decode(): m.value for m in changelog}
    assert {u: win.decode(v).seq for u, v in latest.items()} == {u: len(e) for u, e in by_user.items()}
    assert len(changelog) < len(valid) // 2

    # 5. parity with the offline model on a sample of messages
    rng = random.Random(1)
    with_memory = [b for b in bodies if b["items"] and b["memory_version"] > 0]
    without = [b for b in bodies if b["items"] and b["memory_version"] == 0]
    assert with_memory and without
    half = parity_sample // 2
    sample = rng.sample(with_memory, min(half, len(with_memory))) + rng.sample(without, min(half, len(without)))
    for b in sample:
        ids, scores = offline_top10(served_model.checkpoint, served_model.id_map, by_user[b["user_id"]], b["memory_version"], b["seq"])
        assert same_top(b["items"], ids, scores), (b["event_id"], b["items"], ids, scores.tolist())
    return bodies


def run_pipeline(served_model, settings, start_worker, n_workers: int = 1):
    bootstrap = settings.kafka_bootstrap
    create_topics(bootstrap, {settings.topic_interactions: settings.partitions,
                              settings.topic_recommendations: settings.partitions,
                              settings.topic_dlq: settings.partitions})
    workers = []
    for i in range(n_workers):
        ports = (settings.api_port, settings.worker_web_port) if i == 0 else free_ports(2)
        workers.append(start_worker(settings.model_copy(update={"api_port": ports[0], "worker_web_port": ports[1]}),
                                    f"worker{i}"))
    if n_workers > 1:  # let the group settle so that no partition changes hands mid-replay
        time.sleep(8)
    messages, valid, bad = build_traffic(served_model)
    publish(bootstrap, settings.topic_interactions, messages)
    return workers, valid, bad


def test_end_to_end_sqlite(served_model, worker_settings, start_worker):
    settings = worker_settings()
    workers, valid, bad = run_pipeline(served_model, settings, start_worker)
    check_pipeline(served_model, settings, settings.kafka_bootstrap, workers, valid, bad)


@pytest.mark.postgres
def test_end_to_end_postgres(served_model, worker_settings, start_worker, postgres_url):
    settings = worker_settings(database_url=postgres_url)
    workers, valid, bad = run_pipeline(served_model, settings, start_worker)
    check_pipeline(served_model, settings, settings.kafka_bootstrap, workers, valid, bad)


def test_two_workers_split_partitions(served_model, worker_settings, start_worker):
    settings = worker_settings()
    workers, valid, bad = run_pipeline(served_model, settings, start_worker, n_workers=2)
    check_pipeline(served_model, settings, settings.kafka_bootstrap, workers, valid, bad)
    assert all(w.status()["events_in"] > 0 for w in workers)
