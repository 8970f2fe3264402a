"""Leave-one-out evaluation: full ranking over all items, history items excluded."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from .layout import collate
from .metrics import RankingAccumulator, rank_of_target


def pad_ids(rows: list[np.ndarray], device: torch.device | str = "cpu") -> torch.Tensor:
    """Right-pad int64 id arrays with 0 into ``[B, max_len]`` (at least one column)."""
    width = max([1] + [len(r) for r in rows])
    out = np.zeros((len(rows), width), np.int64)
    for i, r in enumerate(rows):
        out[i, : len(r)] = r
    return torch.from_numpy(out).to(device)


@torch.no_grad()
def user_vectors(
    model: nn.Module, histories: list[np.ndarray], timestamps: list[np.ndarray] | None,
    device: torch.device | str,
) -> torch.Tensor:
    """Full-pass user vectors ``[B, D]`` from each history's last ``max_len`` items."""
    max_len = model.cfg.max_len
    inputs = [h[-max_len:] for h in histories]
    ts = None if timestamps is None else [t[-max_len:] for t in timestamps]
    batch = collate(inputs, model.cfg, timestamps=ts).to(device)
    hidden = model(batch)
    return hidden[torch.arange(len(inputs), device=hidden.device), batch.last]


@torch.no_grad()
def target_ranks(model: nn.Module, rows, *, device: torch.device | str = "cpu", batch_size: int = 256) -> torch.Tensor:
    """0-based rank of each row's target ``[R]`` (in the rows' order) under the protocol below."""
    was_training = model.training
    model.eval()
    ranks = torch.zeros(len(rows.target), dtype=torch.long)
    order = np.argsort([len(h) for h in rows.history], kind="stable")  # similar lengths batch well
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        hist = [rows.history[i] for i in idx]
        ts = None if rows.history_ts is None else [rows.history_ts[i] for i in idx]
        scores = model.score(user_vectors(model, hist, ts, device))
        targets = torch.as_tensor(rows.target[idx], device=scores.device)
        ranks[torch.from_numpy(idx)] = rank_of_target(scores, targets, pad_ids(hist, scores.device)).cpu()
    model.train(was_training)
    return ranks


def evaluate(
    model: nn.Module, rows, *, device: torch.device | str = "cpu", batch_size: int = 256,
    ks: tuple[int, ...] = (10, 50, 200),
) -> dict[str, float]:
    """Metrics of ``model`` on ``EvalRows`` (``history``, ``history_ts``, ``target``).

    Each row's history is its user's whole prefix; the model reads its last ``max_len`` items
    and every item of the prefix is excluded from the ranking (the target itself stays rankable).
    """
    acc = RankingAccumulator(ks)
    acc.add(target_ranks(model, rows, device=device, batch_size=batch_size))
    return acc.compute()


def popularity_metrics(train_items: list[np.ndarray], num_items: int, rows, ks=(10, 50, 200)) -> dict[str, float]:
    """The same protocol for a most-popular ranker (counts over training sequences)."""
    counts = np.bincount(np.concatenate(train_items), minlength=num_items + 1).astype(np.float32)
    acc = RankingAccumulator(ks)
    base = torch.from_numpy(counts)
    for start in range(0, len(rows.target), 1024):
        sl = slice(start, start + 1024)
        hist = rows.history[sl]
        scores = base.expand(len(hist), -1).clone()
        acc.add(rank_of_target(scores, torch.as_tensor(rows.target[sl]), pad_ids(hist)))
    return acc.compute()
