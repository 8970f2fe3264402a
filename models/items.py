"""Items as vectors: a learned id embedding, a projection of the item's text embedding (the
content tower of the paper's HLLM side, with a frozen sentence encoder), or both summed.

An item the model was not trained on has no id embedding worth the name, but it has a text:
with ``text`` or ``id+text`` it can be recommended (and read in a history) as soon as its text
is encoded (``ItemTower.add_items``), without retraining. Under ``id+text`` its id part is zero,
or (``NewItemIds.TEXT``) the id its text predicts.
"""

from __future__ import annotations

import enum

import numpy as np
import torch
from torch import nn


class ItemRepr(str, enum.Enum):
    ID = "id"  # a learned embedding per item id (cannot represent an item it never saw)
    TEXT = "text"  # projection(text embedding): any item with a text
    ID_TEXT = "id+text"  # both, summed; a new item's id part is zero

    @property
    def has_id(self) -> bool:
        return self is not ItemRepr.TEXT

    @property
    def has_text(self) -> bool:
        return self is not ItemRepr.ID


class NewItemIds(str, enum.Enum):
    """The id part of an id+text item the model was not trained on."""
    ZERO = "zero"  # none: the item is its text alone
    TEXT = "text"  # the id its text predicts (``fit_text_to_id`` over the trained items)


