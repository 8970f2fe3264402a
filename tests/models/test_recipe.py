"""The pieces of the official HSTU recipe (issue 18) against small hand-checked cases."""

import dataclasses
import math

import numpy as np
import pytest
import torch

from persrec.models.config import ModelConfig
from persrec.models.data import EvalRows
from persrec.models.evaluate import Evaluator, Seen, SeenRule, evaluate, popularity_metrics
from persrec.models.hstu import query_times, time_bucket_reference, time_buckets
from persrec.models.layout import collate
from persrec.models.loss import Negatives, build_model, gathered_dot, next_item_loss, per_position_softmax_loss
from persrec.models.recipe import DIFFERENCES, OFFICIAL, OURS, RECIPES, Selection, recipe_named
from persrec.models.train import Batching, Examples, Optimizer, make_optimizer, training_examples


def test_time_buckets_by_hand() -> None:
    # floor(ln(max(gap, 1)) / 0.301): 1 s and under -> 0; 2 s -> 2; a minute -> 13; an hour -> 27;
    # a day -> 37; 10^9 s -> 68; a gap is taken in absolute value.
    gaps = torch.tensor([0, 1, 2, 3, 59, 60, 3600, 86400, 10**9, -60])
    expected = [0, 0, 2, 3, 13, 13, 27, 37, 68, 13]
    q = gaps[None]
    k = torch.zeros(1, 1, dtype=torch.long)
    assert time_buckets(q, k, 129)[0, :, 0].tolist() == expected
    assert time_bucket_reference(gaps, 129).tolist() == expected
    assert time_buckets(q, k, 30)[0, :, 0].max().item() == 29  # clamped to the last bucket


def test_time_buckets_equal_the_logarithm_everywhere() -> None:
    gen = torch.Generator().manual_seed(0)
    gaps = torch.cat([torch.arange(0, 3000), torch.randint(0, 2**40, (50_000,), generator=gen)])
    got = time_buckets(gaps[None], torch.zeros(1, 1, dtype=torch.long), 129)[0, :, 0]
    assert torch.equal(got, time_bucket_reference(gaps, 129))


def test_query_times_are_the_next_items_then_the_request() -> None:
    ts = torch.tensor([[10, 20, 30, 0], [5, 0, 0, 0]])
    lengths = torch.tensor([3, 1])
    assert query_times(ts, lengths, torch.tensor([99, 7])).tolist() == [[20, 30, 99, 0], [7, 0, 0, 0]]
    assert query_times(ts, lengths, None).tolist() == [[20, 30, 30, 0], [5, 0, 0, 0]]  # at the last event


def test_gathered_dot_and_its_gradients_equal_autograd_on_gathered_rows() -> None:
    gen = torch.Generator().manual_seed(1)
    h = torch.randn(300, 6, generator=gen, requires_grad=True)
    table = torch.randn(20, 6, generator=gen, requires_grad=True)
    ids = torch.randint(0, 20, (300, 9), generator=gen)
    weights = torch.randn(300, 9, generator=gen)
    (gathered_dot(h, table, ids) * weights).sum().backward()
    got = (h.grad.clone(), table.grad.clone())
    h.grad = table.grad = None
    ((table[ids] * h[:, None, :]).sum(-1) * weights).sum().backward()
    assert torch.allclose(got[0], h.grad, atol=1e-5) and torch.allclose(got[1], table.grad, atol=1e-5)


def test_per_position_negatives_mask_the_target_and_differ_per_position() -> None:
    # Two items only: every negative drawn for a position whose target is item 1 is either item 1
    # (masked: -inf) or item 2. With h orthogonal to item 2, the loss is log(1 + #item-2 draws).
    table = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    h = torch.tensor([[1.0, 0.0]] * 4)
    targets = torch.ones(4, dtype=torch.long)
    gen = torch.Generator().manual_seed(3)
    loss = per_position_softmax_loss(h, targets, table, 16, gen)
    ids = torch.randint(1, 3, (4, 16), generator=torch.Generator().manual_seed(3))
    assert not torch.equal(ids[0], ids[1])  # drawn per position
    # positive logit 1 (= h . item 1); each unmasked negative (item 2) has logit 0
    expected = torch.log(1 + (ids == 2).sum(1) * torch.exp(torch.tensor(-1.0))).mean()
    assert torch.allclose(loss, expected)


