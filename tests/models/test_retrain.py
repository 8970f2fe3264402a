"""Continuous training (issue 22, item 3): the split of the newest events, the gate, and
``persrec retrain`` on ml-latest-small."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from persrec.cli import app
from persrec.models.checkpoint import load_checkpoint, make_checkpoint, save_checkpoint
from persrec.models.config import ModelConfig
from persrec.models.data import IdMap, SequenceData, build_sequences, data_dir
from persrec.models.logs import Interactions, load_interactions
from persrec.models.loss import build_model
from persrec.models.retrain import gate, known_sequences, retrain_split

RATINGS = data_dir() / "ml-latest-small" / "ratings.csv"


def test_each_recent_user_holds_out_their_newest_event() -> None:
    seqs = SequenceData(["old", "recent", "only-new"],
                        [np.array([1, 2, 3]), np.array([4, 5, 6, 7]), np.array([8])],
                        [np.array([10, 20, 30]), np.array([10, 20, 100, 110]), np.array([105])])
    split = retrain_split(seqs, since=100)
    assert split.new_events == 3 and split.train.user_ids == ["recent"]
    assert split.train.items[0].tolist() == [4, 5, 6] and split.train.timestamps[0].tolist() == [10, 20, 100]
    assert split.holdout.history[0].tolist() == [4, 5, 6] and split.holdout.target.tolist() == [7]
    assert split.holdout.target_ts.tolist() == [110]
    with pytest.raises(ValueError, match="event times"):
        retrain_split(SequenceData(["u"], [np.array([1, 2])]), since=0)


def test_unknown_items_are_dropped_and_counted() -> None:
    inter = Interactions(["a", "a", "a"], ["1", "new", "2"], [1, 2, 3])
    seqs, dropped = known_sequences(inter, IdMap(["1", "2"]))
    assert dropped == 1 and seqs.items[0].tolist() == [1, 2]


def test_the_gate_allows_a_margin() -> None:
    assert gate({"ndcg@10": 0.10}, {"ndcg@10": 0.096}, 0.005).passed
    assert not gate({"ndcg@10": 0.10}, {"ndcg@10": 0.094}, 0.005).passed


@pytest.mark.slow
def test_persrec_retrain_hands_over_or_refuses(tmp_path) -> None:
    inter = load_interactions(RATINGS)
    seqs, id_map = build_sequences(inter)
    torch.manual_seed(0)
    cfg = ModelConfig(num_items=id_map.num_items, dim=16, head_dim=16, max_len=50, dropout=0.0)
    ck_path = tmp_path / "served.pt"
    save_checkpoint(make_checkpoint(build_model(cfg), id_map.to_json()), ck_path)  # an untrained model
    since = str(int(inter.timestamps.max()) - 30 * 86400)  # the last 30 days
    run = lambda *extra: CliRunner().invoke(app, ["retrain", str(ck_path), str(RATINGS), "--since", since,  # noqa: E731
                                                  "--epochs", "2", "--threads", "1", *extra])
    ok = run("--out", str(tmp_path / "ok"))
    assert ok.exit_code == 0, ok.output
    report = json.loads((tmp_path / "ok" / "gate.json").read_text())
    assert report["passed"] and report["new"]["ndcg@10"] >= report["old"]["ndcg@10"] - 0.005
    assert report["holdout_rows"] == report["users"] > 0 and report["new_events"] > report["users"]
    assert load_checkpoint(tmp_path / "ok" / "retrained.pt").model_version == report["new_model_version"]
    refused = run("--out", str(tmp_path / "no"), "--margin", "-1")  # "must gain a whole NDCG": never
    assert refused.exit_code == 3 and "refused" in refused.output
    assert not (tmp_path / "no" / "retrained.pt").exists() and not json.loads((tmp_path / "no" / "gate.json").read_text())["passed"]
