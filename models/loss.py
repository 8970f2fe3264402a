"""Sampled softmax with uniform negatives on cosine similarities (HSTU's training loss)."""

from __future__ import annotations

import torch
from torch import nn


def sampled_softmax_loss(
    hidden: torch.Tensor, targets: torch.Tensor, item_vectors, num_items: int,
    num_negatives: int, temperature: float, generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Mean next-item loss over positions with a target.

    hidden ``[B, N, D]`` (L2-normalised outputs), targets ``[B, N]`` (0 = no target),
    ``item_vectors(ids)`` returns L2-normalised embeddings of ``ids``. Each row draws one set of
    ``num_negatives`` uniform negatives shared by its positions (7x cheaper than per position);
    a negative equal to the target is masked out. ``sampled_softmax_loss_reference`` up to
    rounding (given the same generator state), with the temperature
    applied to ``[B, N, D]`` instead of ``[B, N, K]`` and no ``[B, N, 1+K]`` concatenation.
    """
    neg_ids = _draw_negatives(hidden, num_items, num_negatives, generator)  # [B, K]
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
) -> torch.Tensor:
    """``[B, K]`` uniform item ids in 1..num_items."""
    shape = (hidden.shape[0], num_negatives)
    return torch.randint(1, num_items + 1, shape, device=hidden.device, generator=generator)


def build_model(cfg) -> nn.Module:
    """The model class for ``cfg.architecture``."""
    from .config import Architecture
    from .persrec import PerSRec
    from .sasrec import SASRec

    return PerSRec(cfg) if cfg.architecture is Architecture.HSTU else SASRec(cfg)
