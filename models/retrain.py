"""Continuous training: fine-tune the served checkpoint on the interactions that arrived since
it was trained, and hand the result over only if it is not worse on the newest events.

The split (``retrain_split``): every user with events at or after ``since`` holds out their
newest event (the evaluation row: history = all their events before it); the fine-tuning data
are those users' sequences without the held-out event, so the model sees the new events in
the context of the users' older ones (which also keeps it from forgetting them). Items the
checkpoint does not know are dropped (its id map is fixed; a text model learns them from the
items topic instead). The gate (``gate``) compares the old and the new model on the same rows.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .data import EvalRows, IdMap, SequenceData, build_sequences
from .logs import Interactions


def known_sequences(inter: Interactions, id_map: IdMap) -> tuple[SequenceData, int]:
    """The users' sequences of the items ``id_map`` knows, and how many events were dropped."""
    known = np.isin(inter.items, id_map.items)
    kept = Interactions(inter.users[known], inter.items[known],
                        None if inter.timestamps is None else inter.timestamps[known])
    return build_sequences(kept, id_map)[0], int(np.count_nonzero(~known))


@dataclass(frozen=True)
class RetrainSplit:
    train: SequenceData  # users with new events, each without their held-out event
    holdout: EvalRows  # per such user: every earlier event -> the newest event
    new_events: int  # events at or after ``since`` (held-out ones included)


def retrain_split(seqs: SequenceData, since: int) -> RetrainSplit:
    """See the module docstring. ``seqs`` must have timestamps; a user whose only event is new
    has no history to predict from and trains nothing."""
    if seqs.timestamps is None:
        raise ValueError("retraining needs event times: the data has none")
    users, items, times, rows = [], [], [], []
    new_events = 0
    for u, (s, t) in enumerate(zip(seqs.items, seqs.timestamps)):
        fresh = int(np.count_nonzero(t >= since))
        new_events += fresh
        if fresh == 0 or len(s) < 2:
            continue
        users.append(seqs.user_ids[u])
        items.append(s[:-1])
        times.append(t[:-1])
        rows.append(u)
    holdout = EvalRows(np.array(rows, np.int64), [seqs.items[u][:-1] for u in rows],
                       [seqs.timestamps[u][:-1] for u in rows],
                       np.array([seqs.items[u][-1] for u in rows], np.int64),
                       np.array([seqs.timestamps[u][-1] for u in rows], np.int64))
    return RetrainSplit(SequenceData(users, items, times), holdout, new_events)


@dataclass(frozen=True)
class GateDecision:
    metric: str
    old: float
    new: float
    margin: float

    @property
    def passed(self) -> bool:
        """The new model is not worse than the old one by more than ``margin`` (absolute)."""
        return self.new >= self.old - self.margin


def gate(old: dict[str, float], new: dict[str, float], margin: float, metric: str = "ndcg@10") -> GateDecision:
    return GateDecision(metric, float(old[metric]), float(new[metric]), margin)
