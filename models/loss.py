"""Next-item losses on cosine similarities: sampled softmax with uniform negatives (HSTU's
training loss), drawn per sequence or per position, or a full softmax over the catalogue."""

from __future__ import annotations

import enum

import torch
import torch.nn.functional as F
from torch import nn


class Negatives(str, enum.Enum):
    """Where the sampled softmax's negatives come from.

    SHARED: one set of K uniform items per sequence, shared by its positions (cheapest).
    PER_POSITION: K uniform items for every position (the official HSTU sampler).
    FULL: no sampling; a softmax over every item of the catalogue.
    """

    SHARED = "shared"
    PER_POSITION = "per_position"
    FULL = "full"


def next_item_loss(
    hidden: torch.Tensor, targets: torch.Tensor, model, num_negatives: int, temperature: float,
    negatives: Negatives = Negatives.SHARED, generator: torch.Generator | None = None,
    pool: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean next-item loss over positions with a target, ``model`` being any ``ItemScoring``
    (``item_vectors``, ``cfg.num_items``). hidden ``[B, N, D]`` L2-normalised, targets ``[B, N]``
    (0 = no target). ``pool``: the item ids that may serve as negatives (1-D, every target among
    them); None = the whole catalogue 1..num_items. An item outside it gets no gradient at all,
    as an item that arrives after training."""
    negatives = Negatives(negatives)
    num_items = model.cfg.num_items
    if negatives is Negatives.SHARED:
        return sampled_softmax_loss(hidden, targets, model.item_vectors, num_items, num_negatives,
                                    temperature, generator, pool)
    valid = targets > 0
    h = hidden[valid] * (1.0 / temperature)  # [P, D]
    tgt = targets[valid]  # [P]
    table = model.item_vectors()  # [I+1, D], normalised once per step
    if negatives is Negatives.FULL:
        logits = h @ table.T  # [P, I+1]
        logits[:, 0] = float("-inf")
        if pool is not None:
            outside = torch.ones(table.shape[0], dtype=torch.bool, device=h.device)
            outside[pool] = False
            logits = logits.masked_fill(outside, float("-inf"))
        return F.cross_entropy(logits, tgt)
    return per_position_softmax_loss(h, tgt, table, num_negatives, generator, pool)


def per_position_softmax_loss(
    h: torch.Tensor, targets: torch.Tensor, table: torch.Tensor, num_negatives: int,
    generator: torch.Generator | None = None, pool: torch.Tensor | None = None,
) -> torch.Tensor:
    """Sampled softmax with ``num_negatives`` uniform negatives drawn for every position.

    h ``[P, D]`` (outputs already divided by the temperature), targets ``[P]``, table
    ``[I+1, D]`` the normalised item vectors (row 0 padding, never drawn). The ``[P, K]`` ids are
    drawn at once; a negative equal to its position's target is masked out. The logits come
    from ``gathered_dot``, which never holds the ``[P, K, D]`` gathered vectors for backward.
    ``pool``: as in ``next_item_loss``.
    """
    ids = _draw_negatives(h, table.shape[0] - 1, num_negatives, generator, pool)
    neg_logit = gathered_dot(h, table, ids).masked_fill_(ids == targets[:, None], float("-inf"))
    pos_logit = (h * table[targets]).sum(-1)
    return (torch.logaddexp(pos_logit, torch.logsumexp(neg_logit, dim=-1)) - pos_logit).mean()


def gathered_dot(h: torch.Tensor, table: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """``out[p, k] = h[p] . table[ids[p, k]]``: h ``[P, D]``, table ``[I, D]``, ids ``[P, K]``."""
    return _GatheredDot.apply(h, table, ids)


class _GatheredDot(torch.autograd.Function):
    """``gathered_dot`` in chunks of positions, so the gathered ``[c, K, D]`` rows stay small
    and in cache; backward recomputes instead of storing them: ``grad_h`` is one fused
    ``embedding_bag`` (a weighted sum of table rows), ``grad_table`` an ``index_add_`` per chunk.
    Measured on one CPU thread (P = 18,000, K = 128, D = 50): 0.13 s per forward + backward,
    against 1.1 s for ``table[ids]`` with autograd."""

    @staticmethod
    def chunk(device: torch.device) -> int:
        """Positions per chunk: cache-sized on a CPU; few launches on a GPU."""
        return 128 if device.type == "cpu" else 8192

    @staticmethod
    def forward(ctx, h, table, ids):
        P, D = h.shape
        c = _GatheredDot.chunk(h.device)
        out = torch.empty(ids.shape, dtype=h.dtype, device=h.device)
        for s in range(0, P, c):
            e = min(s + c, P)
            rows = table.index_select(0, ids[s:e].reshape(-1)).view(e - s, -1, D)
            torch.sum(rows * h[s:e, None, :], dim=-1, out=out[s:e])
        ctx.save_for_backward(h, table, ids)
        return out

    @staticmethod
    def backward(ctx, grad):
        h, table, ids = ctx.saved_tensors
        grad_h = grad_table = None
        if ctx.needs_input_grad[0]:
            grad_h = F.embedding_bag(ids, table, per_sample_weights=grad, mode="sum")
        if ctx.needs_input_grad[1]:
            grad_table = torch.zeros_like(table)
            P, D = h.shape
            c = _GatheredDot.chunk(h.device)
            for s in range(0, P, c):
                e = min(s + c, P)
                outer = (grad[s:e, :, None] * h[s:e, None, :]).reshape(-1, D)
                grad_table.index_add_(0, ids[s:e].reshape(-1), outer)
        return grad_h, grad_table, None


def sampled_softmax_loss(
    hidden: torch.Tensor, targets: torch.Tensor, item_vectors, num_items: int,
    num_negatives: int, temperature: float, generator: torch.Generator | None = None,
    pool: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean next-item loss over positions with a target.

    hidden ``[B, N, D]`` (L2-normalised outputs), targets ``[B, N]`` (0 = no target),
    ``item_vectors(ids)`` returns L2-normalised embeddings of ``ids``. Each row draws one set of
    ``num_negatives`` uniform negatives shared by its positions (7x cheaper than per position);
    a negative equal to the target is masked out. ``sampled_softmax_loss_reference`` up to
    rounding (given the same generator state), with the temperature
    applied to ``[B, N, D]`` instead of ``[B, N, K]`` and no ``[B, N, 1+K]`` concatenation.
    """
    neg_ids = _draw_negatives(hidden, num_items, num_negatives, generator, pool)  # [B, K]
    h = hidden * (1.0 / temperature)
    pos_logit = (h * item_vectors(targets)).sum(-1)  # [B, N]
    neg_logit = torch.bmm(h, item_vectors(neg_ids).transpose(1, 2))  # [B, N, K]
    neg_logit = neg_logit.masked_fill_(targets[:, :, None] == neg_ids[:, None, :], float("-inf"))
    loss = torch.logaddexp(pos_logit, torch.logsumexp(neg_logit, dim=-1)) - pos_logit
    return loss[targets > 0].mean()


def sampled_softmax_loss_reference(
    hidden: torch.Tensor, targets: torch.Tensor, item_vectors, num_items: int,
    num_negatives: int, temperature: float, generator: torch.Generator | None = None,
) -> torch.Tensor:
    """``sampled_softmax_loss`` written plainly: softmax over ``[target | negatives]``."""
    neg_ids = _draw_negatives(hidden, num_items, num_negatives, generator)
    valid = targets > 0
    pos_logit = (hidden * item_vectors(targets)).sum(-1) / temperature  # [B, N]
    neg_logit = torch.einsum("bnd,bkd->bnk", hidden, item_vectors(neg_ids)) / temperature
    neg_logit = neg_logit.masked_fill(targets[:, :, None] == neg_ids[:, None, :], float("-inf"))
    logits = torch.cat([pos_logit[..., None], neg_logit], dim=-1)  # [B, N, 1+K]
    loss = torch.logsumexp(logits, dim=-1) - pos_logit
    return loss[valid].mean()


def _draw_negatives(
    hidden: torch.Tensor, num_items: int, num_negatives: int, generator: torch.Generator | None,
    pool: torch.Tensor | None = None,
) -> torch.Tensor:
    """``[B, K]`` uniform item ids in 1..num_items, or uniform over ``pool``'s ids."""
    shape = (hidden.shape[0], num_negatives)
    if pool is None:
        return torch.randint(1, num_items + 1, shape, device=hidden.device, generator=generator)
    return pool[torch.randint(0, len(pool), shape, device=hidden.device, generator=generator)]


def build_model(cfg) -> nn.Module:
    """The model class for ``cfg.architecture``."""
    from .config import Architecture
    from .persrec import PerSRec
    from .sasrec import SASRec

    return PerSRec(cfg) if cfg.architecture is Architecture.HSTU else SASRec(cfg)
