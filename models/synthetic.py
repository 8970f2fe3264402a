"""Generated interaction logs (not real users) with known structure: a learnable item chain
(`synthetic_interactions`), a taste that returns only after long absences
(`dormant_interest_interactions`) and a steady taste in noise (`steady_taste_interactions`),
the controls of the sequential model and of the lifelong memory."""

from __future__ import annotations

import math

import numpy as np

from .data import MIN_EVAL_LENGTH
from .logs import Interactions


class _Wander:
    """The synthetic sets' item chain. Items fall into contiguous clusters (about sqrt(I)/2). From
    item i a user moves, per step: p=0.6 to succ(i), a fixed random successor (the learnable
    sequential pattern); p=0.3 to a popularity-skewed (Zipf) item of the same cluster; p=0.1 to
    a popularity-skewed item anywhere."""

    def __init__(self, num_items: int, rng: np.random.Generator) -> None:
        self.num_items, self.rng = num_items, rng
        num_clusters = max(1, math.isqrt(num_items) // 2)
        self.cluster_of = np.arange(num_items) * num_clusters // num_items
        self.cluster_start = np.searchsorted(self.cluster_of, np.arange(num_clusters))
        self.cluster_size = np.bincount(self.cluster_of, minlength=num_clusters)
        self.successor = rng.permutation(num_items)
        zipf = 1.0 / np.arange(1, num_items + 1)
        self.popularity = np.empty(num_items)
        self.popularity[rng.permutation(num_items)] = zipf / zipf.sum()
        self.local_cdf = np.cumsum(zipf[: self.cluster_size.max()])

    def first(self, n: int) -> np.ndarray:
        return self.rng.choice(self.num_items, size=n, p=self.popularity)

    def in_cluster(self, cluster: np.ndarray) -> np.ndarray:
        """A popularity-skewed item of each ``cluster`` (its first items the most popular)."""
        local = np.searchsorted(self.local_cdf, self.rng.random(len(cluster)) * self.local_cdf[-1])
        return self.cluster_start[cluster] + local % self.cluster_size[cluster]

    def step(self, current: np.ndarray) -> np.ndarray:
        move = self.rng.random(len(current))
        local = self.in_cluster(self.cluster_of[current])
        anywhere = self.first(len(current))
        return np.where(move < 0.6, self.successor[current], np.where(move < 0.9, local, anywhere))


def _interactions(walk: np.ndarray, keep: np.ndarray, rng: np.random.Generator,
                  away: np.ndarray | None = None) -> Interactions:
    """``walk`` ``[U, T]`` items, ``keep`` ``[U, T]`` which steps happened; gaps between events
    are 1 min + Exp(1 h), plus ``away`` ``[U, T]`` seconds where given; ids are "u<k>" and "i<k>";
    events come user by user, oldest first."""
    gaps = 60 + rng.exponential(3600.0, size=walk.shape).astype(np.int64) + (0 if away is None else away)
    start = 1_600_000_000 + rng.integers(0, 90 * 86400, size=(walk.shape[0], 1))
    times = start + np.cumsum(gaps, axis=1)
    users = np.char.add("u", np.repeat(np.arange(walk.shape[0]), keep.sum(1)).astype(np.str_))
    items = np.char.add("i", walk[keep].astype(np.str_))
    return Interactions(users, items, times[keep])


def synthetic_interactions(
    num_users: int = 500, num_items: int = 300, mean_len: float = 40.0, seed: int = 0
) -> Interactions:
    """SYNTHETIC data (not real users): a Markov chain a sequential model can learn
    (``_Wander``). A popularity ranker captures only the skew, so a sequential model should beat
    it. Lengths are 3 + Poisson(mean_len - 3)."""
    if num_users < 1 or num_items < 2 or mean_len < 3:
        raise ValueError("need num_users >= 1, num_items >= 2, mean_len >= 3")
    rng = np.random.default_rng(seed)
    chain = _Wander(num_items, rng)
    lengths = MIN_EVAL_LENGTH + rng.poisson(mean_len - MIN_EVAL_LENGTH, size=num_users)
    walk = np.empty((num_users, lengths.max()), dtype=np.int64)  # [U, T] item per step
    walk[:, 0] = chain.first(num_users)
    for t in range(1, walk.shape[1]):
        walk[:, t] = chain.step(walk[:, t - 1])
    return _interactions(walk, np.arange(walk.shape[1]) < lengths[:, None], rng)


def dormant_interest_interactions(
    num_users: int = 400, num_items: int = 2000, phases: int = 4, wander: tuple[int, int] = (60, 100),
    taste_len: int = 5, away_s: int = 7 * 86400, seed: int = 0,
) -> Interactions:
    """SYNTHETIC long-range data (not real users): a taste that shows only now and then.

    Each user has a taste, one item cluster drawn at random. They wander as in
    ``synthetic_interactions`` for ``wander`` events (drawn uniformly, both ends included), then
    come back after ``away_s`` (a week) and take ``taste_len`` items of their taste cluster,
    ``phases`` times; then they wander once more, and their last event opens a new taste phase.
    Taste items are new to the user (drawn without replacement, the cluster's popular items
    likelier), so a model that knows the taste can rank the target among the unseen items.
    *That* a taste phase begins, a model that reads the request's time sees (the week away);
    *which* taste, only events at least ``wander[0]`` back tell: a model that reads fewer cannot
    know it, a memory of the whole history can. The test target is the last event; the
    validation target (second to last) is a wandering step.
    """
    lo, hi = wander
    if num_users < 1 or num_items < 2 or phases < 1 or taste_len < 1 or not 1 <= lo <= hi:
        raise ValueError("need num_users >= 1, num_items >= 2, phases >= 1, taste_len >= 1, 1 <= wander[0] <= wander[1]")
    rng = np.random.default_rng(seed)
    chain = _Wander(num_items, rng)
    taste = rng.integers(0, len(chain.cluster_start), size=num_users)
    if phases * taste_len + 1 > chain.cluster_size.min():
        raise ValueError(f"{phases} phases of {taste_len} need clusters of more than {phases * taste_len} items")
    runs = rng.integers(lo, hi + 1, size=(num_users, phases + 1))  # wandering lengths
    starts = np.cumsum(runs + taste_len, axis=1) - taste_len  # [U, P + 1]: each taste phase's first step
    lengths = starts[:, -1] + 1  # the last taste phase is its first event only
    steps = np.arange(lengths.max())
    walk = np.empty((num_users, len(steps)), dtype=np.int64)
    walk[:, 0] = chain.first(num_users)
    for t in range(1, len(steps)):
        walk[:, t] = chain.step(walk[:, t - 1])
    for u in range(num_users):  # each user's taste items, in the order taken: new ones, popular first
        first, size = chain.cluster_start[taste[u]], chain.cluster_size[taste[u]]
        weights = 1.0 / np.arange(1, size + 1)
        order = first + rng.choice(size, size=phases * taste_len + 1, replace=False, p=weights / weights.sum())
        at = (starts[u][:, None] + np.arange(taste_len)[None, :]).ravel()[: len(order)]
        walk[u, at] = order
    away = np.zeros_like(walk)
    np.put_along_axis(away, starts, away_s, axis=1)
    return _interactions(walk, steps[None, :] < lengths[:, None], rng, away)


def steady_taste_interactions(
    num_users: int = 600, num_items: int = 2000, length: tuple[int, int] = (300, 600), rate: float = 0.1,
    noise: str = "wander", seed: int = 0,
) -> Interactions:
    """SYNTHETIC long-range data (not real users): a steady taste, diluted in noise.

    Each user has a taste, one item cluster drawn at random. At each step they take an item of
    it with probability ``rate`` (its popular items likelier); otherwise, with ``noise="wander"``,
    they wander on from their last item as in ``synthetic_interactions``, and with
    ``noise="uniform"`` they take any item, all equally likely (nothing to learn but the taste).
    Their last event, the test target, is a taste item new to them. One taste item tells little
    (the noise visits every cluster), so the more of a history a model reads, the surer it knows
    the taste: at rate 0.1, about 1.5 of a recent part of 15 items, 4 of 40, 30-60 of the whole.
    Lengths are drawn uniformly from ``length`` (both ends included).
    """
    lo, hi = length
    if num_users < 1 or num_items < 2 or not 0.0 < rate < 1.0 or not MIN_EVAL_LENGTH <= lo <= hi:
        raise ValueError(f"need num_users >= 1, num_items >= 2, 0 < rate < 1, {MIN_EVAL_LENGTH} <= length[0] <= length[1]")
    if noise not in ("wander", "uniform"):
        raise ValueError(f"noise is 'wander' or 'uniform', not {noise!r}")
    rng = np.random.default_rng(seed)
    chain = _Wander(num_items, rng)
    taste = rng.integers(0, len(chain.cluster_start), size=num_users)
    lengths = rng.integers(lo, hi + 1, size=num_users)
    walk = np.empty((num_users, lengths.max()), dtype=np.int64)
    walk[:, 0] = chain.first(num_users)
    for t in range(1, walk.shape[1]):
        takes_taste, liked = rng.random(num_users) < rate, chain.in_cluster(taste)
        other = chain.step(walk[:, t - 1]) if noise == "wander" else rng.integers(0, num_items, size=num_users)
        walk[:, t] = np.where(takes_taste, liked, other)
    for u in range(num_users):  # the test target: a taste item the user has not taken, popular ones likelier
        first, size = chain.cluster_start[taste[u]], chain.cluster_size[taste[u]]
        weights = np.where(np.isin(first + np.arange(size), walk[u, : lengths[u] - 1]), 0.0, 1.0 / np.arange(1, size + 1))
        if weights.sum() == 0:
            raise ValueError(f"user {u} took every item of their taste cluster: use longer clusters or shorter lengths")
        walk[u, lengths[u] - 1] = first + rng.choice(size, p=weights / weights.sum())
    return _interactions(walk, np.arange(walk.shape[1]) < lengths[:, None], rng)
