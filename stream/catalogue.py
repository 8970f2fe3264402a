"""The worker's view of the item catalogue: the items the served model was trained on, then the
items registered since (``memory.SqlCatalogue``), each with its dense id.

Items are registered from the ``items`` topic (``stream.registry``); every worker also reads the
rows other workers wrote (``follow``). An event for an item not in the catalogue yet stays in
the user's window, skipped by the model, and is read once the item arrives. Every model request
carries ``state()``: the revision applied here and the highest id this worker can name, so the
Triton model catches up with at least that revision (``serving.catalogue``) and never answers
with an item this worker cannot decode.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from persrec.memory import CatalogueItem
from persrec.models.data import IdMap


class Catalogue:
    def __init__(self, id_map: IdMap, index: dict[str, int]) -> None:
        self.id_map = id_map
        self.base = id_map.num_items  # trained ids: 1..base
        self.index = index  # item id -> dense id, shared with the ItemReader (trained items first)
        self.added: list[str] = []  # item ids of dense ids base+1, base+2, ...
        self.revision = 0
        self.changed = 0  # rows applied that changed the text of an item already served
        self.newest: list[CatalogueItem] = []  # the latest rows applied, newest first (status API)

    @property
    def size(self) -> int:
        return self.base + len(self.added)

    def apply(self, rows: Iterable[CatalogueItem]) -> int:
        """Take rows in revision order (older ones are skipped); returns how many were new here."""
        fresh = 0
        for r in rows:
            if r.revision <= self.revision:
                continue
            self.revision = r.revision
            if r.dense_id > self.size:
                if r.dense_id != self.size + 1:
                    raise ValueError(f"catalogue row {r.item_id!r} has id {r.dense_id}, expected {self.size + 1}")
                self.added.append(r.item_id)
                fresh += 1
            else:
                self.changed += 1
            self.index[r.item_id] = r.dense_id
            self.newest = ([r] + [n for n in self.newest if n.item_id != r.item_id])[:5]
        return fresh

    def state(self, rows: int) -> np.ndarray:
        """The ``CATALOGUE`` input of ``rows`` requests: ``[rows, 2]`` (revision, highest id)."""
        return np.tile(np.array([[self.revision, self.size]], np.int64), (rows, 1))

    def decode(self, ids: np.ndarray) -> list[str]:
        """Dense ids (flattened) -> item ids."""
        flat = np.asarray(ids, np.int64).ravel()
        if not self.added or flat.max(initial=0) <= self.base:
            return self.id_map.decode(flat)
        names = np.empty(len(flat), object)
        trained = flat <= self.base
        names[trained] = self.id_map.decode(flat[trained])
        extra = np.asarray(self.added, object)
        names[~trained] = extra[flat[~trained] - self.base - 1]
        return names.tolist()
