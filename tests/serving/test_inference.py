"""The batched model runner that the Triton models call gives every row what the model gives
that row alone, however the rows of a batch differ in length."""

import numpy as np
import pytest
import torch

from persrec.models.checkpoint import make_checkpoint
from persrec.models.config import ModelConfig
from persrec.models.inputs import ModelInputs
from persrec.models.loss import build_model
from persrec.serving.inference import ModelRunner, shared_prefixes, width_groups


def test_width_groups_cover_each_row_once_within_a_factor_two() -> None:
    lengths = np.array([1, 3, 16, 17, 33, 200, 31, 64, 65, 0])
    groups = width_groups(lengths)
    assert sorted(np.concatenate(groups).tolist()) == list(range(len(lengths)))
    for g in groups:
        assert lengths[g].max() <= max(16, 2 * max(lengths[g].min(), 1))


def inputs(memory, has, items, lengths, ts, request_ts=None) -> ModelInputs:
    return ModelInputs(items, ts, lengths, memory, has, request_ts)


def assert_rows_as_alone(runner: ModelRunner, memory, has, items, lengths, ts) -> None:
    """Each row of the batch gets the answer it gets alone, without its own items."""
    x = inputs(memory, has, items, lengths, ts)
    ids, scores = runner.recommend(x, top_k=5)
    for i in range(len(lengths)):
        w = lengths[i]
        alone = runner.recommend(x.take(np.array([i]), w), 5)
        assert np.array_equal(alone[0][0], ids[i]) and np.allclose(alone[1][0], scores[i], atol=1e-5)
        assert not set(ids[i]) & set(items[i, :w].tolist())


@pytest.mark.parametrize("memory_tokens", [0, 3])
def test_mixed_lengths_match_rows_run_alone(memory_tokens: int) -> None:
    torch.manual_seed(0)
    cfg = ModelConfig(num_items=40, dim=16, head_dim=8, max_len=80, recent_len=6,
                      num_memory_tokens=memory_tokens, dropout=0.0)
    runner = ModelRunner(make_checkpoint(build_model(cfg), "{}"), "cpu")
    rng = np.random.default_rng(0)
    lengths = np.array([1, 5, 70, 18, 33, 2])
    items = rng.integers(1, 41, size=(6, 70)) * (np.arange(70)[None] < lengths[:, None])
    ts = np.zeros_like(items)
    memory = has = None
    if memory_tokens:
        memory = rng.standard_normal((6, *cfg.memory_shape)).astype(np.float32)
        has = np.array([True, False, True, True, False, True])
    assert_rows_as_alone(runner, memory, has, items, lengths, ts)
    if memory_tokens:
        x = inputs(memory, has, items, lengths, ts)
        folded = runner.fold(x)
        for i in range(6):
            alone = runner.fold(x.take(np.array([i])))
            assert np.allclose(alone[0], folded[i], atol=1e-5)


def test_shared_prefixes_find_rows_inside_others_under_the_same_memory() -> None:
    items = np.array([[5, 6, 7, 8], [5, 6, 0, 0], [5, 6, 7, 0], [5, 9, 0, 0], [5, 6, 0, 0], [5, 6, 7, 8]])
    lengths = np.array([4, 2, 3, 2, 2, 4])
    ts = np.array([[1, 2, 3, 4], [1, 2, 0, 0], [1, 2, 3, 0], [1, 2, 0, 0], [1, 3, 0, 0], [1, 2, 3, 4]])
    assert shared_prefixes(items, lengths, ts).tolist() == [0, 0, 0, 3, 4, 0]
    # Another memory (row 5), or none (row 2), keeps a row to itself.
    memory = np.zeros((6, 2, 3), np.float32)
    memory[5] = 1.0
    has = np.array([True, True, False, True, True, True])
    assert shared_prefixes(items, lengths, ts, memory, has).tolist() == [0, 0, 2, 3, 4, 5]


def _carriers_by_definition(items, lengths, ts, memory, has) -> list[int]:
    """shared_prefixes written plainly: longest first, each row joins the first carrier before it
    that holds its items and times under the same memory, or becomes a carrier."""
    carrier, carriers = list(range(len(lengths))), []
    for b in np.argsort(-lengths, kind="stable"):
        if lengths[b] < 1:
            continue
        n = lengths[b]
        for c in carriers:
            same_memory = memory is None or (has[c] == has[b] and (not has[b] or np.array_equal(memory[c], memory[b])))
            if same_memory and np.array_equal(items[c, :n], items[b, :n]) and np.array_equal(ts[c, :n], ts[b, :n]):
                carrier[b] = c
                break
        else:
            carriers.append(b)
    return carrier


