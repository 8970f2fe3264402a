"""Reliability scenario 5: a new model version is rolled out while events flow.

A real ``persrec worker`` serves model A (Triton version 1 of its own repository, float32
memories in SQLite) while a producer publishes ml-latest-small events in time order at a fixed
rate (short: 100 events/s, the switch after 20 s, 15 s more of traffic once the new worker is up;
long: 250 events/s through the whole file, 100,836 events, the switch after 40%). Mid-stream the
README's "Model change" procedure runs, the producer never pausing:

1. checkpoint B (A's config and id map, other weights, so another model version) is exported as
   Triton version 2 of the same repository and Triton loads it beside version 1 (the exported
   version policy keeps the newest two when one config serves both) while the old worker still
   runs: the old worker, pinned to version 1, goes on being answered by A, never by B;
2. the old worker is stopped;
3. ``persrec rebuild-memories REPO/recommend/1/checkpoint.pt`` (the real CLI) recompresses every
   stored memory with model B, keeping watermarks (and A's rows, for a rollback);
4. a worker on model B starts in the same consumer group and takes over from the committed
   offsets.

Proves:
- no event lost: every event answered at least once, extra messages are repeats of an event id,
  and model B answered every event published after its worker started;
- each message was computed by the model it names, with a memory of that model: every
  message's model_version is A or B, per user all A answers come before all B answers, and a
  sample of answers (every A answer emitted after B was loaded, the first B answer of users
  with a rebuilt memory, random others) equals the answer recomputed offline with the named
  model from the user's first ``memory_version`` events (memory) and the rest up to ``seq``
  (window);
- memories are rebuilt: after step 3 every user with an A memory has a B memory with the same
  events_folded, watermark and history, equal to B's compress of that history, and A's rows are
  kept (a rollback finds them) until ``persrec retire-memories A`` deletes them at the end; at
  the end folded + window = every user's events (``check_user_states``).

Figures: events, rate, rebuild (users, seconds, users/s, CLI wall time), the gap in answers
during the switch, repeats, answers checked offline.
"""

from __future__ import annotations

import collections
import os
import random
import re
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from persrec.embedded._proc import free_ports
from persrec.embedded.kafka import create_topics
from persrec.memory import SqlMemoryStore
from persrec.replay import events_in_time_order
from persrec.serving.export import export_repository
from persrec.settings import Settings
from persrec.stack import WorkerProcess, settings_env, wait_for
from persrec.stream.window import read_start
from persrec.testing.load import Collector, PacedProducer, wait_alive
from persrec.testing.pipeline import check_answer, check_user_states, events_by_user, other_weights

pytestmark = [pytest.mark.reliability, pytest.mark.kafka, pytest.mark.triton, pytest.mark.slow]

SEED = 7


@pytest.fixture
def repository(tmp_path, served_model, triton_factory):
    """Model A as version 1 of a repository of its own, served by a Triton of its own."""
    repo = tmp_path / "model_repository"
    export_repository(served_model.checkpoint, repo, top_k=10, version=1)
    server = triton_factory(repo, ["recommend", "fold"])
    yield repo, server
    server.stop()


@pytest.fixture
def rollout_settings(tmp_path, kafka_bootstrap, repository) -> Settings:
    repo, server = repository
    tag = f"rollout-{random.getrandbits(32):08x}"
    api_port, web_port = free_ports(2)
    return Settings(
        app_id=tag, kafka_bootstrap=kafka_bootstrap, topic_interactions=f"interactions-{tag}",
        topic_recommendations=f"recommendations-{tag}", topic_dlq=f"interactions-{tag}.dlq", partitions=4,
        triton_grpc_url=server.grpc_url, model_repository=repo, work_dir=tmp_path / tag,
        api_port=api_port, worker_web_port=web_port, storage_dtype="float32",
    )


@pytest.fixture
def workers(tmp_path):
    started: list[WorkerProcess] = []

    def start(settings: Settings, name: str) -> WorkerProcess:
        w = WorkerProcess(settings, tmp_path / f"{name}.log", name)
        started.append(w)
        return w.start()

    yield start
    for w in started:
        w.stop()


