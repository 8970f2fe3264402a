"""Rebuilding memories after a model change, from the history kept with RECOMPRESS memories."""

import numpy as np
import pytest
import torch

from persrec.memory import InMemoryMemoryStore, MemoryRecord
from persrec.models.checkpoint import make_checkpoint
from persrec.models.config import ModelConfig
from persrec.models.data import IdMap
from persrec.models.loss import build_model
from persrec.serving.inference import ModelRunner
from persrec.serving.rebuild import rebuild_memories


def checkpoint(items: list[str], seed: int, policy: str = "recompress"):
    cfg = ModelConfig(num_items=len(items), dim=16, head_dim=8, num_memory_tokens=3, recent_len=5,
                      max_len=20, dropout=0.0, policy=policy)
    torch.manual_seed(seed)
    return make_checkpoint(build_model(cfg), IdMap(items).to_json())


def test_rebuild_recompresses_stored_history_with_the_new_model() -> None:
    old = checkpoint([f"m{i}" for i in range(50)], 0)
    new_items = [f"m{i}" for i in range(49, -1, -1) if i != 7] + ["m-new"]  # reordered, m7 dropped
    new = ModelRunner(checkpoint(new_items, 1), "cpu")
    store = InMemoryMemoryStore(storage_dtype="float32")
    old_map = IdMap.from_json(old.id_map_json)
    hist = old_map.encode(["m3", "m7", "m10", "m11"])
    tensor = np.zeros(old.config.memory_shape, np.float32)
    store.put_many([
        MemoryRecord("a", old.model_version, tensor, 40, 40, hist),
        MemoryRecord("b", old.model_version, tensor, 9, 9, None),  # no history: cannot rebuild
    ])
    report = rebuild_memories(store, old, new)
    assert (report.rebuilt, report.skipped_no_history) == (1, 1)
    row = store.get_many(["a", "b"], new.model_version)
    assert list(row) == ["a"] and (row["a"].events_folded, row["a"].watermark) == (40, 40)
    mapped = IdMap(new_items).encode(["m3", "m10", "m11"])
    assert row["a"].history.tolist() == mapped.tolist()
    with torch.no_grad():
        expected = new.model.compress(torch.tensor([mapped]), torch.tensor([3]))[0].numpy()
    assert np.abs(row["a"].tensor - expected).max() < 1e-6


def test_incremental_memories_are_refused() -> None:
    with pytest.raises(ValueError, match="replay"):
        rebuild_memories(InMemoryMemoryStore(), checkpoint(["a", "b"], 0, "incremental"),
                         ModelRunner(checkpoint(["a", "b"], 1, "incremental"), "cpu"))


def test_export_of_a_request_time_recompress_model_takes_request_times(tmp_path) -> None:
    from persrec.serving.export import export_repository
    from persrec.stream.manifest import Manifest

    cfg = ModelConfig(num_items=5, dim=8, head_dim=4, num_memory_tokens=2, recent_len=2, max_len=8,
                      time_bias=True, request_time=True)
    ck = make_checkpoint(build_model(cfg), IdMap([str(i) for i in range(5)]).to_json())
    manifest = export_repository(ck, tmp_path)
    assert manifest.request_time and Manifest.read(tmp_path).request_time
    assert 'name: "REQUEST_TS"' in (tmp_path / "recommend" / "config.pbtxt").read_text()
    assert "REQUEST_TS" not in (tmp_path / "fold" / "config.pbtxt").read_text()


