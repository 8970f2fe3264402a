"""Full-ranking next-item metrics: HR@k, NDCG@k and MRR from the rank of the target.

Protocol (SASRec/HSTU, ML-1M leave-one-out): score every item, drop the padding column 0 and
the user's already-seen items, and rank the target among the rest. Pure functions on tensors.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

DEFAULT_KS: tuple[int, ...] = (10, 50, 200)


def rank_of_target(
    scores: torch.Tensor, targets: torch.Tensor, exclude: torch.Tensor | None = None,
    exclude_target: bool = False,
) -> torch.Tensor:
    """0-based rank of each target among all items.

    scores:  [B, I] float, column j scores dense item j (column 0 is padding).
    targets: [B] long, dense ids in 1..I-1.
    exclude: [B, N] long or None, item ids to leave out of the ranking (typically the history);
             0 entries are padding.
    Returns [B] long: the number of ranked items whose score is strictly greater than the
    target's. Ties therefore count in the target's favour (optimistic), which only matters for
    degenerate models that give many items the same score.

    Column 0 and every excluded item are set to -inf before counting. A target that is itself
    in `exclude` (the user saw it before) stays rankable unless `exclude_target`; then it is a
    miss at every cut-off: its rank is the number of columns, I.
    """
    if scores.dim() != 2 or targets.shape != scores.shape[:1]:
        shapes = f"{tuple(scores.shape)} and {tuple(targets.shape)}"
        raise ValueError(f"scores must be [B, I] and targets [B], got {shapes}")
    if bool(((targets < 1) | (targets >= scores.shape[1])).any()):
        raise ValueError(f"targets must be dense ids in 1..{scores.shape[1] - 1}")
    target_score = scores.gather(1, targets[:, None])  # [B, 1]
    masked = scores.clone()
    masked[:, 0] = -math.inf
    if exclude is not None:
        masked.scatter_(1, exclude, -math.inf)  # id 0 lands on the padding column
    # The target's own column is never strictly greater than itself, masked or not.
    ranks = (masked > target_score).sum(dim=1)
    if exclude is not None and exclude_target:
        seen = (exclude == targets[:, None]).any(dim=1)
        ranks = torch.where(seen, torch.full_like(ranks, scores.shape[1]), ranks)
    return ranks


def _sums(ranks: torch.Tensor, ks: Sequence[int]) -> dict[str, float]:
    """Per-metric sums over the batch (float64), for averaging later."""
    ranks = ranks.detach().reshape(-1).to(device="cpu", dtype=torch.float64)
    out: dict[str, float] = {}
    for k in ks:
        hit = ranks < k
        out[f"hr@{k}"] = float(hit.sum())
        out[f"ndcg@{k}"] = float(
            torch.where(hit, 1.0 / torch.log2(ranks + 2.0), torch.zeros_like(ranks)).sum()
        )
    out["mrr"] = float((1.0 / (ranks + 1.0)).sum())
    return out


def metrics_from_ranks(ranks: torch.Tensor, ks: Sequence[int] = DEFAULT_KS) -> dict[str, float]:
    """ranks: [R] long 0-based target ranks → {"hr@k", "ndcg@k" for each k, "mrr"}, means over R.

    HR@k = mean(rank < k); NDCG@k = mean(1 / log2(rank + 2) if rank < k else 0) (one relevant
    item, so no normalisation); MRR = mean(1 / (rank + 1)), not truncated.
    """
    count = ranks.numel()
    if count == 0:
        raise ValueError("no ranks")
    return {name: total / count for name, total in _sums(ranks, ks).items()}


def ndcg_at(ranks: torch.Tensor, k: int) -> torch.Tensor:
    """Per-row NDCG@k ``[R]`` float64 of 0-based ranks ``[R]``."""
    r = ranks.to(torch.float64)
    return torch.where(r < k, 1.0 / torch.log2(r + 2.0), torch.zeros_like(r))


def paired_ratio_interval(
    a: torch.Tensor, b: torch.Tensor, *, resamples: int = 2000, level: float = 0.95, seed: int = 0,
) -> tuple[float, float, float]:
    """mean(a) / mean(b) of per-user values ``[R]`` of two models on the same users, with a
    ``level`` percentile bootstrap interval (users resampled with replacement, the same draw for
    both models): the evaluation's own noise, not the training seed's. A resample in which both
    means are 0 (possible in a small bucket of users) says nothing and is left out; where only
    b's is 0 often enough, the upper bound is inf. The bounds are order statistics."""
    if a.shape != b.shape or a.dim() != 1 or a.numel() == 0:
        raise ValueError("a and b must be per-user values of the same users")
    gen = torch.Generator().manual_seed(seed)
    draws = torch.randint(0, a.numel(), (resamples, a.numel()), generator=gen)
    ratios = a[draws].mean(dim=1) / b[draws].mean(dim=1)
    lo = torch.nanquantile(ratios, (1 - level) / 2, interpolation="lower")
    hi = torch.nanquantile(ratios, (1 + level) / 2, interpolation="higher")  # inf: b's mean was 0 too often
    return float(a.mean() / b.mean()), float(lo), float(hi)


class RankingAccumulator:
    """Adds up ranks batch by batch; `compute()` gives `metrics_from_ranks` over all, plus count."""

    def __init__(self, ks: Sequence[int] = DEFAULT_KS):
        self.ks = tuple(ks)
        self.count = 0
        self._totals = {name: 0.0 for name in _sums(torch.zeros(0), self.ks)}

    def add(self, ranks: torch.Tensor) -> None:
        """ranks: [R] long, from `rank_of_target`."""
        for name, total in _sums(ranks, self.ks).items():
            self._totals[name] += total
        self.count += ranks.numel()

    def compute(self) -> dict[str, float]:
        if self.count == 0:
            raise ValueError("no ranks added")
        metrics = {name: total / self.count for name, total in self._totals.items()}
        metrics["count"] = self.count
        return metrics
