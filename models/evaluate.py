"""Leave-one-out evaluation: full ranking over all items, under an explicit rule for the items
the user has already seen."""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from .layout import collate
from .metrics import RankingAccumulator, rank_of_target


class Seen(str, enum.Enum):
    """What happens to items already in the user's history.

    EXCLUDE: every history item leaves the ranking, a target the user saw before included (that
    row is then a miss). The protocol behind the published ML-1M figures, where no item repeats.
    KEEP: nothing leaves the ranking; a repeated item can be recommended and counts as a hit.
    """

    EXCLUDE = "exclude"
    KEEP = "keep"


@dataclass(frozen=True)
class SeenRule:
    """``seen`` applied to the whole history, or with ``window`` to its last ``window`` items
    only (the official HSTU evaluation filters the 200 items the model reads)."""

    seen: Seen = Seen.EXCLUDE
    window: int | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "seen", Seen(self.seen))
        if self.window is not None and self.window < 1:
            raise ValueError("window must be >= 1")

    def excluded(self, history: np.ndarray) -> np.ndarray:
        if self.seen is Seen.KEEP:
            return history[:0]
        return history if self.window is None else history[-self.window:]


def pad_ids(rows: list[np.ndarray], device: torch.device | str = "cpu") -> torch.Tensor:
    """Right-pad int64 id arrays with 0 into ``[B, max_len]`` (at least one column)."""
    width = max([1] + [len(r) for r in rows])
    out = np.zeros((len(rows), width), np.int64)
    for i, r in enumerate(rows):
        out[i, : len(r)] = r
    return torch.from_numpy(out).to(device)


def _batch_inputs(model_cfg, histories, timestamps, request_ts, max_len: int | None = None):
    """``collate`` of each history's last ``max_len`` items (default the model's; with the query
    times of a ``request_time`` model: the next item's, then ``request_ts``)."""
    max_len = max_len or model_cfg.max_len
    inputs = [h[-max_len:] for h in histories]
    ts = qts = None
    if timestamps is not None:
        ts = [t[-max_len:] for t in timestamps]
        if request_ts is not None:
            qts = [np.append(t[1:], r) for t, r in zip(ts, request_ts)]
    return collate(inputs, model_cfg, timestamps=ts, query_timestamps=qts)


@torch.no_grad()
def user_vectors(
    model: nn.Module, histories: list[np.ndarray], timestamps: list[np.ndarray] | None,
    device: torch.device | str, request_ts: np.ndarray | None = None, *, whole: bool = False,
) -> torch.Tensor:
    """Full-pass user vectors ``[B, D]`` from each history's last ``max_len`` items (``whole``:
    every item, relative distances beyond ``max_len`` clamped as in training).
    ``request_ts`` ``[B]``: when each recommendation is asked for (the target's time in
    leave-one-out), which the last query of a ``request_time`` model is asked at."""
    cut = max(len(h) for h in histories) if whole else None
    batch = _batch_inputs(model.cfg, histories, timestamps, request_ts, cut).to(device)
    hidden = model(batch)
    return hidden[torch.arange(len(histories), device=hidden.device), batch.last]


# Scores held at once by an evaluation batch: [rows, I + 1] float32, cloned once to rank. 2^25
# is 128 MB: 256 rows up to 131,071 items; a catalogue of a million items gets 33 rows a batch.
SCORE_BUDGET = 1 << 25