def test_full_softmax_is_cross_entropy_over_every_item() -> None:
    torch.manual_seed(0)
    model = build_model(ModelConfig(num_items=30, dim=8, head_dim=8, max_len=10))
    hidden = torch.nn.functional.normalize(torch.randn(2, 5, 8), dim=-1)
    targets = torch.tensor([[3, 4, 0, 0, 0], [7, 8, 9, 1, 2]])
    got = next_item_loss(hidden, targets, model, 0, 0.05, Negatives.FULL)
    logits = hidden @ model.item_vectors().T / 0.05
    logits[..., 0] = float("-inf")
    valid = targets > 0
    assert torch.allclose(got, torch.nn.functional.cross_entropy(logits[valid], targets[valid]))


def test_official_optimiser_is_adamw_with_betas_0_9_0_98_and_no_decay() -> None:
    opt = make_optimizer([torch.nn.Parameter(torch.zeros(1))], OFFICIAL.train_config())
    assert type(opt) is torch.optim.AdamW
    assert opt.defaults["betas"] == (0.9, 0.98) and opt.defaults["weight_decay"] == 0.0
    assert opt.defaults["lr"] == 1e-3
    assert type(make_optimizer([torch.nn.Parameter(torch.zeros(1))], OURS.train_config())) is torch.optim.Adam


def test_official_differs_from_ours_by_exactly_the_listed_differences() -> None:
    changed = {f.name for f in dataclasses.fields(OURS)
               if getattr(OURS, f.name) != getattr(OFFICIAL, f.name)} - {"name", "notes"}
    assert changed == {k for d in DIFFERENCES.values() for k in d}
    for name, diff in DIFFERENCES.items():  # each one alone
        r = recipe_named(f"ours+{name}")
        assert {k: getattr(r, k) for k in diff} == diff
    o = OFFICIAL
    assert (o.negatives, o.num_negatives, o.optimizer, o.batching) == (
        Negatives.PER_POSITION, 128, Optimizer.ADAMW, Batching.SHUFFLE)
    assert o.selection is Selection.LAST and o.epochs == 101 and o.patience is None
    assert set(RECIPES) >= {"ours", "official", "best"}


def test_recipe_overrides_build_the_official_model() -> None:
    over = OFFICIAL.model_overrides(max_len=200, has_timestamps=True)
    assert over["attention_norm"] == 211 and over["num_time_buckets"] == 129
    assert over["time_bias"] and over["request_time"]
    assert not OFFICIAL.model_overrides(200, has_timestamps=False)["time_bias"]  # no times, no bias
    torch.manual_seed(0)
    model = build_model(ModelConfig(num_items=50, **over))
    layer = model.backbone.layers[0]
    assert layer.norm_in.weight is None and layer.norm_attn.weight is None
    assert layer.uvqk.bias is None
    assert abs(layer.uvqk.weight.std().item() - 0.02) < 0.002
    assert model.backbone.bias.pos_w.abs().sum() > 0  # N(0, .02), not zeros
    assert model.backbone.inv_norm == pytest.approx(1 / 211)
    assert model.pos_emb is not None


def test_recipe_expressions_and_settings() -> None:
    r = recipe_named("official+time_bias=false+num_negatives=512", ["epochs=3"])
    assert not r.time_bias and r.num_negatives == 512 and r.epochs == 3
    with pytest.raises(ValueError, match="unknown recipe"):
        recipe_named("nope")
    with pytest.raises(ValueError, match="unknown difference"):
        recipe_named("ours+nope")
    with pytest.raises(ValueError, match="KEY=VALUE"):
        recipe_named("ours", ["nope=1"])
    assert OFFICIAL.seen_rule(200) == SeenRule(window=200) and OURS.seen_rule(200) == SeenRule()


def _rows(histories, targets) -> EvalRows:
    return EvalRows(np.arange(len(targets)), [np.array(h) for h in histories], None,
                    np.array(targets), None)


def test_seen_rules_on_a_repeated_target() -> None:
    # Scores follow item ids (item 5 best). The target 4 was seen before: EXCLUDE makes the row
    # a miss, KEEP ranks it behind 5 only, a window of 1 excludes only the last item (3).
    counts = [np.array([1, 2, 3, 4, 5, 5, 5, 5, 5, 4, 4, 4])]  # popularity: 5 (5) > 4 (4) > ...
    rows = _rows([[4, 3]], [4])
    exclude = popularity_metrics(counts, 5, rows, ks=(1, 2), seen=SeenRule(Seen.EXCLUDE))
    keep = popularity_metrics(counts, 5, rows, ks=(1, 2), seen=SeenRule(Seen.KEEP))
    window = popularity_metrics(counts, 5, rows, ks=(1, 2), seen=SeenRule(Seen.EXCLUDE, window=1))
    assert exclude["hr@2"] == 0.0 and exclude["mrr"] < 0.2
    assert keep["hr@1"] == 0.0 and keep["hr@2"] == 1.0
    assert window["hr@1"] == 0.0 and window["hr@2"] == 1.0  # 4 stays rankable; 3 is excluded


