"""The batched model runner that the Triton models call gives every row what the model gives
that row alone, however the rows of a batch differ in length."""

import numpy as np
import pytest
import torch

from persrec.models.checkpoint import make_checkpoint
from persrec.models.config import ModelConfig
from persrec.models.loss import build_model
from persrec.serving.inference import ModelRunner, width_groups


def test_width_groups_cover_each_row_once_within_a_factor_two() -> None:
    lengths = np.array([1, 3, 16, 17, 33, 200, 31, 64, 65, 0])
    groups = width_groups(lengths)
    assert sorted(np.concatenate(groups).tolist()) == list(range(len(lengths)))
    for g in groups:
        assert lengths[g].max() <= max(16, 2 * max(lengths[g].min(), 1))


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
    ids, scores = runner.recommend(memory, has, items, lengths, ts, top_k=5)
    for i in range(6):
        one = lambda a: None if a is None else a[i:i + 1]  # noqa: E731
        w = lengths[i]
        alone = runner.recommend(one(memory), one(has), items[i:i + 1, :w], lengths[i:i + 1], ts[i:i + 1, :w], 5)
        assert np.array_equal(alone[0][0], ids[i]) and np.allclose(alone[1][0], scores[i], atol=1e-5)
    if memory_tokens:
        folded = runner.fold(memory, has, items, lengths, ts)
        for i in range(6):
            w = lengths[i]
            alone = runner.fold(memory[i:i + 1], has[i:i + 1], items[i:i + 1, :w], lengths[i:i + 1], ts[i:i + 1, :w])
            assert np.allclose(alone[0], folded[i], atol=1e-5)