class ItemTower(nn.Module):
    """Item vectors ``[.., D]`` of item ids from a learned id table and/or a fixed table of text
    embeddings ``[I+1, E]`` (a buffer: saved with the model, never trained) through a learned
    projection. Row 0 is padding: zero in both tables, so its vector is zero.

    Behaves like the ``nn.Embedding`` it replaces: ``tower(ids)`` and ``tower.weight`` (every
    item's vector, ``[I+1, D]``).

    ``id_dropout`` (id+text, training only): each ``tower(ids)`` draws which items lose their id
    part, and the next ``weight`` uses the same draw, so in a training step (inputs, then the
    output table) a dropped item is text-only on both sides, like an item published after
    training. Nothing is rescaled: a text-only vector is what a new item gets.

    ``new_ids`` (id+text): what id part an item the model was not trained on gets (items past
    the ``num_items`` it was built with, or the ones ``fit_new_ids`` is told it never saw):
    zero, or ``text @ W + b``, a map fitted on the trained items (``fit_new_ids``; buffers
    ``text_to_id``, ``text_to_id_bias``, saved with the model)."""

    def __init__(self, num_items: int, dim: int, repr_: ItemRepr, text_dim: int, id_dropout: float = 0.0,
                 new_ids: NewItemIds = NewItemIds.ZERO) -> None:
        super().__init__()
        self.repr = ItemRepr(repr_)
        self.id_dropout = id_dropout
        self.new_ids = NewItemIds(new_ids)
        self.trained_items = num_items  # ids above this were never trained: their id part is new_ids'
        self._keep: torch.Tensor | None = None  # this step's items that keep their id part
        self.id_emb = nn.Embedding(num_items + 1, dim, padding_idx=0) if self.repr.has_id else None
        self.proj = None
        if self.repr.has_text:
            if text_dim < 1:
                raise ValueError(f"item representation {self.repr.value!r} needs text_dim >= 1")
            self.register_buffer("text", torch.zeros(num_items + 1, text_dim))
            self.proj = nn.Linear(text_dim, dim, bias=False)
        if self.new_ids is NewItemIds.TEXT:
            if self.repr is not ItemRepr.ID_TEXT:
                raise ValueError("new_ids 'text' needs item representation 'id+text'")
            self.register_buffer("text_to_id", torch.zeros(text_dim, dim))
            self.register_buffer("text_to_id_bias", torch.zeros(dim))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.id_emb(ids) if self.id_emb is not None else None
        if self._dropping:
            self._keep = torch.rand(self.id_emb.num_embeddings, device=ids.device) >= self.id_dropout
            x = x * self._keep[ids].unsqueeze(-1)
        if self.proj is not None:
            t = self.proj(self.text[ids])
            x = t if x is None else x + t
        return x

    @property
    def weight(self) -> torch.Tensor:
        """Every item's vector ``[I+1, D]`` (row 0 zero)."""
        if self.proj is None:
            return self.id_emb.weight
        t = self.proj(self.text)
        if self.id_emb is None:
            return t
        ids = self.id_emb.weight
        if self._dropping and self._keep is not None and len(self._keep) == len(ids):
            ids = ids * self._keep.unsqueeze(-1)
        return ids + t

    @property
    def _dropping(self) -> bool:
        return self.training and self.id_dropout > 0 and self.id_emb is not None

    @property
    def num_items(self) -> int:
        return (self.text if self.proj is not None else self.id_emb.weight).shape[0] - 1

    def set_text(self, embeddings: np.ndarray | torch.Tensor) -> None:
        """The text embeddings of items 1..I, ``[I, E]`` (row i-1 for item i)."""
        emb = torch.as_tensor(np.asarray(embeddings, np.float32), device=self.text.device)
        if emb.shape != (self.text.shape[0] - 1, self.text.shape[1]):
            raise ValueError(f"expected text embeddings [{self.text.shape[0] - 1}, {self.text.shape[1]}], "
                             f"got {list(emb.shape)}")
        with torch.no_grad():
            self.text[1:] = emb

    @torch.no_grad()
    def add_items(self, embeddings: np.ndarray | torch.Tensor) -> range:
        """Append items (their text embeddings ``[n, E]``) after the last one; returns their new
        dense ids. Their id embedding, if any, is zero (the model knows them by text alone), or
        under ``new_ids`` 'text' the id their text predicts."""
        first = self.num_items + 1
        ids = range(first, first + len(embeddings))
        self.put_items(np.asarray(ids, np.int64), embeddings)
        return ids

    @torch.no_grad()
    def put_items(self, ids: np.ndarray, embeddings: np.ndarray | torch.Tensor) -> None:
        """Set the text embeddings ``[n, E]`` of dense ``ids``: an id past the last item grows
        the tables (with a zero id embedding: the model knows a new item by its text alone); an
        id it has keeps its id embedding and reads the new text. Under ``new_ids`` 'text', an id
        past ``trained_items`` gets (again) the id part its text predicts."""
        if self.proj is None:
            raise ValueError("an id-only model cannot represent items it was not trained on")
        emb = torch.as_tensor(np.asarray(embeddings, np.float32), device=self.text.device)
        idx = torch.as_tensor(np.asarray(ids, np.int64), device=self.text.device)
        if emb.shape != (len(idx), self.text.shape[1]):
            raise ValueError(f"expected text embeddings [{len(idx)}, {self.text.shape[1]}], got {list(emb.shape)}")
        size = max(self.text.shape[0], int(idx.max()) + 1 if len(idx) else 0)
        if size > self.text.shape[0]:
            grown = self.text.new_zeros(size, self.text.shape[1])
            grown[: self.text.shape[0]] = self.text
            self.text = grown
            if self.id_emb is not None:
                table = nn.Embedding(size, self.id_emb.embedding_dim, padding_idx=0).to(self.text.device)
                table.weight.zero_()
                table.weight[: self.id_emb.num_embeddings] = self.id_emb.weight
                self.id_emb = table
        self.text[idx] = emb
        if self.new_ids is NewItemIds.TEXT:  # an item never trained reads the id its (new) text predicts
            self._predict_ids(idx[idx > self.trained_items])

    @torch.no_grad()
    def fit_new_ids(self, known: np.ndarray | None = None) -> None:
        """With ``new_ids`` 'text': fit the text-to-id map on the trained items (``known``, dense
        ids; default all of 1..``trained_items``), then give every other item up to
        ``trained_items`` the id its text predicts (items held out of training, as in the
        cold-start evaluation). A no-op with ``new_ids`` 'zero'."""
        if self.new_ids is not NewItemIds.TEXT:
            return
        every = np.arange(1, self.trained_items + 1)
        known = every if known is None else np.asarray(known, np.int64)
        k = torch.as_tensor(known, device=self.text.device)
        w, b = fit_text_to_id(self.text[k].cpu(), self.id_emb.weight[k].cpu())
        self.text_to_id.copy_(w)
        self.text_to_id_bias.copy_(b)
        self._predict_ids(torch.as_tensor(np.setdiff1d(every, known), device=self.text.device))

    def _predict_ids(self, ids: torch.Tensor) -> None:
        """The id part of ``ids`` from their texts, through the fitted map."""
        self.id_emb.weight[ids] = self.text[ids] @ self.text_to_id + self.text_to_id_bias