def test_the_evaluators_top_items_are_the_best_scored_unseen_items_with_the_target_at_its_rank() -> None:
    torch.manual_seed(0)
    cfg = ModelConfig(num_items=40, dim=8, head_dim=8, max_len=12, dropout=0.0)
    model = build_model(cfg).eval()
    rng = np.random.default_rng(0)
    seqs = [rng.integers(1, 41, size=n) for n in (3, 9, 20, 5, 14)]
    rows = _rows([s[:-1] for s in seqs], [s[-1] for s in seqs])
    ev = Evaluator(rows, cfg, {"exclude": SeenRule()}, batch_size=2)
    top, ranks = ev.top_items(model, 10), ev.ranks(model)["exclude"]
    with torch.no_grad():
        for i, h in enumerate(rows.history):
            batch = collate([h[-cfg.max_len:]], cfg)  # the model reads the last max_len items
            scores = model.score(model(batch)[0, batch.last[0]][None])[0]
            scores[0] = -math.inf
            scores[torch.as_tensor(h)] = -math.inf
            assert torch.allclose(scores[top[i]], scores.topk(10).values, atol=1e-6)  # the best ten, in order
            assert not set(top[i].tolist()) & set(h.tolist()) and 0 not in top[i].tolist()
            if ranks[i] < 10:  # the target's rank is its place in the list
                assert top[i, int(ranks[i])] == int(rows.target[i])


def test_a_large_catalogue_is_evaluated_in_smaller_batches_with_the_same_ranks(monkeypatch) -> None:
    from persrec.models import evaluate as ev_module

    assert ev_module.rows_per_batch(3_706, 256) == 256  # ML-1M: unchanged
    assert ev_module.rows_per_batch(1_000_000, 256) == (1 << 25) // 1_000_001 == 33
    assert ev_module.rows_per_batch(10**9, 256) == 1
    torch.manual_seed(0)
    cfg = ModelConfig(num_items=40, dim=8, head_dim=8, max_len=12, dropout=0.0)
    model = build_model(cfg).eval()
    rng = np.random.default_rng(1)
    seqs = [rng.integers(1, 41, size=n) for n in (3, 9, 20, 5, 14, 7, 2)]
    rows = _rows([s[:-1] for s in seqs], [s[-1] for s in seqs])
    whole = Evaluator(rows, cfg)
    monkeypatch.setattr(ev_module, "SCORE_BUDGET", 41 * 2)  # two rows of 41 scores a batch
    small = Evaluator(rows, cfg)
    assert [len(b[0]) for b in whole.batches] == [7] and [len(b[0]) for b in small.batches] == [2, 2, 2, 1]
    assert torch.equal(small.ranks(model)["exclude"], whole.ranks(model)["exclude"])
    assert torch.equal(small.top_items(model, 5), whole.top_items(model, 5))


def test_evaluator_equals_evaluate_and_training_batches_equal_collate() -> None:
    torch.manual_seed(0)
    cfg = ModelConfig(num_items=40, dim=8, head_dim=8, max_len=12, num_memory_tokens=2, recent_len=4,
                      policy="incremental", segment_len=3, dropout=0.0)
    model = build_model(cfg).eval()
    rng = np.random.default_rng(0)
    seqs = [rng.integers(1, 41, size=n) for n in (3, 9, 20, 5)]
    rows = _rows([s[:-1] for s in seqs], [s[-1] for s in seqs])
    rules = {"all": SeenRule(), "keep": SeenRule(Seen.KEEP)}
    got = Evaluator(rows, cfg, rules, batch_size=3).metrics(model)
    for name, rule in rules.items():
        assert got[name] == evaluate(model, rows, seen=rule)
    examples = Examples(seqs, None, cfg, "cpu")
    inputs, targets, _, _ = training_examples(seqs, None, cfg.max_len)
    idx = np.array([2, 0])
    a, b = examples.batch(idx), collate([inputs[i] for i in idx], cfg, [targets[i] for i in idx])
    for f in ("item_ids", "kind", "seg", "pos", "tok", "targets", "last"):
        assert torch.equal(getattr(a, f), getattr(b, f)), f
