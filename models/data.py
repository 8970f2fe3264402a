"""Interaction logs → dense item ids → per-user chronological sequences → leave-one-out split.

The pipeline, each step a plain function on plain arrays (numpy + stdlib, no torch):

1. `logs.load_interactions` reads a log in the format it comes in into `Interactions`;
   `k_core` keeps its k-core where asked.
2. `IdMap` maps original item ids to dense ids 1..N in order of first appearance; 0 is padding.
3. `build_sequences` groups events by user into chronological `SequenceData`.
4. `leave_one_out` cuts the last two events of each user into validation and test rows
   (the SASRec/HSTU protocol).

All ratings are kept as implicit interactions; rating values are dropped.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .logs import Interactions, as_str_array


ML1M_SEQUENCE_FILE = Path("ml-1m") / "ml-1m_sequences_original_ids.txt.gz"

# --------------------------------------------------------------------------------------------
# Dense item ids
# --------------------------------------------------------------------------------------------


class IdMap:
    """Original item ids (str) ↔ dense ids 1..N; 0 is reserved for padding.

    `items[k]` gets dense id k + 1. Lookups are vectorised with a sorted copy and
    `np.searchsorted`.
    """

    FORMAT = "persrec.idmap/1"

    def __init__(self, items: Iterable[str]):
        vocab = as_str_array(items)
        if vocab.ndim != 1:
            raise ValueError("IdMap items must be 1-D")
        order = np.argsort(vocab, kind="stable")
        self._items = vocab
        self._sorted = vocab[order]
        self._sorted_ids = order.astype(np.int64) + 1
        duplicate = np.flatnonzero(self._sorted[1:] == self._sorted[:-1])
        if duplicate.size:
            raise ValueError(f"duplicate item id {self._sorted[duplicate[0]]!r}")

    @classmethod
    def from_items(cls, items: Iterable[str]) -> IdMap:
        """Dense ids in order of first appearance in `items` (deterministic)."""
        array = as_str_array(items)
        _, first = np.unique(array, return_index=True)
        return cls(array[np.sort(first)])

    @property
    def num_items(self) -> int:
        """N; dense ids run 1..N, so an embedding table needs N + 1 rows."""
        return len(self._items)

    @property
    def items(self) -> np.ndarray:
        """[N] str original ids, index k holding dense id k + 1 (a copy)."""
        return self._items.copy()

    def __len__(self) -> int:
        return self.num_items

    def __contains__(self, item: object) -> bool:
        return bool(self.encode([str(item)], unknown=0)[0])

    def __eq__(self, other: object) -> bool:
        return isinstance(other, IdMap) and np.array_equal(self._items, other._items)

    def __repr__(self) -> str:
        return f"IdMap(num_items={self.num_items}, fingerprint={self.fingerprint()[:12]})"

    def encode(self, items: Iterable[str], unknown: int | None = None) -> np.ndarray:
        """Original ids (any shape; non-str converted with `str`) → int64 dense ids, same shape.

        unknown: the id to return for ids not in the map; None (default) raises KeyError.
        """
        query = as_str_array(items)
        flat = query.ravel()
        n = self.num_items
        if n == 0:
            found = np.zeros(flat.shape, dtype=bool)
            ids = np.zeros(flat.shape, dtype=np.int64)
        else:
            pos = np.minimum(np.searchsorted(self._sorted, flat), n - 1)
            found = self._sorted[pos] == flat
            ids = self._sorted_ids[pos]
        if not found.all():
            if unknown is None:
                missing = flat[~found]
                raise KeyError(f"{len(missing)} unknown item id(s), first {missing[0]!r}")
            ids = np.where(found, ids, np.int64(unknown))
        return ids.reshape(query.shape)

    def decode(self, ids: Iterable[int]) -> list[str]:
        """Dense ids (flattened) → original ids; ids outside 1..N (0 included) raise KeyError."""
        flat = np.asarray(ids, dtype=np.int64).ravel()
        bad = flat[(flat < 1) | (flat > self.num_items)]
        if bad.size:
            raise KeyError(f"dense id {int(bad[0])} is outside 1..{self.num_items}")
        return self._items[flat - 1].tolist()

    def translate(self, ids: Iterable[int], to: IdMap) -> tuple[np.ndarray, np.ndarray]:
        """Dense ids of this map -> ``to``'s dense ids (0 where ``to`` lacks the item), and the
        mask of those it has: a memory's stored items, read by another model."""
        flat = np.asarray(ids, dtype=np.int64).ravel()
        if to is self or self == to:
            return flat.copy(), np.ones(flat.shape, bool)
        new = to.encode(self.decode(flat), unknown=0) if flat.size else np.zeros(0, np.int64)
        return new, new > 0

    def to_json(self) -> str:
        """Canonical JSON: same map, same bytes."""
        content = {"format": self.FORMAT, "items": self._items.tolist()}
        return json.dumps(content, ensure_ascii=False, separators=(",", ":"), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> IdMap:
        content = json.loads(text)
        if not isinstance(content, dict) or content.get("format") != cls.FORMAT:
            raise ValueError(f"not an IdMap document (expected format {cls.FORMAT!r})")
        return cls(content["items"])

    def save(self, path: str | os.PathLike) -> None:
        Path(path).write_text(self.to_json(), encoding="utf-8")

    @classmethod
    def load(cls, path: str | os.PathLike) -> IdMap:
        return cls.from_json(Path(path).read_text(encoding="utf-8"))

    def fingerprint(self) -> str:
        """sha256 hex of the canonical JSON; identifies the id space a model was trained on."""
        return hashlib.sha256(self.to_json().encode("utf-8")).hexdigest()


# --------------------------------------------------------------------------------------------
# Sequences and the leave-one-out split
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SequenceData:
    """Per-user chronological sequences; index u refers to the same user in every field.

    user_ids:   [U] original user ids, in order of first appearance in the log.
    items:      U arrays of int64 dense item ids, oldest first.
    timestamps: U arrays of int64 unix seconds aligned with `items`, or None.
    """

    user_ids: list[str]
    items: list[np.ndarray]
    timestamps: list[np.ndarray] | None = None

    def __len__(self) -> int:
        return len(self.user_ids)

    def lengths(self) -> np.ndarray:
        """[U] int64 number of events per user."""
        return np.fromiter((len(s) for s in self.items), dtype=np.int64, count=len(self.items))


def k_core(inter: Interactions, k: int) -> Interactions:
    """The interactions whose user and whose item each have at least ``k`` of them, cut again
    until both hold (the k-core: SASRec's and most papers' preprocessing of Amazon-style logs,
    k = 5). File order is kept; ``k <= 1`` keeps everything."""
    if k <= 1:
        return inter
    users = np.unique(inter.users, return_inverse=True)[1]
    items = np.unique(inter.items, return_inverse=True)[1]
    keep = np.ones(len(inter), bool)
    while True:
        enough = (np.bincount(users[keep], minlength=users.max(initial=0) + 1)[users] >= k) & (
            np.bincount(items[keep], minlength=items.max(initial=0) + 1)[items] >= k)
        if not (keep & ~enough).any():
            break
        keep &= enough
    if not keep.any():
        raise ValueError(f"no interaction is left in the {k}-core (every user or item has fewer than {k})")
    ts = None if inter.timestamps is None else inter.timestamps[keep]
    return Interactions(inter.users[keep], inter.items[keep], ts)


def build_sequences(
    interactions: Interactions, id_map: IdMap | None = None
) -> tuple[SequenceData, IdMap]:
    """Group events by user, oldest first.

    Events are stably sorted by timestamp when there are timestamps, so ties (and logs without
    times) keep file order. Users come in order of first appearance. Without `id_map`, one is
    built from the items in order of first appearance; with it, an unknown item raises KeyError.
    The per-user arrays are views into one array.
    """
    if id_map is None:
        id_map = IdMap.from_items(interactions.items)
    dense = id_map.encode(interactions.items)
    if len(interactions) == 0:
        return SequenceData([], [], None if interactions.timestamps is None else []), id_map
    users, first, inverse = np.unique(interactions.users, return_index=True, return_inverse=True)
    rank = np.empty(len(users), dtype=np.int64)
    rank[np.argsort(first, kind="stable")] = np.arange(len(users))
    group = rank[inverse.ravel()]  # [E] user position in order of first appearance
    order = np.arange(len(interactions))
    if interactions.timestamps is not None:
        order = np.argsort(interactions.timestamps, kind="stable")
    order = order[np.argsort(group[order], kind="stable")]
    bounds = np.cumsum(np.bincount(group))[:-1]
    user_ids = interactions.users[np.sort(first)].tolist()
    items = np.split(dense[order], bounds)
    timestamps = None
    if interactions.timestamps is not None:
        timestamps = np.split(interactions.timestamps[order], bounds)
    return SequenceData(user_ids, items, timestamps), id_map


@dataclass(frozen=True)
class EvalRows:
    """One (history → next item) row per evaluated user.

    user_index: [R] int64 index into the SequenceData the rows were cut from.
    history:    R int64 arrays of dense item ids, oldest first.
    history_ts: R int64 arrays of unix seconds, or None.
    target:     [R] int64 dense id of the item to predict.
    target_ts:  [R] int64 unix seconds of the target event, or None.
    """

    user_index: np.ndarray
    history: list[np.ndarray]
    history_ts: list[np.ndarray] | None
    target: np.ndarray
    target_ts: np.ndarray | None

    def __len__(self) -> int:
        return len(self.target)


@dataclass(frozen=True)
class Split:
    """The leave-one-out views; `train` keeps every user at its index in the source data."""

    train: SequenceData
    valid: EvalRows
    test: EvalRows


MIN_EVAL_LENGTH = 3


def leave_one_out(seqs: SequenceData) -> Split:
    """The SASRec/HSTU leave-one-out protocol.

    For a user with >= 3 events s[0..n-1]:
      train: s[:-2] (a model trains on next-item targets inside it),
      valid: history s[:-2] → target s[-2],
      test:  history s[:-1] → target s[-1].
    A user with fewer than 3 events stays whole in train and has no valid/test row, as in
    SASRec's data partition. Arrays are views of `seqs`, not copies.
    """
    has_ts = seqs.timestamps is not None
    long_enough = (seqs.lengths() >= MIN_EVAL_LENGTH).tolist()
    eligible = np.flatnonzero(long_enough)

    def train_part(arrays: list[np.ndarray]) -> list[np.ndarray]:
        return [a[:-2] if ok else a for a, ok in zip(arrays, long_enough, strict=True)]

    def rows(cut: int) -> EvalRows:
        """History s[:-cut] → target s[-cut]."""
        items = [seqs.items[u] for u in eligible]
        stamps = [seqs.timestamps[u] for u in eligible] if has_ts else None
        return EvalRows(
            user_index=eligible.astype(np.int64),
            history=[s[:-cut] for s in items],
            history_ts=[t[:-cut] for t in stamps] if has_ts else None,
            target=np.array([s[-cut] for s in items], dtype=np.int64),
            target_ts=np.array([t[-cut] for t in stamps], dtype=np.int64) if has_ts else None,
        )

    train = SequenceData(
        list(seqs.user_ids),
        train_part(seqs.items),
        train_part(seqs.timestamps) if has_ts else None,
    )
    return Split(train, valid=rows(2), test=rows(1))


def all_but_test(seqs: SequenceData) -> SequenceData:
    """Training data of the published HSTU protocol: each user's events but the test target
    (``s[:-1]`` for users with a test row, the whole sequence for the others)."""
    has_ts = seqs.timestamps is not None
    keep = lambda arrays: [a[:-1] if len(a) >= MIN_EVAL_LENGTH else a for a in arrays]  # noqa: E731
    return SequenceData(list(seqs.user_ids), keep(seqs.items), keep(seqs.timestamps) if has_ts else None)


# --------------------------------------------------------------------------------------------
# Where the data lives
# --------------------------------------------------------------------------------------------


def data_dir() -> Path:
    """$PERSREC_DATA_DIR, else `../shared/data` relative to the repository root."""
    override = os.environ.get("PERSREC_DATA_DIR")
    if override:
        return Path(override)
    return Path(__file__).resolve().parents[1].parent / "shared" / "data"


def default_dataset_path() -> Path | None:
    """The ML-1M sequence file under `data_dir()`, or None when it is not there."""
    path = data_dir() / ML1M_SEQUENCE_FILE
    return path if path.is_file() else None
