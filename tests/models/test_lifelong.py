"""Whole histories as the stream serves them (models/lifelong.py): the batched fold chains and
the training windows with a carried memory give exactly the one-pass answer."""

import numpy as np
import pytest
import torch

from persrec.models.config import ModelConfig
from persrec.models.data import SequenceData, leave_one_out
from persrec.models.evaluate import Evaluator
from persrec.models.layout import ITEM, collate, segment_lengths
from persrec.models.lifelong import LifelongExamples, fold_chains, lifelong_vectors, whole_segments
from persrec.models.persrec import PerSRec
from persrec.models.train import History, TrainConfig, fit

from .test_persrec_exactness import TOL, irregular_times


def model_of(mode: str, seed: int = 0) -> PerSRec:
    torch.manual_seed(seed)
    timed = dict(time_bias=True, request_time=True, num_time_buckets=129, bias_init_std=0.5) if mode == "request" else {}
    cfg = ModelConfig(num_items=90, dim=16, num_layers=2, num_heads=2, head_dim=8, max_len=22, num_memory_tokens=3,
                      recent_len=4, segment_len=6, policy="incremental", dropout=0.0, **timed)
    model = PerSRec(cfg).eval()
    with torch.no_grad():
        model.backbone.bias.pos_w.normal_()
    return model


def users(rng, lengths):
    return [rng.integers(1, 91, size=n) for n in lengths], [irregular_times(rng, n) for n in lengths]


def full_pass_items(model, seqs, ts, request=None) -> list[torch.Tensor]:
    """Each user's outputs at their item positions, in order, from one masked pass over the
    whole history's multi-block layout."""
    qts = None if ts is None or request is None else [np.append(t[1:], r) for t, r in zip(ts, request)]
    batch = collate(seqs, model.cfg, timestamps=ts, query_timestamps=qts)
    h = model(batch)
    return [h[b][batch.kind[b] == ITEM] for b in range(len(seqs))]


@pytest.mark.parametrize("mode", ["none", "request"])
@torch.no_grad()
def test_lifelong_vectors_equal_one_pass_over_the_whole_history(mode: str) -> None:
    model = model_of(mode)
    rng = np.random.default_rng(0)
    seqs, ts = users(rng, [3, 9, 10, 40, 161, 77])  # below, at and far beyond one whole segment
    assert [whole_segments(len(s), model.cfg) for s in seqs] == [0, 0, 1, 6, 26, 12]
    request = np.array([t[-1] + 45 for t in ts]) if mode == "request" else None
    got = lifelong_vectors(model, seqs, ts if mode == "request" else None, request, batch_size=4)
    for i, items in enumerate(full_pass_items(model, seqs, ts, request)):
        assert (got[i] - items[-1]).abs().max().item() <= TOL, i


@torch.no_grad()
def test_fold_chains_in_batches_equal_one_user_at_a_time() -> None:
    model = model_of("request", 1)
    rng = np.random.default_rng(1)
    seqs, ts = users(rng, [70, 13, 0, 55])
    folds = [whole_segments(len(s), model.cfg) for s in seqs]
    together, has = fold_chains(model, seqs, ts, folds, batch_size=3)
    assert has.tolist() == [f > 0 for f in folds]
    for i in range(len(seqs)):
        alone, _ = fold_chains(model, [seqs[i]], [ts[i]], [folds[i]])
        assert torch.allclose(alone[0], together[i], atol=1e-6)


