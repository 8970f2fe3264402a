"""Reliability scenario 3: bad input mixed into real traffic neither crashes the worker nor
disturbs valid events.

ml-latest-small events in time order (short: 5,000; long: 30,000) are mixed with seeded hostile
traffic from ``persrec.testing.bad_events`` (short: 1,500 bad events; long: 10,000, of 37 kinds:
malformed JSON, non-UTF-8, wrong types, missing or null fields, huge or negative ids, NaN/inf,
timestamps far in the future or past, oversized payloads, empty values, null/empty/binary keys,
nesting too deep for the decoder...) and with tricky but valid traffic (exact duplicates, int
ids, ISO-8601 and out-of-order timestamps, no event id, extra fields, edge-case user ids, null or
wrong keys), all published to one real ``persrec worker`` (noida-db, tritonserver, SQLite). Then:

1. the worker never crashed: the same process still runs, its log has no traceback, its status
   counts every message (events in, dead letters, duplicates, re-keyed) and its lag is 0 on
   every partition (every offset was acknowledged);
2. the dead-letter topic holds each bad event exactly once (matched by its source offset), with
   its original key and bytes and the reason the generator expects;
3. every valid event got exactly one first-time recommendation, at its true position in its
   user's sequence; each exact duplicate got one more, flagged ``duplicate: true``;
4. every user's state equals their valid events: folded + window = all of them, each once.

Figures: bad events, valid events, duplicates, DLQ count (and per reason), crashes, wall time.
"""

from __future__ import annotations

import collections
import json
import re
import time
import urllib.parse
from pathlib import Path

import pytest
from kafka import KafkaProducer

from persrec.embedded.kafka import create_topics
from persrec.replay import events_in_time_order
from persrec.settings import Settings
from persrec.stack import WorkerProcess, get_json, wait_for
from persrec.testing.bad_events import KINDS, REKEYED, Message, build_traffic
from persrec.testing.pipeline import check_user_states, consume, events_by_user

pytestmark = [pytest.mark.reliability, pytest.mark.kafka, pytest.mark.triton, pytest.mark.slow]

SEED = 3
URL_SAFE = re.compile(r"[A-Za-z0-9_~-][A-Za-z0-9._~-]*")  # ids check_user_states can put in a URL as they are


@pytest.fixture
def bad_input_settings(worker_settings) -> Settings:
    return worker_settings()


@pytest.fixture
def worker(bad_input_settings, tmp_path):
    w = WorkerProcess(bad_input_settings, tmp_path / "worker.log", "badinput-worker")
    yield w
    w.stop()


def publish_all(bootstrap: str, topic: str, traffic: list[Message]) -> list[tuple[int, int]]:
    """Publish in order; returns each message's (partition, offset)."""
    producer = KafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=5,
                             max_in_flight_requests_per_connection=1)
    try:
        futures = [producer.send(topic, key=m.key, value=m.value) for m in traffic]
        producer.flush()
        return [(md.partition, md.offset) for md in (f.get(60) for f in futures)]
    finally:
        producer.close()


def process_alive(pid: int) -> bool:
    stat = Path(f"/proc/{pid}/stat")
    return stat.is_file() and stat.read_text().rsplit(")", 1)[1].split()[0] not in ("Z", "X")


