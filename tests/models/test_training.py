"""Training works end to end on a small synthetic task and beats a popularity ranker."""

import numpy as np
import torch

from persrec.models import experiment
from persrec.models.config import ModelConfig
from persrec.models.layout import collate
from persrec.models.loss import build_model, sampled_softmax_loss
from persrec.models.train import TrainConfig, length_batches, training_examples


def test_training_examples_shift_targets_by_one() -> None:
    seqs = [np.arange(1, 6), np.arange(10, 14), np.array([7])]
    inputs, targets, _, _ = training_examples(seqs, None, max_len=3)
    assert [x.tolist() for x in inputs] == [[2, 3, 4], [10, 11, 12]]
    assert [y.tolist() for y in targets] == [[3, 4, 5], [11, 12, 13]]


def test_length_batches_cover_every_row_once() -> None:
    lengths = np.random.default_rng(0).integers(1, 200, size=1000)
    batches = length_batches(lengths, 128, np.random.default_rng(1))
    assert sorted(np.concatenate(batches).tolist()) == list(range(1000))
    spread = np.mean([np.ptp(lengths[b]) for b in batches])
    assert spread < 60  # similar lengths together (random batches spread ~190)


def test_gradients_reach_memory_tokens() -> None:
    cfg = ModelConfig(num_items=50, num_memory_tokens=4, recent_len=3, max_len=20, dim=16, head_dim=8)
    model = build_model(cfg)
    rng = np.random.default_rng(0)
    seqs = [rng.integers(1, 51, size=n) for n in (12, 15)]
    batch = collate([s[:-1] for s in seqs], cfg, [s[1:] for s in seqs])
    loss = sampled_softmax_loss(model(batch), batch.targets, model.item_vectors, 50, 8, 0.05)
    loss.backward()
    assert model.tokens.grad is not None and model.tokens.grad.abs().sum() > 0


def test_short_training_lowers_loss_and_beats_popularity(tmp_path) -> None:
    data = experiment.load_dataset("synthetic")
    overrides = dict(num_memory_tokens=4, recent_len=20, max_len=100, dim=32, head_dim=16)
    model, result = experiment.train_on(
        data, overrides, TrainConfig(epochs=8, seed=1), out_dir=tmp_path, device="cpu",
    )
    losses = [r.loss for r in result.history]
    assert losses[-1] < 0.7 * losses[0]
    report = experiment.test_report(model, data)
    assert report["test"]["ndcg@10"] > 1.5 * report["popularity_test"]["ndcg@10"]
    assert (tmp_path / "best.pt").is_file() and (tmp_path / "last.pt").is_file()


def test_resume_continues_from_last_epoch(tmp_path) -> None:
    data = experiment.load_dataset("synthetic")
    overrides = dict(num_memory_tokens=2, recent_len=10, max_len=50, dim=16, head_dim=8)
    _, first = experiment.train_on(data, overrides, TrainConfig(epochs=2), out_dir=tmp_path)
    _, second = experiment.train_on(
        data, overrides, TrainConfig(epochs=3), out_dir=tmp_path, resume=tmp_path / "last.pt",
    )
    assert [r.epoch for r in second.history] == [3]
    assert second.best_metrics["ndcg@10"] >= first.best_metrics["ndcg@10"]


def test_published_protocol_trains_fixed_epochs_on_all_but_the_test_event(tmp_path) -> None:
    from persrec.models.data import SequenceData, all_but_test

    seqs = SequenceData(["a", "b"], [np.array([1, 2, 3, 4]), np.array([5, 6])], None)
    assert [s.tolist() for s in all_but_test(seqs).items] == [[1, 2, 3], [5, 6]]  # b has no test row

    data = experiment.load_dataset("synthetic")
    overrides = dict(max_len=30, dim=16, head_dim=8)
    model, result = experiment.train_on(data, overrides, TrainConfig(epochs=3, patience=1), out_dir=tmp_path,
                                        protocol=experiment.Protocol.PUBLISHED)
    assert [r.epoch for r in result.history] == [1, 2, 3] and result.best_epoch == 3
    assert all(r.valid is None for r in result.history) and result.best_metrics == {}
    last = torch.load(tmp_path / "last.pt", weights_only=False)
    best = torch.load(tmp_path / "best.pt", weights_only=False)
    assert all(torch.equal(a, b) for a, b in zip(last["state_dict"].values(), best["state_dict"].values()))


def test_a_run_resumed_after_a_crash_keeps_the_epoch_it_had_selected(tmp_path) -> None:
    """A run killed after its best epoch, resumed from last.pt, ends on the weights and metrics
    of that epoch (best.pt is written at each improvement), as the uninterrupted run does."""
    import dataclasses

    import pytest

    from persrec.models.train import fit

    data = experiment.load_dataset("synthetic")
    v = data.split.valid
    few = dataclasses.replace(v, user_index=v.user_index[:10], history=v.history[:10], target=v.target[:10])
    cfg = ModelConfig(num_items=data.id_map.num_items, max_len=30, dim=16, head_dim=8)

    def run(epochs, out_dir, resume=None, on_epoch=None):
        torch.manual_seed(0)
        model = build_model(cfg)
        return model, fit(model, data.split.train.items, None, few, TrainConfig(epochs=epochs, seed=1, patience=None),
                          out_dir=out_dir, resume=resume, on_epoch=on_epoch)

    whole, result = run(3, tmp_path / "whole")
    assert result.best_epoch == 1  # 10 validation users: a noisy curve that peaks first

    def crash(report) -> None:
        if report.epoch == 3:
            raise KeyboardInterrupt("killed")

    with pytest.raises(KeyboardInterrupt):
        run(3, tmp_path / "crashed", on_epoch=crash)
    resumed, again = run(3, tmp_path / "crashed", resume=tmp_path / "crashed" / "last.pt")
    assert again.history == [] and again.best_epoch == 1 and again.best_metrics == result.best_metrics
    assert all(torch.equal(a, b) for a, b in zip(whole.state_dict().values(), resumed.state_dict().values()))


def test_windows_anywhere_cover_a_long_history_and_keep_short_ones_whole() -> None:
    """history=anywhere: each epoch a max_len window of consecutive events ending anywhere from
    the max_len-th on, targets one ahead, times with them; a short history is laid out whole."""
    import pytest

    from persrec.models.train import AnywhereExamples

    cfg = ModelConfig(num_items=500, max_len=10, dim=16, head_dim=8)
    long_, short = np.arange(1, 61), np.arange(100, 106)
    ts = [s * 7 for s in (long_, short)]
    ex = AnywhereExamples([long_, short, np.array([5])], ts, cfg, "cpu")  # a one-event user has no example
    assert len(ex) == 2
    ends = set()
    rng = np.random.default_rng(0)
    for _ in range(300):
        ex.refresh(None, rng)
        items, targets, times = (t[0, : ex.lengths[0]].numpy() for t in (ex.all.item_ids, ex.all.targets, ex.all.ts))
        assert ex.lengths[0] == 10 and np.array_equal(np.diff(items), np.ones(9))
        assert np.array_equal(targets, items + 1) and np.array_equal(times, items * 7)
        ends.add(int(items[-1]))
        assert ex.lengths[1] == 5 and ex.all.item_ids[1, :5].tolist() == short[:-1].tolist()
    assert ends == set(range(10, 60))  # every window of the history, the last included
    with pytest.raises(ValueError, match="without memory tokens"):
        AnywhereExamples([long_], None, ModelConfig(num_items=500, max_len=10, num_memory_tokens=2, recent_len=4), "cpu")