@pytest.mark.parametrize("mode", ["none", "request"])
@torch.no_grad()
def test_a_window_with_its_carried_memory_is_the_whole_prefix_pass(mode: str) -> None:
    """A lifelong training example: the window's outputs equal the same positions of one pass
    over everything before its end, so training sees exactly what serving computes."""
    model = model_of(mode, 2)
    rng = np.random.default_rng(2)
    seqs, ts = users(rng, [120, 60, 8])
    examples = LifelongExamples(seqs, ts if mode == "request" else None, model.cfg, "cpu")
    examples.refresh(model, np.random.default_rng(5))
    batch = examples.all
    assert bool(batch.has_memory[0]) and batch.memory is not None
    h = model(batch)
    ends = [int(x) for x in np.random.default_rng(5).integers(1, [len(s) for s in seqs])]
    for u, (s, t, e) in enumerate(zip(seqs, ts, ends)):
        qts = [t[1:e + 1]] if mode == "request" else None
        full = collate([s[:e]], model.cfg, timestamps=[t[:e]] if mode == "request" else None, query_timestamps=qts)
        items_full = model(full)[0][full.kind[0] == ITEM]
        items_window = h[u][batch.kind[u] == ITEM]
        n = len(items_window)
        assert n == examples.lengths[u] and n <= model.cfg.max_len + model.cfg.segment_len
        assert (items_full[-n:] - items_window).abs().max().item() <= TOL, u
        assert torch.equal(batch.targets[u][batch.kind[u] == ITEM], torch.from_numpy(s[e - n + 1:e + 1]))


@pytest.mark.parametrize("mode", ["none", "request"])
def test_folds_kept_for_the_step_give_the_same_memory_and_pass_the_gradient(mode: str) -> None:
    """``fold_grad``: the last carried segments fold in each step instead of at the epoch's
    start; in eval mode the memory is the same, and the window's loss now reaches the parameters
    through those folds (the memory folded at the start carries no gradient)."""
    model = model_of(mode, 6)
    rng = np.random.default_rng(6)
    seqs, ts = users(rng, [150, 130, 61, 9])
    times = ts if mode == "request" else None
    plain, late = LifelongExamples(seqs, times, model.cfg, "cpu"), LifelongExamples(seqs, times, model.cfg, "cpu", fold_grad=3)
    plain.refresh(model, np.random.default_rng(8))
    late.refresh(model, np.random.default_rng(8))
    assert late.late.sum() > 0 and late.late.sum(1).max() == 3  # some users carry 3 or more
    idx = np.arange(len(seqs))
    a, b = plain.batch(idx), late.batch(idx)
    assert torch.equal(a.has_memory, b.has_memory)
    assert (a.memory - b.memory).abs().max().item() <= TOL
    assert not a.memory.requires_grad and b.memory.requires_grad

    direction = torch.randn(len(seqs), a.kind.shape[1], model.cfg.dim, generator=torch.Generator().manual_seed(0))

    def grads(batch):  # the outputs are unit vectors: a loss along a fixed direction, not their norm
        model.zero_grad()
        loss = (model(batch) * direction[:, : batch.kind.shape[1]]).sum()
        loss.backward()
        return loss.item(), torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])

    (loss_a, grad_a), (loss_b, grad_b) = grads(a), grads(b)
    assert loss_a == pytest.approx(loss_b, rel=1e-5)  # the same forward
    assert (grad_a - grad_b).abs().max().item() > 1e-3  # and more gradient: through the late folds


def test_lifelong_training_runs_and_is_read_as_served() -> None:
    model = model_of("none", 3)
    rng = np.random.default_rng(3)
    seqs, _ = users(rng, [int(n) for n in rng.integers(3, 90, size=40)])
    split = leave_one_out(SequenceData([str(i) for i in range(40)], seqs))
    model.train()
    result = fit(model, split.train.items, None, split.valid, TrainConfig(epochs=2, batch_size=16, history=History.LIFELONG))
    assert result.epochs_run == 2 and np.isfinite(result.history[-1].loss)
    assert 0.0 <= result.best_metrics["ndcg@10"] <= 1.0
    assert segment_lengths(23, model.cfg) == [6, 6, 6, 5]  # whole segments, the rest recent