def test_rollout_while_events_flow(served_model, repository, rollout_settings, workers, scale, figures) -> None:
    settings = rollout_settings
    repo, server = repository
    # short: 100 events/s, the switch after 20 s of traffic, 15 s more once the new worker runs;
    # long: 250 events/s through the whole file, the switch after 40% of it
    n_max, rate = (100_836, 250.0) if scale == "long" else (20_000, 100.0)
    switch_at = int(n_max * 0.4) if scale == "long" else int(rate * 20)
    events = list(events_in_time_order(served_model.interactions, n_max))
    ck_a, ck_b = served_model.checkpoint, other_weights(served_model.checkpoint)
    version_a, version_b = ck_a.model_version, ck_b.model_version
    assert version_a != version_b
    checkpoints = {version_a: ck_a, version_b: ck_b}
    store = SqlMemoryStore(settings.resolved_database_url, storage_dtype="float32")

    bootstrap = settings.kafka_bootstrap
    create_topics(bootstrap, {settings.topic_interactions: settings.partitions,
                              settings.topic_recommendations: settings.partitions,
                              settings.topic_dlq: settings.partitions})
    recs = Collector(bootstrap, settings.topic_recommendations, keep_bodies=True)
    recs.start()
    old = workers(settings, "old-worker")
    producer = PacedProducer(bootstrap, settings.topic_interactions, iter(events), rate)
    producer.start()
    try:
        wait_alive(lambda: producer.sent >= switch_at, {"old worker": old.pid, "triton": server.pid}, 600,
                   "traffic before the switch")

        # 1. model B as Triton version 2, loaded beside version 1
        export_repository(ck_b, repo, top_k=10, version=2)
        server.load_model("recommend")
        server.load_model("fold")
        loaded_b_at = time.time()
        time.sleep(3)  # the old worker keeps running a while: it must not get model B's answers

        # 2. stop the old worker; its memories are A's
        old.stop()
        stopped_at = time.time()
        old_rows = store.get_many({e["user_id"] for e in events}, version_a)
        assert old_rows and store.count() == len(old_rows)

        # 3. rebuild with the real CLI
        t = time.monotonic()
        done = subprocess.run(
            [sys.executable, "-m", "persrec.cli", "rebuild-memories", str(repo / "recommend" / "1" / "checkpoint.pt")],
            env=dict(os.environ) | settings_env(settings) | {"COLUMNS": "300"},
            capture_output=True, text=True, timeout=600)
        rebuild_wall = time.monotonic() - t
        assert done.returncode == 0, done.stdout + done.stderr
        report = re.search(r"rebuilt (\d+) memories for (\w+) in ([\d.]+)s; (\d+) skipped", done.stdout)
        assert report, done.stdout
        rebuilt, rebuilt_for, rebuild_s, skipped = int(report[1]), report[2], float(report[3]), int(report[4])
        assert (rebuilt, rebuilt_for, skipped) == (len(old_rows), version_b, 0)
        new_rows = store.get_many(old_rows, version_b)
        assert set(new_rows) == set(old_rows) and store.count(version_a) == len(old_rows)  # kept for a rollback
        model_b = ck_b.build_model("cpu")
        for u, a in old_rows.items():
            b = new_rows[u]
            assert (b.events_folded, b.watermark) == (a.events_folded, a.watermark), u
            assert np.array_equal(b.history, a.history), u
            with torch.no_grad():
                expected = model_b.compress(torch.from_numpy(b.history)[None], torch.tensor([len(b.history)]))[0]
            assert np.allclose(b.tensor, expected.numpy(), atol=1e-5), u

        # 4. a worker on model B takes over
        t = time.monotonic()
        new = workers(settings, "new-worker")
        new_ready_s = time.monotonic() - t
        sent_at_new_ready = producer.sent
        if scale == "long":
            producer.join(n_max / rate + 600)
            assert producer.sent == n_max
        else:
            wait_alive(lambda: producer.sent >= sent_at_new_ready + rate * 15 or not producer.is_alive(),
                       {"new worker": new.pid}, 600,
                       "traffic after the switch")
            producer.stop()
            producer.join(60)
        assert producer.error is None and not producer.is_alive(), producer.error
        n_events = producer.sent
        events = events[:n_events]
        by_user = events_by_user(events)
        wait_alive(lambda: recs.count() >= n_events, {"new worker": new.pid, "triton": server.pid}, 600,
                   "every event answered")
        wait_for(lambda: (s := new.status())["lag"] is not None and not any(s["lag"].values())
                 and s["fold_backlog"] == 0, 120, "lag 0 and folds done")
        time.sleep(2)  # late repeats, if any, reach the collector
    finally:
        producer.stop()
        recs.close()
    with recs.lock:
        bodies = list(recs.bodies)

    # no event lost; repeats are repeats of an event id, of the right user
    known = {e["event_id"]: e["user_id"] for e in events}
    counts = collections.Counter(b["event_id"] for b in bodies)
    assert set(counts) == set(known)
    assert all(b["user_id"] == known[b["event_id"]] == b["_key"] for b in bodies)

    # every answer names A or B; per user, A answers come before B answers
    assert {b["model_version"] for b in bodies} == {version_a, version_b}
    fresh_b = sum(b["model_version"] == version_b and not b["duplicate"] for b in bodies)
    assert fresh_b >= n_events - sent_at_new_ready > 0  # the new model took the traffic
    per_user: dict[str, list[str]] = collections.defaultdict(list)
    for b in bodies:
        per_user[b["user_id"]].append(b["model_version"])
    for u, versions in per_user.items():
        switch = versions.index(version_b) if version_b in versions else len(versions)
        assert set(versions[switch:]) <= {version_b}, u

    # answers recomputed offline with the model each names
    rng = random.Random(SEED)
    a_late = [b for b in bodies if b["model_version"] == version_a and b["emit_ts"] >= loaded_b_at
              and b["items"]]
    # with both versions loaded the old worker was answered (by A) after B loaded, not stalled
    assert a_late, "no A answer after B was loaded: the old worker stalled"
    first_b = {}
    for b in bodies:
        if b["model_version"] == version_b and b["user_id"] not in first_b:
            first_b[b["user_id"]] = b
    first_b_rebuilt = [b for b in first_b.values() if b["memory_version"] > 0 and b["items"]]
    assert first_b_rebuilt, "no answer used a rebuilt memory"
    with_items = [b for b in bodies if b["items"]]
    capped = [b for b in with_items if b["seq"] - b["memory_version"] > b["window"]]  # folds lagged
    sample = (a_late[:200] + rng.sample(first_b_rebuilt, min(60, len(first_b_rebuilt)))
              + rng.sample(capped, min(40, len(capped))) + rng.sample(with_items, min(100, len(with_items))))
    for b in sample:
        check_answer(checkpoints, served_model.id_map, by_user, b, loaded_b_at)
    assert any(b["memory_version"] > 0 for b in sample if b["model_version"] == version_a)

    # final state: every event folded or in the window; A's memories untouched until retired
    total_folded = check_user_states([new.api], by_user)
    assert store.count(version_a) == len(old_rows) and store.count(version_b) > 0
    retired = subprocess.run([sys.executable, "-m", "persrec.cli", "retire-memories", version_a],
                             env=dict(os.environ) | settings_env(settings) | {"COLUMNS": "300"},
                             capture_output=True, text=True, timeout=120)
    assert retired.returncode == 0 and f"deleted {len(old_rows)} memories of {version_a}" in retired.stdout, retired
    assert store.count(version_a) == 0 and store.count(version_b) == store.count() > 0
    assert total_folded > n_events // 3

    a_emits = [b["emit_ts"] for b in bodies if b["model_version"] == version_a]
    b_emits = [b["emit_ts"] for b in bodies if b["model_version"] == version_b]
    figures.record(
        events=n_events, rate_eps=rate, switch_after_events=switch_at,
        events_after_new_worker_ready=n_events - sent_at_new_ready, users=len(by_user), messages=len(bodies),
        repeats=len(bodies) - len(counts),
        answered_by_a=sum(v == version_a for vs in per_user.values() for v in vs),
        answered_by_b=sum(v == version_b for vs in per_user.values() for v in vs),
        a_answers_after_b_loaded=len(a_late),
        rebuild_users=rebuilt, rebuild_s=rebuild_s, rebuild_users_per_s=round(rebuilt / rebuild_s, 1) if rebuild_s >= 0.1 else None,
        rebuild_cli_wall_s=round(rebuild_wall, 2), new_worker_ready_s=round(new_ready_s, 2),
        answer_gap_s=round(min(e for e in b_emits) - max(e for e in a_emits), 2),
        old_worker_stop_to_first_b_s=round(min(b_emits) - stopped_at, 2),
        answers_checked_offline=len(sample), events_folded=total_folded, seed=SEED,
        window_max=max(b["window"] for b in bodies),
        answers_window_capped=sum(b["seq"] - b["memory_version"] > b["window"] for b in bodies),
    )
