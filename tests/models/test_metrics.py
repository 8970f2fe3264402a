"""models/metrics.py against hand-computed cases and a brute-force loop."""

from __future__ import annotations

import math

import pytest
import torch

from persrec.models.metrics import RankingAccumulator, metrics_from_ranks, rank_of_target

# Column 0 is padding; items 1..5.
SCORES = torch.tensor(
    [
        [9.0, 0.1, 0.5, 0.3, 0.9, 0.7],
        [9.0, 0.4, 0.4, 0.4, 0.1, 0.2],
    ]
)


def test_rank_without_exclusion_ignores_padding_column():
    # Row 0: item 3 (0.3) is beaten by 4 (0.9), 5 (0.7), 2 (0.5); padding (9.0) never counts.
    # Row 1: item 4 (0.1) is beaten by all other items.
    assert rank_of_target(SCORES, torch.tensor([3, 4])).tolist() == [3, 4]
    assert rank_of_target(SCORES, torch.tensor([4, 1])).tolist() == [0, 0]


def test_rank_with_exclusion_and_repeated_target():
    exclude = torch.tensor([[4, 5, 0], [1, 2, 0]])
    # Row 0: 4 and 5 are excluded, only 2 beats 3. Row 1: 1 and 2 are excluded, only 3 beats 5.
    assert rank_of_target(SCORES, torch.tensor([3, 5]), exclude).tolist() == [1, 1]
    # The target is never excluded, even when it appears in the history (twice in row 1).
    assert rank_of_target(
        SCORES, torch.tensor([4, 5]), torch.tensor([[4, 2, 0], [5, 5, 1]])
    ).tolist() == [0, 2]


def test_ties_are_optimistic():
    # Row 1: items 1, 2, 3 tie at 0.4; each is ranked 0.
    ranks = rank_of_target(SCORES, torch.tensor([1, 2]))
    assert ranks.tolist() == [4, 0]
    assert rank_of_target(torch.zeros(1, 6), torch.tensor([5])).tolist() == [0]


def test_rank_rejects_padding_or_out_of_range_targets():
    with pytest.raises(ValueError, match="dense ids"):
        rank_of_target(SCORES, torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="dense ids"):
        rank_of_target(SCORES, torch.tensor([6, 1]))


def test_metrics_by_hand():
    ranks = torch.tensor([0, 1, 9, 10, 60])
    m = metrics_from_ranks(ranks, ks=(1, 10, 50))
    assert list(m) == ["hr@1", "ndcg@1", "hr@10", "ndcg@10", "hr@50", "ndcg@50", "mrr"]
    assert m["hr@1"] == pytest.approx(1 / 5)
    assert m["ndcg@1"] == pytest.approx(1 / 5)
    assert m["hr@10"] == pytest.approx(3 / 5)
    assert m["ndcg@10"] == pytest.approx((1 + 1 / math.log2(3) + 1 / math.log2(11)) / 5)
    assert m["hr@50"] == pytest.approx(4 / 5)
    assert m["ndcg@50"] == pytest.approx(
        (1 + 1 / math.log2(3) + 1 / math.log2(11) + 1 / math.log2(12)) / 5
    )
    assert m["mrr"] == pytest.approx((1 + 1 / 2 + 1 / 10 + 1 / 11 + 1 / 61) / 5)
    assert set(metrics_from_ranks(ranks)) == {
        "hr@10",
        "ndcg@10",
        "hr@50",
        "ndcg@50",
        "hr@200",
        "ndcg@200",
        "mrr",
    }
    with pytest.raises(ValueError):
        metrics_from_ranks(torch.tensor([], dtype=torch.long))


def _brute_force(scores, targets, exclude, ks):
    ranks = []
    for row, target, seen in zip(scores.tolist(), targets.tolist(), exclude.tolist(), strict=True):
        dropped = {0} | (set(seen) - {target})
        ranks.append(sum(1 for j, s in enumerate(row) if j not in dropped and s > row[target]))
    out = {}
    for k in ks:
        out[f"hr@{k}"] = sum(r < k for r in ranks) / len(ranks)
        out[f"ndcg@{k}"] = sum(1 / math.log2(r + 2) for r in ranks if r < k) / len(ranks)
    out["mrr"] = sum(1 / (r + 1) for r in ranks) / len(ranks)
    return ranks, out


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_brute_force_on_random_data(seed):
    gen = torch.Generator().manual_seed(seed)
    batch, num_items, ks = 64, 300, (1, 5, 20, 100)
    # Rounded scores make ties common.
    scores = torch.round(torch.randn(batch, num_items, generator=gen) * 4) / 4
    targets = torch.randint(1, num_items, (batch,), generator=gen)
    exclude = torch.randint(0, num_items, (batch, 40), generator=gen)
    exclude[:8, 0] = targets[:8]  # some targets were seen before
    expected_ranks, expected = _brute_force(scores, targets, exclude, ks)

    ranks = rank_of_target(scores, targets, exclude)
    assert ranks.dtype == torch.long
    assert ranks.tolist() == expected_ranks
    assert metrics_from_ranks(ranks, ks) == pytest.approx(expected)

    acc = RankingAccumulator(ks)
    for chunk in ranks.split(10):
        acc.add(chunk)
    result = acc.compute()
    assert result.pop("count") == batch
    assert result == pytest.approx(expected)


def test_accumulator_empty_raises():
    with pytest.raises(ValueError):
        RankingAccumulator().compute()


def test_paired_ratio_interval_brackets_the_ratio_and_shrinks_with_users():
    from persrec.models.metrics import ndcg_at, paired_ratio_interval

    assert torch.allclose(ndcg_at(torch.tensor([0, 1, 9, 10]), 10),
                          torch.tensor([1.0, 1 / math.log2(3), 1 / math.log2(11), 0.0], dtype=torch.float64))
    gen = torch.Generator().manual_seed(1)
    base = torch.rand(4000, generator=gen, dtype=torch.float64)
    better = base * 1.1  # the same users, 10% higher each
    ratio, lo, hi = paired_ratio_interval(better, base)
    assert ratio == pytest.approx(1.1) and lo == pytest.approx(1.1) and hi == pytest.approx(1.1)
    noisy = base + 0.2 * torch.rand(4000, generator=gen, dtype=torch.float64)
    ratio, lo, hi = paired_ratio_interval(noisy, base)
    small = paired_ratio_interval(noisy[:400], base[:400])
    assert lo < ratio < hi and hi - lo < small[2] - small[1]
    with pytest.raises(ValueError):
        paired_ratio_interval(base, base[:10])
    sparse = torch.zeros(40, dtype=torch.float64)
    sparse[:2] = 1.0  # a small bucket, mostly misses: some resamples are 0 / 0
    ratio, lo, hi = paired_ratio_interval(sparse, sparse)
    assert (ratio, lo, hi) == (1.0, 1.0, 1.0)


def test_a_repeated_target_is_a_miss_when_seen_items_are_excluded():
    history = torch.tensor([[4, 2, 0], [5, 5, 1]])
    # Row 0's target 4 was seen: excluded with the rest of the history, it ranks last (I = 6).
    # Row 1's target 3 was not: 5 and 1 are excluded, 2 ties it and 4 is below: rank 0.
    got = rank_of_target(SCORES, torch.tensor([4, 3]), history, exclude_target=True)
    assert got.tolist() == [SCORES.shape[1], 0]
    assert metrics_from_ranks(got, ks=(5,))["hr@5"] == 0.5