@torch.no_grad()
def test_a_key_value_cache_answers_like_the_whole_history() -> None:
    """The full-history baseline a streaming engineer would pick: each event attends to every
    earlier item's cached keys and values, and answers exactly like one pass over all of them."""
    torch.manual_seed(4)
    cfg = ModelConfig(num_items=90, dim=16, num_heads=2, head_dim=8, max_len=30, dropout=0.0)
    model = PerSRec(cfg).eval()
    with torch.no_grad():
        model.backbone.bias.pos_w.normal_()
    rng = np.random.default_rng(4)
    seqs = [rng.integers(1, 91, size=n) for n in (57, 20)]  # longer than max_len: distances clamp
    cache = torch.zeros(2, cfg.num_layers, 2, 0, cfg.num_heads, cfg.head_dim)
    cached = torch.zeros(2, dtype=torch.long)
    for step in range(57):  # one event at a time; user 1 stops after 20
        live = [u for u in range(2) if step < len(seqs[u])]
        idx = torch.tensor(live)
        items = torch.tensor([[seqs[u][step]] for u in live])
        vec, kv = model.extend_cache(cache[idx] if cache.shape[3] else None, cached[idx], items, torch.ones(len(live), dtype=torch.long))
        grown = torch.zeros(2, *cache.shape[1:3], cache.shape[3] + 1, *cache.shape[4:])
        grown[:, :, :, : cache.shape[3]] = cache
        for r, u in enumerate(live):
            grown[u, :, :, cached[u]] = kv[r, :, :, 0]
        cache, cached[idx] = grown, cached[idx] + 1
        for r, u in enumerate(live):
            full = model.recommend(None, torch.from_numpy(seqs[u][: step + 1])[None], torch.tensor([step + 1]))
            assert (vec[r] - full[0]).abs().max().item() <= TOL, (u, step)


@torch.no_grad()
def test_whole_history_user_vectors_read_every_item_in_one_pass() -> None:
    """``user_vectors(whole=True)`` (the bench's "HSTU, whole history" row): a history longer
    than ``max_len`` is read entirely, batched or alone, with the request time asked last."""
    from persrec.models.evaluate import user_vectors

    torch.manual_seed(0)
    cfg = ModelConfig(num_items=90, dim=16, num_layers=2, num_heads=2, head_dim=8, max_len=22, dropout=0.0,
                      time_bias=True, request_time=True, num_time_buckets=129, bias_init_std=0.5)
    model = PerSRec(cfg).eval()  # no memory tokens: HSTU
    rng = np.random.default_rng(3)
    seqs, ts = users(rng, [60, 7, 35])
    request = np.array([t[-1] + 45 for t in ts])
    together = user_vectors(model, seqs, ts, "cpu", request, whole=True)
    for i in range(len(seqs)):
        alone = user_vectors(model, seqs[i:i + 1], ts[i:i + 1], "cpu", request[i:i + 1], whole=True)
        assert (together[i] - alone[0]).abs().max().item() <= TOL
    changed = [s.copy() for s in seqs]
    changed[0][0] = 1 + changed[0][0] % 90  # the oldest item, 59 events before the window's end
    assert (user_vectors(model, changed, ts, "cpu", request, whole=True)[0] - together[0]).abs().max() > 1e-4
    cut = user_vectors(model, changed, ts, "cpu", request)  # the last max_len items only
    assert (cut[0] - user_vectors(model, seqs, ts, "cpu", request)[0]).abs().max() == 0