def test_bad_input_goes_to_the_dlq_and_valid_traffic_is_unaffected(
        served_model, bad_input_settings, worker, scale, figures) -> None:
    settings = bad_input_settings
    n_valid, n_bad = (30_000, 10_000) if scale == "long" else (5_000, 1_500)
    bootstrap = settings.kafka_bootstrap
    create_topics(bootstrap, {settings.topic_interactions: settings.partitions,
                              settings.topic_recommendations: settings.partitions,
                              settings.topic_dlq: settings.partitions})
    worker.start()
    pid = worker.pid
    valid = list(events_in_time_order(served_model.interactions, n_valid))
    traffic = build_traffic(valid, n_bad, SEED, time.time())

    t0 = time.monotonic()
    where = publish_all(bootstrap, settings.topic_interactions, traffic)
    topic = settings.topic_interactions
    good = [(m, f"{topic}:{p}:{o}" if m.event["event_id"] is None else m.event["event_id"])
            for m, (p, o) in zip(traffic, where) if not m.bad]
    firsts = [(m, eid) for m, eid in good if not m.duplicate]
    n_dups = len(good) - len(firsts)
    n_rekeyed = sum(m.kind in REKEYED for m, _ in firsts)
    bad_at = {pos: m for m, pos in zip(traffic, where) if m.bad}
    assert len(bad_at) == n_bad and n_dups > 0 and n_rekeyed > 0

    recs = consume(bootstrap, settings.topic_recommendations, len(good), timeout=3600 if scale == "long" else 900)
    dlq = consume(bootstrap, settings.topic_dlq, n_bad, timeout=300)
    wait_for(lambda: (s := worker.status())["lag"] is not None and not any(s["lag"].values())
             and s["fold_backlog"] == 0, 180, "lag 0 and folds done")
    wall = time.monotonic() - t0

    # 1. no crash: same process, no traceback, every message counted, every offset acknowledged
    assert worker.pid == pid and process_alive(pid)
    log_text = worker.log_tail(10**7)
    crashes = log_text.count("Traceback") + len(re.findall(r"(?i)\bcrash", log_text))
    assert crashes == 0, worker.log_tail(80)
    status = worker.status()
    assert status["events_in"] == len(traffic) + n_rekeyed  # re-keyed events are read twice
    assert (status["dlq"], status["duplicates"], status["rerouted"]) == (n_bad, n_dups, n_rekeyed)
    assert status["recs_out"] == len(good)

    # 2. each bad event in the DLQ exactly once, with its key, bytes and expected reason
    sources = collections.Counter()
    by_reason = collections.Counter()
    for d in dlq:
        headers = dict(d.headers)
        source = json.loads(headers["source"])
        assert source["topic"] == topic
        pos = (source["partition"], source["offset"])
        sources[pos] += 1
        m = bad_at[pos]  # a KeyError here: a valid event was dead-lettered
        reason = headers["reason"].decode()
        assert reason == m.reason, (m.kind, m.value[:200] if m.value else m.value, headers["detail"])
        assert (d.key, d.value) == (m.key, m.value or b"") and headers["detail"]
        by_reason[reason] += 1
    assert set(sources) == set(bad_at) and max(sources.values()) == 1 and len(dlq) == n_bad

    # 3. one first-time answer per valid event, at its true position; one more per duplicate
    bodies = [json.loads(r.value) | {"_key": r.key} for r in recs]
    assert len(bodies) == len(good)
    by_user = events_by_user([m.event | {"event_id": eid} for m, eid in firsts])
    position = {e["event_id"]: (u, k + 1) for u, evs in by_user.items() for k, e in enumerate(evs)}
    first_answers = collections.Counter(b["event_id"] for b in bodies if not b["duplicate"])
    assert first_answers == collections.Counter(list(position))
    assert (collections.Counter(b["event_id"] for b in bodies if b["duplicate"])
            == collections.Counter(eid for m, eid in good if m.duplicate))
    id_map = served_model.id_map
    for b in bodies:
        user_id, seq = position[b["event_id"]]
        assert b["user_id"] == user_id and b["_key"] == user_id.encode(), b
        if not b["duplicate"]:
            assert b["seq"] == seq, b
        if seq == 1 and not b["duplicate"]:  # a new user with one unknown item is answered with an empty list
            assert bool(b["items"]) == (by_user[user_id][0]["item_id"] in id_map), b

    # 4. every user's state = their valid events, each once, the latest in the window
    safe = {u: evs for u, evs in by_user.items() if URL_SAFE.fullmatch(u)}
    total_folded = check_user_states([worker.api], safe)
    assert total_folded > n_valid // 4
    for user_id, events in by_user.items():
        if user_id in safe:
            continue
        code, body = get_json(f"{worker.api}/users/{urllib.parse.quote(user_id, safe='')}")
        assert code == 200 and body["user_id"] == user_id
        assert body["window"]["items"] == [e["item_id"] for e in events] and body["memory"] is None

    figures.record(
        valid_events=len(firsts), bad_events=n_bad, duplicates=n_dups, rerouted=n_rekeyed,
        users_checked_by_quoted_url=len(by_user) - len(safe), messages=len(traffic), bad_kinds=len(KINDS),
        dlq_messages=len(dlq), dlq_by_reason=dict(sorted(by_reason.items())), crashes=crashes,
        recommendations=len(bodies), events_folded=total_folded, wall_s=round(wall, 1),
        throughput_msgs_per_s=round(len(traffic) / wall, 1), seed=SEED,
    )
