"""A model change while the worker runs (stream/switch.py, ``persrec switch``): real broker,
tritonserver with both versions loaded, SQLite.

Model A (Triton version 1) answers a first part of the traffic; ``persrec switch start 2 --from
1``; model B answers the rest without the worker stopping. Per input partition, every event before
the recorded switch offset is answered by A and every one from it by B; the event at the offset
is B's. B's memories are made from A's rows as users come, and every memory row of either model
is its model's compression of the user's aged-out events. A worker started during the switch
joins it with the recorded offsets. Then a rollback (``switch start 1 --from 2``) hands the next
events back to A, whose rows catch up from B's the same way."""

from __future__ import annotations

import dataclasses
import json
import random

import pytest
from typer.testing import CliRunner

from persrec.cli import app
from persrec.memory import SqlMemoryStore
from persrec.replay import events_in_time_order
from persrec.serving.export import export_repository
from persrec.stack import get_json, settings_env, wait_for
from persrec.testing.pipeline import check_answer, check_memory_rows, consume, events_by_user, other_weights, publish

from .test_worker_behaviour import topics

pytestmark = [pytest.mark.kafka, pytest.mark.triton, pytest.mark.slow]


@pytest.fixture
def two_versions(tmp_path, served_model, triton_factory):
    """Model A as version 1 and model B as version 2 of one repository, both loaded."""
    repo = tmp_path / "repository"
    ck_a, ck_b = served_model.checkpoint, other_weights(served_model.checkpoint)
    export_repository(ck_a, repo, top_k=10, version=1)
    export_repository(ck_b, repo, top_k=10, version=2)
    server = triton_factory(repo, ["recommend", "fold"])
    yield repo, server, ck_a, ck_b
    server.stop()


def test_a_switch_while_the_worker_runs_splits_each_partition_at_one_offset(
        served_model, worker_settings, start_worker, two_versions) -> None:
    repo, server, ck_a, ck_b = two_versions
    version_a, version_b = ck_a.model_version, ck_b.model_version
    settings = worker_settings(model_repository=repo, triton_grpc_url=server.grpc_url, triton_version=1)
    topics(settings)
    worker = start_worker(settings)
    boot, out = settings.kafka_bootstrap, settings.topic_recommendations
    events = list(events_in_time_order(served_model.interactions, 4500))
    phases = [events[:2000], events[2000:3500], events[3500:3800], events[3800:]]
    cli = lambda *args: CliRunner().invoke(app, list(args), env=settings_env(settings) | {"COLUMNS": "300"})  # noqa: E731
    store = SqlMemoryStore(settings.resolved_database_url, storage_dtype="float32")

    def run(phase: list[dict], answered: int) -> None:
        publish(boot, settings.topic_interactions, [(e["user_id"].encode(), json.dumps(e).encode()) for e in phase])
        consume(boot, out, answered + len(phase), timeout=300, settle=0)
        wait_for(lambda: worker.status()["fold_backlog"] == 0, 60, "folds")

    def switch(to: int, source: int, model: str) -> dict:
        done = cli("switch", "start", str(to), "--from", str(source))
        assert done.exit_code == 0, done.output
        wait_for(lambda: (worker.status().get("switch") or {}).get("to_version") == model, 30, "the switch taken up")
        return worker.status()["switch"]

    run(phases[0], 0)
    a_rows = store.get_many(list(events_by_user(events)), version_a)
    assert a_rows and store.count() == len(a_rows)
    assert switch(2, 1, version_b)["partitions"] == {}  # no event read since
    run(phases[1], 2000)
    to_b = worker.status()["switch"]
    # a worker started during the switch (restart, crash, scale-out) joins it with the recorded offsets
    worker.stop()
    worker = start_worker(settings, "restarted")
    wait_for(lambda: (worker.status().get("switch") or {}).get("partitions") == to_b["partitions"], 60, "the switch joined")
    run(phases[2], 3500)
    assert get_json(f"{worker.api}/readyz")[0] == 200  # it asks Triton for version 2 now
    run_back = switch(1, 2, version_a)  # the rollback
    run(phases[3], 3800)
    back = worker.status()["switch"]

    bodies = [json.loads(m.value) for m in consume(boot, out, len(events), timeout=60, settle=2)]
    assert {b["event_id"] for b in bodies} == {e["event_id"] for e in events}
    first = [{}, {}, {}, {}]  # per phase: partition -> its first offset
    phase_of = {e["event_id"]: i for i, p in enumerate(phases) for e in p}
    for b in bodies:
        i, (p, o) = phase_of[b["event_id"]], (b["event"]["partition"], b["event"]["offset"])
        first[i][p] = min(o, first[i].get(p, o))
        assert b["model_version"] == (version_b if i in (1, 2) else version_a), b["event_id"]
    # each partition switched at the first event read after the switch was taken up: that event is the new model's
    assert {int(p): o for p, o in to_b["partitions"].items()} == first[1]
    assert {int(p): o for p, o in back["partitions"].items()} == first[3] and run_back["partitions"] == {}
    # B's memories were made from A's rows for the users A had folded and B then answered
    phase_users = [{e["user_id"] for e in p} for p in phases]
    assert to_b["memories_made"] == len(set(a_rows) & phase_users[1]) > 0
    assert back["memories_made"] > 0

    by_user = events_by_user(events)
    checkpoints = {version_a: ck_a, version_b: ck_b}
    assert check_memory_rows(store, checkpoints, served_model.id_map, by_user) > len(a_rows)
    rng = random.Random(5)
    with_items = [b for b in bodies if b["items"]]
    made = [b for b in with_items if b["model_version"] == version_b and b["memory_watermark"] > 0]
    for b in rng.sample(with_items, 60) + rng.sample(made, min(30, len(made))):
        check_answer(checkpoints, served_model.id_map, by_user, b, 0.0)

    status = cli("switch", "status")
    assert status.exit_code == 0 and f"({version_a})" in status.output, status.output
    assert cli("switch", "finish").exit_code == 0 and "no switch" in cli("switch", "status").output


def test_a_switch_that_changes_the_streams_shape_is_refused(served_model, worker_settings, tmp_path) -> None:
    from persrec.models.checkpoint import make_checkpoint
    from persrec.models.loss import build_model

    repo = tmp_path / "repository"
    export_repository(served_model.checkpoint, repo, version=1)
    cfg = served_model.checkpoint.config
    other = build_model(dataclasses.replace(cfg, recent_len=cfg.recent_len + 5))
    export_repository(make_checkpoint(other, served_model.checkpoint.id_map_json), repo, version=2)
    settings = worker_settings(model_repository=repo)
    done = CliRunner().invoke(app, ["switch", "start", "2", "--from", "1"],
                              env=settings_env(settings) | {"COLUMNS": "300"})
    assert done.exit_code == 2 and "shape changes" in done.output, done.output
    done = CliRunner().invoke(app, ["switch", "start", "7", "--from", "1"], env=settings_env(settings) | {"COLUMNS": "300"})
    assert done.exit_code == 2 and "no version 7" in done.output, done.output