@torch.no_grad()
@pytest.mark.parametrize("timing", ["none", "time_bias", "request_time"])
def test_a_memory_and_a_cache_of_the_recent_items_answer_like_recommend(timing: str) -> None:
    """PerSRec with its recent items' keys/values cached behind the memory: each event costs
    one position (two under ``request_time``: the previous item is sent again, its query now
    asked at the new event's time), and answers exactly like ``recommend(memory, recent)`` as
    the stream asks it, with real irregular times; after a fold the cache is rebuilt against
    the new memory."""
    torch.manual_seed(5)
    timed = timing != "none"
    cfg = ModelConfig(num_items=90, dim=16, num_heads=2, head_dim=8, max_len=30, dropout=0.0,
                      num_memory_tokens=4, recent_len=10, segment_len=10, policy="incremental",
                      time_bias=timed, request_time=timing == "request_time", bias_init_std=0.5)
    model = PerSRec(cfg).eval()
    with torch.no_grad():
        model.backbone.bias.pos_w.normal_()
    rng = np.random.default_rng(5)
    history = torch.from_numpy(rng.integers(1, 91, size=45))
    times = torch.from_numpy(irregular_times(rng, 45))
    t = (lambda a, b: times[None, a:b]) if timed else (lambda a, b: None)  # noqa: E731
    one = lambda v: torch.tensor([v])  # noqa: E731
    settle = 1 if cfg.request_time else 0  # the last item's keys/values hold until the next event

    def rebuild(memory, start: int, end: int):
        """The cache of the window history[start:end] (all but its last ``settle`` items)."""
        n = end - start - settle
        if n == 0:
            return None
        return model.extend_cache(None, one(0), history[None, start:start + n], one(n), memory, t(start, start + n),
                                  request_ts=times[start + n: start + n + 1] if cfg.request_time else None)[1]

    memory = model.fold(None, None, history[None, :10], one(10), t(0, 10))
    start, cache = 10, rebuild(memory, 10, 12)  # the window after one fold: history[10:12]
    for end in range(13, 46):  # event end-1 arrives
        first = end - 1 - settle  # what this event sends: its item, and under request_time the previous one
        cached = first - start
        vec, kv = model.extend_cache(cache, one(cached), history[None, first:end], one(end - first), memory,
                                     t(first, end), t(start, first) if cache is not None else None)
        settled = kv[:, :, :, : kv.shape[3] - settle]
        cache = settled if cache is None else torch.cat([cache, settled], dim=3)
        want = model.recommend(memory, history[None, start:end], one(end - start), t(start, end))
        assert (vec - want).abs().max().item() <= TOL, end
        if end - start == cfg.recent_len + cfg.segment_len - 1:  # the stream folds the oldest segment
            memory = model.fold(memory, torch.tensor([True]), history[None, start:start + 10], one(10), t(start, start + 10))
            start += cfg.segment_len
            cache = rebuild(memory, start, end)
    with pytest.raises(ValueError, match="memory exactly"):
        model.extend_cache(None, one(0), history[None, :3], one(3))


def carry_model(seed: int = 0, carry: bool = True, layers: int = 2) -> PerSRec:
    torch.manual_seed(seed)
    cfg = ModelConfig(num_items=90, dim=16, num_layers=layers, num_heads=2, head_dim=8, max_len=22, num_memory_tokens=3,
                      recent_len=4, segment_len=6, policy="incremental", dropout=0.0, memory_carry=carry)
    model = PerSRec(cfg).eval()
    with torch.no_grad():
        model.backbone.bias.pos_w.normal_()
        if carry:
            model.carry.weight.normal_()  # trained: not the zero it starts at
    return model


@pytest.mark.parametrize("layers", [2, 3])
@torch.no_grad()
def test_without_the_carry_a_memory_forgets_all_but_its_last_layers_minus_one_segments(layers: int) -> None:
    """A memory is each layer's keys and values, made from the layers below it: a fold reads the
    previous memory through layers 0 .. L-2 only, and its layer 0 is the same for every user. So
    an L-layer chain holds the last L - 1 segments and nothing older; with the carry, it holds
    the user's first segment too."""
    rng = np.random.default_rng(11)
    first = [rng.integers(1, 91, size=6) for _ in range(2)]  # two users who differ only in their first segment
    rest = rng.integers(1, 91, size=6 * layers)
    seqs = [np.concatenate([f, rest]) for f in first]
    folds = [layers] * 2  # the first segment and L - 1 more
    for carry, forgets in ((False, True), (True, False)):
        model = carry_model(3, carry, layers)
        memory, _ = fold_chains(model, seqs, None, folds)
        # equal to float32 rounding (bit for bit on AMD EPYC; 3e-7 apart on an Intel Xeon, whose
        # kernels block the two rows differently), or far apart
        assert ((memory[0] - memory[1]).abs().max().item() <= TOL) is forgets, carry
        short, _ = fold_chains(model, seqs, None, [layers - 1] * 2)  # one fold fewer: still remembered
        assert (short[0] - short[1]).abs().max().item() > 1e-2


