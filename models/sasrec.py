"""SASRec (Kang & McAuley, 2018), the baseline: causal softmax self-attention with absolute
learned positions, trained with the same sampled-softmax loss on L2-normalised vectors."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import Architecture, ModelConfig
from .hstu import ItemScoring, init_embedding_, input_scale
from .items import ItemRepr, item_tower
from .layout import ITEM, LayoutBatch


class SASRecBlock(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.dim)
        self.attn = nn.MultiheadAttention(cfg.dim, cfg.num_heads, dropout=cfg.dropout, batch_first=True)
        self.norm2 = nn.LayerNorm(cfg.dim)
        self.ffn = nn.Sequential(
            nn.Linear(cfg.dim, cfg.dim), nn.ReLU(), nn.Dropout(cfg.dropout), nn.Linear(cfg.dim, cfg.dim),
        )
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, causal: torch.Tensor, padding: torch.Tensor) -> torch.Tensor:
        h = self.norm1(x)
        a, _ = self.attn(h, h, h, attn_mask=causal, key_padding_mask=padding, need_weights=False)
        x = x + self.dropout(a)
        return x + self.dropout(self.ffn(self.norm2(x)))


class SASRec(ItemScoring, nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        if cfg.architecture is not Architecture.SASREC:
            raise ValueError("SASRec needs architecture=sasrec")
        self.cfg = cfg
        ids_only = cfg.item_repr is ItemRepr.ID  # initialised in the order of earlier releases
        self.item_emb = (nn.Embedding(cfg.num_items + 1, cfg.dim, padding_idx=0) if ids_only
                         else item_tower(cfg.num_items, cfg.dim, cfg.item_repr, cfg.text_dim, cfg.id_dropout, cfg.new_item_ids))
        self.pos_emb = nn.Embedding(cfg.max_len, cfg.dim)
        if ids_only:
            init_embedding_(self.item_emb.weight)
        init_embedding_(self.pos_emb.weight)
        if ids_only:
            with torch.no_grad():
                self.item_emb.weight[0].zero_()
        self.blocks = nn.ModuleList(SASRecBlock(cfg) for _ in range(cfg.num_layers))
        self.norm = nn.LayerNorm(cfg.dim)
        self.dropout = nn.Dropout(cfg.dropout)
        self.scale = input_scale(cfg.dim)

    def _encode(self, item_ids: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        B, N = item_ids.shape
        if N > self.cfg.max_len:
            raise ValueError(f"SASRec takes at most max_len={self.cfg.max_len} items, got {N}")
        pos = torch.arange(N, device=item_ids.device)
        x = self.dropout(self.item_emb(item_ids) * self.scale + self.pos_emb(pos)[None])
        causal = torch.ones(N, N, dtype=torch.bool, device=x.device).triu(1)  # True = blocked
        for block in self.blocks:
            x = block(x, causal, ~valid)
        return F.normalize(self.norm(x), dim=-1)

    def forward(self, batch: LayoutBatch) -> torch.Tensor:
        """Full causal pass -> L2-normalised outputs ``[B, N, D]``."""
        return self._encode(batch.item_ids, batch.kind == ITEM)

    def recommend(self, memory: None, items: torch.Tensor, lengths: torch.Tensor, ts=None,
                  at: tuple[torch.Tensor, torch.Tensor] | None = None, request_ts=None) -> torch.Tensor:
        """As ``PerSRec.recommend`` (``at`` too: causal, positions counted from the row's start;
        SASRec reads no times)."""
        if memory is not None:
            raise ValueError("SASRec has no memory")
        valid = torch.arange(items.shape[1], device=items.device)[None] < lengths[:, None]
        h = self._encode(items, valid)
        rows, positions = self.query_positions(lengths, at)
        return h[rows, positions]
