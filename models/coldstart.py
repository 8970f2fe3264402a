"""Item cold start, offline: a share of the items (chosen at random, seeded) is removed from
the training data entirely, so the model meets them first at evaluation, as a streaming
recommender meets new items."""

from __future__ import annotations

import numpy as np

from .data import SequenceData, Split


def hold_out_items(split: Split, num_items: int, fraction: float = 0.1, seed: int = 0) -> tuple[Split, np.ndarray]:
    """``split`` with ``fraction`` of the items 1..``num_items`` taken out of every training
    sequence (their events are dropped; the rest keep their order and times), and those items'
    dense ids (sorted). Validation and test rows are unchanged: their histories and targets may
    hold the held-out items."""
    rng = np.random.default_rng(seed)
    cold = np.sort(rng.choice(np.arange(1, num_items + 1), size=round(fraction * num_items), replace=False))
    is_cold = np.zeros(num_items + 1, bool)
    is_cold[cold] = True
    keep = [~is_cold[s] for s in split.train.items]
    train = SequenceData(
        list(split.train.user_ids), [s[k] for s, k in zip(split.train.items, keep)],
        None if split.train.timestamps is None else [t[k] for t, k in zip(split.train.timestamps, keep)])
    return Split(train, split.valid, split.test), cold
