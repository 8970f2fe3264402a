"""What the model reads of a user's window: the items after the memory's watermark, mapped to
the model's dense ids (unknown items skipped), at most ``cap`` of them."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from persrec.models.data import IdMap

from . import window as win


@dataclass
class Mapped:
    """A window's items after a watermark (``items``, ``ts``: as in the window) and the model
    ids and times of those the model knows; ``counts[n]``: how many of the first n it knows."""
    items: list[str]
    ts: list[int]
    ids: np.ndarray
    times: np.ndarray
    counts: np.ndarray


class ItemReader:
    def __init__(self, id_map: IdMap, cap: int) -> None:
        # A dict beats IdMap.encode's vectorised search on the few items of one request. Items
        # registered later are added to it (stream.catalogue).
        self._index = {item: i + 1 for i, item in enumerate(id_map.items.tolist())}
        self.cap = cap  # the most items a request reads beside the memory (window.read_start)

    @property
    def index(self) -> dict[str, int]:
        """Item id -> the model's id (the catalogue adds to it)."""
        return self._index

    def known(self, items: list[str], ts: list[int]) -> tuple[list[int], list[int]]:
        """Model ids and times of the items the model knows (unknown items are skipped)."""
        ids = [self._index.get(i, 0) for i in items]
        if 0 not in ids:  # the usual case: one pass, times as they are
            return ids, list(ts)
        pairs = [(d, t) for d, t in zip(ids, ts) if d]
        return [p[0] for p in pairs], [p[1] for p in pairs]

    def read(self, w: win.Window, watermark: int) -> tuple[np.ndarray, np.ndarray]:
        """Known items (and times) after the watermark, at most ``cap`` (the latest ones, from
        an aligned start: ``window.read_start``).

        The window after the watermark outgrows the cap only when folds lag behind (e.g. a
        backlog holding hundreds of one user's events, each pinning the watermark while queued).
        The model was trained on at most max_len items, and one long row would pad its whole
        batch to that length: attention is quadratic, so Triton took seconds per batch and the
        backlog grew until calls timed out (tests/reliability/test_soak.py). The skipped items
        are folded into the memory later; ``window`` in the message says how many were read.
        """
        mapped = self.mapped(w, watermark)
        return self._head(mapped, len(mapped.items))

    def read_batch(self, windows: Sequence[win.Window], users: Sequence[str], watermarks: Sequence[int],
                   memories: Sequence[object]) -> list[tuple[np.ndarray, np.ndarray]]:
        """``read`` of every request, mapping a user's items once per batch: a user's requests
        that read one memory (``memories``: any identity) usually hold snapshots of one window,
        so what each reads after the watermark is the start of what the latest snapshot holds
        there. The latest is mapped once and each request whose items and times are such a
        start (compared in full) reads from it; any other is mapped on its own."""
        latest: dict[tuple[str, int], int] = {}
        for i, (u, m) in enumerate(zip(users, memories)):
            key = (u, id(m))
            j = latest.get(key)
            if j is None or windows[i].seq > windows[j].seq:
                latest[key] = i
        mapped: dict[int, Mapped] = {}
        out = []
        for w, u, wm, m in zip(windows, users, watermarks, memories):
            j = latest[(u, id(m))]
            if j not in mapped:
                mapped[j] = self.mapped(windows[j], wm)
            top = mapped[j]
            items, ts = win.effective(w, wm)
            n = len(items)
            if items != top.items[:n] or ts != top.ts[:n]:
                top = self.mapped(w, wm)
            out.append(self._head(top, n))
        return out

    def mapped(self, w: win.Window, watermark: int) -> Mapped:
        items, ts = win.effective(w, watermark)
        dense = np.fromiter((self._index.get(x, 0) for x in items), np.int64, len(items))
        known = dense != 0
        return Mapped(items, ts, dense[known], np.asarray(ts, np.int64)[known], np.concatenate([[0], np.cumsum(known)]))

    def _head(self, mapped: Mapped, n: int) -> tuple[np.ndarray, np.ndarray]:
        """What the model reads of the first ``n`` items of ``mapped``."""
        c = int(mapped.counts[n])
        s = win.read_start(c, self.cap)
        return mapped.ids[s:c], mapped.times[s:c]