def test_shared_prefixes_match_their_definition_on_random_batches() -> None:
    rng = np.random.default_rng(3)
    for _ in range(300):
        B, W = int(rng.integers(1, 30)), int(rng.integers(1, 12))
        users = rng.integers(1, 4, size=(4, W))  # few distinct sequences: many shared prefixes
        items = users[rng.integers(0, 4, size=B)].copy()
        ts = np.where(rng.random((B, W)) < 0.05, 7, 1)  # a time that differs now and then
        lengths = rng.integers(0, W + 1, size=B)
        inside = np.arange(W)[None] < lengths[:, None]
        items, ts = items * inside, ts * inside
        memory = has = None
        if rng.random() < 0.7:
            memory = rng.integers(0, 2, size=(B, 2, 3)).astype(np.float32)
            has = rng.random(B) < 0.8
        assert shared_prefixes(items, lengths, ts, memory, has).tolist() == _carriers_by_definition(
            items, lengths, ts, memory, has)


@pytest.mark.parametrize("memory_tokens,architecture", [(0, "hstu"), (3, "hstu"), (0, "sasrec")])
def test_rows_answered_from_a_longer_row_match_rows_run_alone(memory_tokens: int, architecture: str) -> None:
    """A user's burst: rows that are prefixes of one another, as the worker sends them."""
    torch.manual_seed(1)
    cfg = ModelConfig(num_items=40, dim=16, head_dim=8, max_len=80, recent_len=6, num_heads=2,
                      num_memory_tokens=memory_tokens, dropout=0.0, time_bias=True,
                      architecture=architecture)
    runner = ModelRunner(make_checkpoint(build_model(cfg), "{}"), "cpu")
    rng = np.random.default_rng(1)
    burst = rng.integers(1, 41, size=30)
    burst_ts = np.sort(rng.integers(0, 10**6, size=30))
    lengths = np.array([3, 30, 12, 1, 25, 7])
    items = np.stack([np.where(np.arange(30) < n, burst, 0) for n in lengths])
    items[5, :7] = rng.integers(1, 41, size=7)  # another user
    ts = np.stack([np.where(np.arange(30) < n, burst_ts, 0) for n in lengths])
    memory = has = None
    if memory_tokens:
        memory = np.repeat(rng.standard_normal((1, *cfg.memory_shape)).astype(np.float32), 6, axis=0)
        has = np.ones(6, bool)
    assert len(set(shared_prefixes(items, lengths, ts, memory, has).tolist())) == 2
    assert_rows_as_alone(runner, memory, has, items, lengths, ts)


@pytest.mark.parametrize("memory_tokens", [0, 3])
def test_request_time_rows_are_answered_each_on_its_own_at_its_request_time(memory_tokens: int) -> None:
    """A request-time model's burst: every row is its own pass (no shared prefixes), and each is
    asked at its request's time, as the model alone would be."""
    torch.manual_seed(2)
    cfg = ModelConfig(num_items=40, dim=16, head_dim=8, max_len=80, recent_len=6, dropout=0.0,
                      num_memory_tokens=memory_tokens, time_bias=True, request_time=True, num_time_buckets=129,
                      bias_init_std=0.5)  # non-zero biases, so that times matter
    model = build_model(cfg).eval()
    runner = ModelRunner(make_checkpoint(model, "{}"), "cpu")
    rng = np.random.default_rng(2)
    burst = rng.integers(1, 41, size=20)
    burst_ts = 10**9 + np.cumsum(rng.choice([0, 5, 60, 86400], size=20))
    lengths = np.array([3, 20, 12, 7])
    items = np.stack([np.where(np.arange(20) < n, burst, 0) for n in lengths])
    ts = np.stack([np.where(np.arange(20) < n, burst_ts, 0) for n in lengths])
    request = burst_ts[lengths - 1] + np.array([0, 30, 3600, 0])
    memory = has = None
    if memory_tokens:
        memory = np.repeat(rng.standard_normal((1, *cfg.memory_shape)).astype(np.float32), 4, axis=0)
        has = np.ones(4, bool)
    ids, scores = runner.recommend(inputs(memory, has, items, lengths, ts, request), 5)
    with torch.no_grad():
        for i, n in enumerate(lengths):
            mem = None if memory is None else torch.from_numpy(memory[i:i + 1])
            vec = model.recommend(mem, torch.from_numpy(items[i:i + 1, :n]), torch.tensor([n]),
                                  torch.from_numpy(ts[i:i + 1, :n]), request_ts=torch.tensor([request[i]]))
            s = model.score(vec)[0]
            s[torch.from_numpy(items[i, :n])] = float("-inf")
            top = torch.topk(s, 5)
            assert ids[i].tolist() == top.indices.tolist()
            assert np.allclose(scores[i], top.values.numpy(), atol=1e-5)
    # asked later, the same row gets another answer
    later = runner.recommend(inputs(memory, has, items, lengths, ts, request + 30 * 86400), 5)[1]
    assert not np.allclose(later, scores, atol=1e-6)