@torch.no_grad()
def forget_items(tower: nn.Module, ids) -> None:
    """Zero the id embeddings of ``ids`` (an item the model never saw has none; its text, if the
    model reads text, stays)."""
    table = tower if isinstance(tower, nn.Embedding) else tower.id_emb
    if table is not None:
        table.weight[torch.as_tensor(np.asarray(ids, np.int64), device=table.weight.device)] = 0


def item_tower(num_items: int, dim: int, repr_: ItemRepr, text_dim: int = 0, id_dropout: float = 0.0,
               new_ids: NewItemIds = NewItemIds.ZERO) -> nn.Module:
    """A model's item table: a plain ``nn.Embedding`` for ids only (as checkpoints of earlier
    releases hold it), else an ``ItemTower``. Id embeddings start at N(0, .02) truncated, row 0
    zero."""
    from .hstu import init_embedding_

    repr_ = ItemRepr(repr_)
    tower = nn.Embedding(num_items + 1, dim, padding_idx=0) if repr_ is ItemRepr.ID else ItemTower(num_items, dim, repr_, text_dim, id_dropout, new_ids)
    ids = tower if repr_ is ItemRepr.ID else tower.id_emb
    if ids is not None:
        init_embedding_(ids.weight)
        with torch.no_grad():
            ids.weight[0].zero_()
    return tower


def fit_text_to_id(text: torch.Tensor, ids: torch.Tensor, folds: int = 5,
                   ridges: tuple[float, ...] = (1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0)) -> tuple[torch.Tensor, torch.Tensor]:
    """A linear map from items' text embeddings ``[N, E]`` to their learned id embeddings
    ``[N, D]``: ``ids ~ text @ W + b``, ridge regression in closed form. The ridge (relative to
    the mean eigenvalue of the text covariance) is chosen by ``folds``-fold cross-validation of
    the squared error over these items, then the map is fitted on all of them.
    -> ``(W [E, D], b [D])``, float32.

    What it is for: an item published after training has a text but no id embedding; with this
    map it gets the id embedding its text predicts (the part of the trained items' ids that
    their texts explain) instead of zero."""
    x, y = text.double(), ids.double()
    n, e = x.shape
    if n < 2 * folds:
        raise ValueError(f"need at least {2 * folds} items to fit the text-to-id map, got {n}")
    xm, ym = x.mean(0), y.mean(0)
    x, y = x - xm, y - ym  # centred once: the folds share the means (a negligible leak)
    gram, cross = x.T @ x, x.T @ y
    scale = float(gram.trace()) / (n * e) or 1.0
    order = torch.randperm(n, generator=torch.Generator().manual_seed(0))
    errors = torch.zeros(len(ridges), dtype=torch.float64)
    for f in range(folds):
        held = order[f::folds]
        xh, yh = x[held], y[held]
        vals, vecs = torch.linalg.eigh(gram - xh.T @ xh)
        proj = vecs.T @ (cross - xh.T @ yh)
        for i, ridge in enumerate(ridges):
            w = vecs @ (proj / (vals + ridge * scale * (n - len(held)))[:, None])
            errors[i] += ((xh @ w - yh) ** 2).sum()
    lam = ridges[int(errors.argmin())] * scale * n
    w = torch.linalg.solve(gram + lam * torch.eye(e, dtype=x.dtype), cross)
    return w.float(), (ym - xm @ w).float()