def rows_per_batch(num_items: int, batch_size: int) -> int:
    """``batch_size``, or fewer rows where a batch's scores would pass ``SCORE_BUDGET``."""
    return max(1, min(batch_size, SCORE_BUDGET // (num_items + 1)))


class Evaluator:
    """``EvalRows`` laid out once, with the items each seen rule excludes, on ``device``:
    evaluating a model again (every epoch of a training run) lays nothing out again. A batch has
    ``batch_size`` rows at most, fewer for a large catalogue (``rows_per_batch``).

    ``lifelong``: the model reads each user's whole history as the stream serves it (every
    whole segment folded, the rest raw: ``lifelong.lifelong_vectors``), not its last
    ``max_len`` items in one pass. A ``memory_carry`` model has no one-pass reading: always so."""

    def __init__(self, rows, model_cfg, rules: dict[str, SeenRule] | None = None, *,
                 device: torch.device | str = "cpu", batch_size: int = 256, lifelong: bool = False) -> None:
        self.rules = rules or {"exclude": SeenRule()}
        self.count = len(rows.target)
        self.rows, self.device, self.lifelong = rows, device, lifelong or model_cfg.memory_carry
        order = np.argsort([len(h) for h in rows.history], kind="stable")  # similar lengths batch well
        batch_size = rows_per_batch(model_cfg.num_items, batch_size)
        self.batches = []
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            hist = [rows.history[i] for i in idx]
            ts = None if rows.history_ts is None else [rows.history_ts[i] for i in idx]
            request = None if rows.target_ts is None else rows.target_ts[idx]
            batch = _batch_inputs(model_cfg, hist, ts, request).to(device)
            targets = torch.as_tensor(rows.target[idx], device=device)
            exclude = {name: pad_ids([rule.excluded(h) for h in hist], device) for name, rule in self.rules.items()}
            self.batches.append((torch.from_numpy(idx), batch, targets, exclude))

    @torch.no_grad()
    def ranks(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """0-based rank of each row's target ``[R]`` (in the rows' order) under each rule."""
        ranks = {name: torch.zeros(self.count, dtype=torch.long) for name in self.rules}
        for idx, scores, targets, exclude in self._scores(model):
            for name, rule in self.rules.items():
                ranks[name][idx] = rank_of_target(
                    scores, targets, exclude[name], exclude_target=rule.seen is Seen.EXCLUDE).cpu()
        return ranks

    @torch.no_grad()
    def top_items(self, model: nn.Module, k: int, rule: str = "exclude") -> torch.Tensor:
        """Each row's top-``k`` item ids ``[R, k]`` (in the rows' order), what the model would
        recommend: padding and the items ``rule`` excludes left out."""
        top = torch.zeros(self.count, k, dtype=torch.long)
        for idx, scores, _targets, exclude in self._scores(model):
            scores[:, 0] = -math.inf
            scores.scatter_(1, exclude[rule], -math.inf)  # padding entries hit column 0 again
            top[idx] = scores.topk(k, dim=1).indices.cpu()
        return top

    def _scores(self, model: nn.Module):
        """-> (row indices, scores ``[b, I+1]``, targets, excluded ids by rule) per batch."""
        was_training = model.training
        model.eval()
        vectors = None
        if self.lifelong:
            from .lifelong import lifelong_vectors

            r = self.rows
            vectors = lifelong_vectors(model, r.history, r.history_ts, r.target_ts, device=self.device)
        try:
            for idx, batch, targets, exclude in self.batches:
                if vectors is None:
                    hidden = model(batch)
                    users = hidden[torch.arange(len(idx), device=hidden.device), batch.last]
                else:
                    users = vectors[idx.to(vectors.device)]
                yield idx, model.score(users), targets, exclude
        finally:
            model.train(was_training)

    def metrics(self, model: nn.Module, ks: tuple[int, ...] = (10, 50, 200)) -> dict[str, dict[str, float]]:
        return self.metrics_and_ranks(model, ks)[0]

    def metrics_and_ranks(
        self, model: nn.Module, ks: tuple[int, ...] = (10, 50, 200),
    ) -> tuple[dict[str, dict[str, float]], dict[str, torch.Tensor]]:
        """One reading (a lifelong one folds every history once): the metrics under each rule,
        and the ranks (``ranks``) they come from."""
        ranks = self.ranks(model)
        metrics = {}
        for name, r in ranks.items():
            acc = RankingAccumulator(ks)
            acc.add(r)
            metrics[name] = acc.compute()
        return metrics, ranks


def target_ranks(
    model: nn.Module, rows, *, device: torch.device | str = "cpu", batch_size: int = 256,
    rules: dict[str, SeenRule] | None = None,
) -> dict[str, torch.Tensor]:
    """0-based rank of each row's target ``[R]`` (in the rows' order) under each of ``rules``
    (name -> rule; default one ``SeenRule()`` named ``exclude``). Scores are computed once."""
    return Evaluator(rows, model.cfg, rules, device=device, batch_size=batch_size).ranks(model)


def evaluate_rules(
    model: nn.Module, rows, rules: dict[str, SeenRule], *, device: torch.device | str = "cpu",
    batch_size: int = 256, ks: tuple[int, ...] = (10, 50, 200),
) -> dict[str, dict[str, float]]:
    """``evaluate`` under several seen rules at the cost of one: rule name -> metrics."""
    return Evaluator(rows, model.cfg, rules, device=device, batch_size=batch_size).metrics(model, ks)


def evaluate(
    model: nn.Module, rows, *, device: torch.device | str = "cpu", batch_size: int = 256,
    ks: tuple[int, ...] = (10, 50, 200), seen: SeenRule = SeenRule(),
) -> dict[str, float]:
    """Metrics of ``model`` on ``EvalRows`` (``history``, ``history_ts``, ``target``,
    ``target_ts``): each row's history is its user's whole prefix, the model reads its last
    ``max_len`` items, and ``seen`` says which history items leave the ranking (by default
    all of them, a repeated target included)."""
    return evaluate_rules(model, rows, {"r": seen}, device=device, batch_size=batch_size, ks=ks)["r"]


def popularity_metrics(
    train_items: list[np.ndarray], num_items: int, rows, ks=(10, 50, 200), seen: SeenRule = SeenRule(),
) -> dict[str, float]:
    """The same protocol for a most-popular ranker (counts over training sequences)."""
    counts = np.bincount(np.concatenate(train_items), minlength=num_items + 1).astype(np.float32)
    acc = RankingAccumulator(ks)
    base = torch.from_numpy(counts)
    step = rows_per_batch(num_items, 1024)
    for start in range(0, len(rows.target), step):
        sl = slice(start, start + step)
        hist = rows.history[sl]
        scores = base.expand(len(hist), -1).clone()
        exclude = pad_ids([seen.excluded(h) for h in hist])
        acc.add(rank_of_target(scores, torch.as_tensor(rows.target[sl]), exclude,
                               exclude_target=seen.seen is Seen.EXCLUDE))
    return acc.compute()