@torch.no_grad()
def test_a_carry_model_serves_its_whole_history_from_its_folds() -> None:
    """The served path (fold chain + raw part) is what ``lifelong_vectors`` reads; a carry model
    has no one-pass layout with token blocks, and says so."""
    model = carry_model(4)
    rng = np.random.default_rng(4)
    seqs, _ = users(rng, [40, 9, 25])
    got = lifelong_vectors(model, seqs, None, None, batch_size=2)
    for i, s in enumerate(seqs):
        f = whole_segments(len(s), model.cfg)
        memory, has = fold_chains(model, [s], None, [f])
        mem = memory if bool(has[0]) else model.empty_memory(1)
        recent = torch.from_numpy(s[f * 6:])[None]
        want = model.recommend(mem, recent, torch.tensor([recent.shape[1]]))
        assert (got[i] - want[0]).abs().max().item() <= TOL
    with pytest.raises(ValueError, match="one segment at a time"):
        model(collate(seqs, model.cfg))  # 40 items: five blocks
    rows = leave_one_out(SequenceData([str(i) for i in range(3)], seqs)).test
    ranks = Evaluator(rows, model.cfg).ranks(model)["exclude"]  # an evaluator reads it as served
    assert torch.equal(ranks, Evaluator(rows, model.cfg, lifelong=True).ranks(model)["exclude"])
    with pytest.raises(ValueError, match="INCREMENTAL"):
        ModelConfig(num_items=9, num_memory_tokens=2, memory_carry=True)


def test_a_carry_model_trains_as_served_and_through_its_folds() -> None:
    """Lifelong examples of a carry model are one segment and the recent part after the memory:
    in eval mode the window's outputs are the served ones (fold, then recommend), and the
    gradient reaches the carry through the folds kept for the step (it needs at least one)."""
    model = carry_model(5)
    rng = np.random.default_rng(5)
    seqs, _ = users(rng, [80, 70, 50, 8])
    with pytest.raises(ValueError, match="fold_grad >= 1"):
        LifelongExamples(seqs, None, model.cfg, "cpu")
    examples = LifelongExamples(seqs, None, model.cfg, "cpu", fold_grad=2)
    examples.refresh(model, np.random.default_rng(7))
    ends = [int(x) for x in np.random.default_rng(7).integers(1, [len(s) for s in seqs])]
    b = examples.batch(np.arange(4))
    with torch.no_grad():
        h = model(b)
        for u, (s, e) in enumerate(zip(seqs, ends)):
            f = whole_segments(e, model.cfg)
            memory, has = fold_chains(model, [s], None, [f])
            mem = memory if bool(has[0]) else model.empty_memory(1)
            window = h[u][b.kind[u] == ITEM]
            assert len(window) == examples.lengths[u] <= 6 + 4 + 5  # a segment and the recent part, at most
            recent = s[f * 6:e]
            want = model.recommend(mem, torch.from_numpy(recent)[None], torch.tensor([len(recent)]))
            assert (window[-1] - want[0]).abs().max().item() <= TOL, u
    with torch.no_grad():
        model.carry.weight.zero_()  # as built
    model.train()
    b = examples.batch(np.arange(4))
    (model(b) * torch.randn(4, b.kind.shape[1], 16, generator=torch.Generator().manual_seed(1))).sum().backward()
    assert model.carry.weight.grad.abs().max().item() > 0