def test_a_shadow_rebuild_then_a_catch_up_redoes_only_the_users_the_old_model_moved_on() -> None:
    """rebuild-memories while the old model serves, then again once it stops: the second run
    rebuilds just the users the old model folded meanwhile, from their newest row."""
    items = [f"m{i}" for i in range(30)]
    old, new = checkpoint(items, 0), ModelRunner(checkpoint(items, 1), "cpu")
    store = InMemoryMemoryStore(storage_dtype="float32")
    tensor = np.zeros(old.config.memory_shape, np.float32)
    store.put_many([MemoryRecord(u, old.model_version, tensor, 20, 20, np.array([1, 2, 3 + k]))
                    for k, u in enumerate("abcd")])
    assert rebuild_memories(store, old, new, batch_size=3).rebuilt == 4  # the shadow build, in pages
    store.put_many([MemoryRecord("c", old.model_version, tensor, 30, 30, np.array([5, 6, 7, 8]))])  # old model folds on
    report = rebuild_memories(store, old, new, batch_size=3)
    assert report.rebuilt == 1
    row = store.get_many(["c"], new.model_version)["c"]
    assert (row.watermark, row.history.tolist()) == (30, [5, 6, 7, 8])
    with torch.no_grad():
        expected = new.model.compress(torch.tensor([[5, 6, 7, 8]]), torch.tensor([4]))[0].numpy()
    assert np.abs(row.tensor - expected).max() < 1e-6
    assert rebuild_memories(store, old, new).rebuilt == 0


def test_a_rollback_catches_the_old_models_memories_up_and_retires_the_new_ones(tmp_path) -> None:
    """The README's rollback, through the CLI: once model B (version 2) served and folded on,
    ``PERSREC_TRITON_VERSION=1 persrec rebuild-memories B.pt`` recompresses, with model A, just
    the users B moved past A's rows; retire-memories then keeps A (served) and deletes B."""
    from typer.testing import CliRunner

    from persrec.cli import app
    from persrec.memory import SqlMemoryStore, migrate
    from persrec.serving.export import export_repository

    items = [f"m{i}" for i in range(30)]
    a, b = checkpoint(items, 0), checkpoint(items, 1)
    repo, db = tmp_path / "repository", f"sqlite:///{tmp_path / 'memories.db'}"
    export_repository(a, repo, version=1)
    export_repository(b, repo, version=2)
    migrate(db)
    store = SqlMemoryStore(db, storage_dtype="float32")
    tensor = np.zeros(a.config.memory_shape, np.float32)
    store.put_many([MemoryRecord(u, a.model_version, tensor, 20, 20, np.array([1, 2, 3 + k]))
                    for k, u in enumerate("abc")])
    env = {"PERSREC_MODEL_REPOSITORY": str(repo), "PERSREC_DATABASE_URL": db, "PERSREC_STORAGE_DTYPE": "float32",
           "COLUMNS": "300"}
    cli = lambda *args, **extra: CliRunner().invoke(app, list(args), env=env | extra)  # noqa: E731

    done = cli("rebuild-memories", str(repo / "recommend" / "1" / "checkpoint.pt"))  # A -> B, version 2
    assert done.exit_code == 0 and "rebuilt 3 memories" in done.output, done.output
    store.put_many([MemoryRecord("c", b.model_version, tensor, 30, 30, np.array([5, 6, 7, 8]))])  # B folds on

    done = cli("rebuild-memories", str(repo / "recommend" / "2" / "checkpoint.pt"), PERSREC_TRITON_VERSION="1")
    assert done.exit_code == 0 and f"rebuilt 1 memories for {a.model_version}" in done.output, done.output
    rows = store.get_many(list("abc"), a.model_version)
    assert [rows[u].watermark for u in "abc"] == [20, 20, 30] and rows["c"].history.tolist() == [5, 6, 7, 8]
    with torch.no_grad():
        expected = a.build_model("cpu").compress(torch.tensor([[5, 6, 7, 8]]), torch.tensor([4]))[0].numpy()
    assert np.abs(rows["c"].tensor - expected).max() < 1e-6
    assert np.array_equal(rows["a"].tensor, tensor)  # A's rows B did not pass are as they were

    refused = cli("retire-memories", a.model_version, PERSREC_TRITON_VERSION="1")
    assert refused.exit_code == 2 and store.count(a.model_version) == 3  # A is served again
    done = cli("retire-memories", b.model_version, PERSREC_TRITON_VERSION="1")
    assert done.exit_code == 0 and store.count(b.model_version) == 0 and store.count() == 3, done.output
