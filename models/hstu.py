"""HSTU backbone (Zhai et al., 2024): pointwise-SiLU attention with relative biases and U-gating.

The stack runs on positions described by ``persrec.models.layout`` and may take a prefix of
cached keys/values (a user's memory), which is how the serving path reuses stored state.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig
from .layout import ITEM, attention_mask, causal_mask


def time_bucket_reference(dt: torch.Tensor, num_buckets: int) -> torch.Tensor:
    """``floor(ln(max(|dt|, 1)) / 0.301)`` clamped to ``0..num_buckets-1`` (HSTU's bucketing of
    a gap in seconds: 0 under 2 s, then one bucket per factor of e^0.301 = 1.35)."""
    return (torch.log(dt.abs().clamp(min=1).double()) / 0.301).long().clamp(0, num_buckets - 1)


@functools.lru_cache(maxsize=8)
def _bucket_starts(num_buckets: int) -> tuple[int, ...]:
    """The smallest gap of buckets 1..num_buckets-1 under ``time_bucket_reference``."""
    starts = []
    for k in range(1, num_buckets):
        gap = max(1, math.floor(math.exp(0.301 * k)) - 2)
        while math.floor(math.log(gap) / 0.301) < k:
            gap += 1
        starts.append(gap)
    return tuple(starts)


def time_buckets(q_ts: torch.Tensor, k_ts: torch.Tensor, num_buckets: int) -> torch.Tensor:
    """``[B, Nq, Nk]`` ``time_bucket_reference`` of ``t_q - t_k`` for query times ``[B, Nq]``
    and key times ``[B, Nk]`` (unix seconds), by a binary search over the buckets' integer
    starts: a third of the time of a logarithm per pair on a CPU, where it was a third of a
    time-bias model's training step."""
    dt = (q_ts[:, :, None] - k_ts[:, None, :]).abs()
    starts = torch.tensor(_bucket_starts(num_buckets), dtype=dt.dtype, device=dt.device)
    return torch.bucketize(dt, starts, right=True)


def query_times(ts: torch.Tensor, lengths: torch.Tensor, after: torch.Tensor | None) -> torch.Tensor:
    """The time each item's query is asked at under ``request_time``: the time of the next item
    of the row, and ``after`` ``[B]`` (the request time, or the next event's) for the last one;
    ``ts`` ``[B, N]`` right-padded to ``lengths`` ``[B]``. ``after=None`` uses the last item's
    own time (a request at the moment of the last event). Padding positions get 0."""
    B, N = ts.shape
    if N == 0:
        return ts
    last = ts.gather(1, (lengths - 1).clamp(min=0)[:, None])[:, 0]
    after = last if after is None else after.to(ts.dtype)
    q = torch.cat([ts[:, 1:], torch.zeros_like(ts[:, :1])], dim=1)
    ar = torch.arange(N, device=ts.device)[None]
    q = torch.where(ar == (lengths - 1)[:, None], after[:, None], q)
    return torch.where(ar < lengths[:, None], q, torch.zeros_like(q))


class RelativeBias(nn.Module):
    """``rab[b, q, k]`` = w_pos[pos_q - pos_k] (+ w_time[bucket(t_q - t_k)] between items).

    Distances are clamped to ``cfg.max_distance``; the time bias (``time_buckets``) applies only
    between two items (tokens have no time). ``t_q`` is the query item's own time, or with
    ``cfg.request_time`` the time of the event it predicts (``query_times``), as in the official
    HSTU code: then the bias tells the model how long after each past item the request comes.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.max_distance = cfg.max_distance
        std = cfg.bias_init_std
        init = (lambda n: torch.randn(n) * std) if std > 0 else torch.zeros  # noqa: E731
        self.pos_w = nn.Parameter(init(cfg.max_distance + 1))
        self.time_w = nn.Parameter(init(cfg.num_time_buckets)) if cfg.time_bias else None

    def forward(
        self, q_pos: torch.Tensor, k_pos: torch.Tensor,
        q_item: torch.Tensor, k_item: torch.Tensor,
        q_ts: torch.Tensor | None, k_ts: torch.Tensor | None,
    ) -> torch.Tensor:
        dist = (q_pos[:, :, None] - k_pos[:, None, :]).clamp(0, self.max_distance)
        rab = self.pos_w[dist]  # [B, Nq, Nk]; batch 1 when the positions have batch 1
        if self.time_w is not None and q_ts is not None and k_ts is not None:
            bucket = time_buckets(q_ts, k_ts, self.time_w.numel())
            both_items = q_item[:, :, None] & k_item[:, None, :]
            rab = rab + self.time_w[bucket] * both_items
        return rab


def hstu_attention_reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rab: torch.Tensor, mask: torch.Tensor,
    inv_norm: float,
) -> torch.Tensor:
    """``silu(Q K^T + rab) / max_len * mask`` applied to V, written plainly.

    q ``[B, N, H, Dh]``, k, v ``[B, Nk, H, Dh]``, rab and mask ``[B, N, Nk]`` (batch may be 1)
    -> ``[B, N, H, Dh]``. ``hstu_attention`` computes the same with fewer passes over memory.
    """
    logits = torch.einsum("bnhd,bmhd->bhnm", q, k) + rab[:, None]
    attn = F.silu(logits) * inv_norm * mask[:, None].to(q.dtype)  # [B, H, N, Nk]
    return torch.einsum("bhnm,bmhd->bnhd", attn, v)


def hstu_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rab: torch.Tensor, weights: torch.Tensor,
    causal_chunk: int | None = None,
) -> torch.Tensor:
    """``hstu_attention_reference`` with ``weights = mask / max_len`` precomputed once per
    forward (shared by the layers), the bias add fused into the batched matmul and the mask
    multiplying the SiLU output in place. Shapes as in the reference.

    ``causal_chunk``: when the keys are a prefix of P = Nk - N positions that every query may
    see followed by the queries themselves, causally (key column P + j > P + i always masked),
    take the queries ``causal_chunk`` rows at a time, each against the keys up to its last row
    only, which skips most of the all-zero upper triangle.
    """
    N = q.shape[1]
    if causal_chunk is None or N <= causal_chunk:
        return _attend(q, k, v, rab, weights)
    P = k.shape[1] - N
    outs = []
    for s in range(0, N, causal_chunk):
        e = min(s + causal_chunk, N)
        keys = slice(0, P + e)
        outs.append(_attend(q[:, s:e], k[:, keys], v[:, keys], rab[:, s:e, keys], weights[:, s:e, keys]))
    return torch.cat(outs, dim=1)


def _attend(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rab: torch.Tensor, weights: torch.Tensor,
) -> torch.Tensor:
    B, N, H, Dh = q.shape
    heads_first = lambda t: t.transpose(1, 2).reshape(B * H, -1, Dh)  # noqa: E731  [B*H, n, Dh]
    if rab.shape[0] > 1 and H > 1:
        rab = rab.repeat_interleave(H, dim=0)  # [B*H, N, Nk]
    if weights.shape[0] > 1 and H > 1:
        weights = weights.repeat_interleave(H, dim=0)
    logits = torch.baddbmm(rab, heads_first(q), heads_first(k).transpose(1, 2))  # [B*H, N, Nk]
    attn = F.silu(logits).mul_(weights)  # in place: silu saves its input, not its output
    o = torch.bmm(attn, heads_first(v))  # [B*H, N, Dh]
    return o.view(B, H, N, Dh).transpose(1, 2)


class HSTULayer(nn.Module):
    """``U,V,Q,K = silu(W LN(x))``; ``A = silu(QK^T + rab) / max_len * mask``;
    ``y = x + W_o(dropout(LN(A V) * U))``.

    The normaliser is the constant ``max_len``, not the number of queries, so a sequence split
    into memory + recent gives exactly the scores of one pass over the whole of it.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.heads, self.head_dim = cfg.num_heads, cfg.head_dim
        inner = cfg.num_heads * cfg.head_dim
        self.norm_in = nn.LayerNorm(cfg.dim, elementwise_affine=cfg.norm_affine)
        self.uvqk = nn.Linear(cfg.dim, 4 * inner, bias=cfg.projection_bias)
        self.norm_attn = nn.LayerNorm(inner, elementwise_affine=cfg.norm_affine)
        self.out = nn.Linear(inner, cfg.dim)
        self.dropout = nn.Dropout(cfg.dropout)
        if cfg.official_init:
            nn.init.normal_(self.uvqk.weight, std=0.02)
            nn.init.xavier_uniform_(self.out.weight)

    def forward(
        self, x: torch.Tensor, weights: torch.Tensor, rab: torch.Tensor,
        prefix_k: torch.Tensor | None = None, prefix_v: torch.Tensor | None = None,
        causal_chunk: int | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x ``[B, N, D]``; weights (mask / max_len), rab ``[B or 1, N, P+N]``; prefix_k/v
        ``[B, P, H, Dh]`` or None; ``causal_chunk`` as in ``hstu_attention``. Returns the new
        x ``[B, N, D]`` and this layer's k, v ``[B, N, H, Dh]``."""
        B, N, _ = x.shape
        u, v, q, k = F.silu(self.uvqk(self.norm_in(x))).chunk(4, dim=-1)
        q, k, v = (t.view(B, N, self.heads, self.head_dim) for t in (q, k, v))
        keys = k if prefix_k is None else torch.cat([prefix_k, k], dim=1)  # [B, P+N, H, Dh]
        vals = v if prefix_v is None else torch.cat([prefix_v, v], dim=1)
        o = hstu_attention(q, keys, vals, rab, weights, causal_chunk).reshape(B, N, -1)
        return x + self.out(self.dropout(self.norm_attn(o) * u)), k, v


class HSTUStack(nn.Module):
    """L HSTU layers over one layout, optionally continuing from a prefix of cached K/V."""

    causal_chunk = 64  # query rows per block when skipping the masked upper triangle

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.bias = RelativeBias(cfg)
        self.layers = nn.ModuleList(HSTULayer(cfg) for _ in range(cfg.num_layers))
        self.inv_norm = 1.0 / cfg.attention_divisor

    def forward(
        self, x: torch.Tensor, kind: torch.Tensor, seg: torch.Tensor, pos: torch.Tensor,
        ts: torch.Tensor | None = None, prefix: torch.Tensor | None = None,
        prefix_kind: torch.Tensor | None = None, prefix_seg: torch.Tensor | None = None,
        prefix_pos: torch.Tensor | None = None, keep: slice | None = None,
        q_ts: torch.Tensor | None = None, plain: bool = False, prefix_ts: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """x ``[B, N, D]`` with attributes kind/seg/pos/ts ``[B, N]``; ``prefix`` ``[B, L, 2, P,
        H, Dh]`` with attributes ``[B, P]``. Returns the output ``[B, N, D]`` and, if ``keep`` is
        given, the keys/values of positions ``keep`` for every layer ``[B, L, 2, |keep|, H, Dh]``.
        ``q_ts`` ``[B, N]``: the queries' times for the time bias (default ``ts``, each item's
        own). ``plain``: the caller guarantees a plain causal layout without a prefix (rows of
        right-padded items of one segment at positions 0..N-1, as ``collate`` lays out a model
        without memory tokens), so no check reads the tensors (each would wait for the GPU).
        ``prefix_ts`` ``[B, P]``: the prefix's times (cached items; default 0: tokens have none).
        Outputs at padding positions are unspecified (nothing reads them).
        """
        if prefix is None:
            k_kind, k_seg, k_pos, k_ts = kind, seg, pos, ts
        else:
            k_kind = torch.cat([prefix_kind, kind], 1)
            k_seg = torch.cat([prefix_seg, seg], 1)
            k_pos = torch.cat([prefix_pos, pos], 1)
            k_ts = None if ts is None else torch.cat([torch.zeros_like(prefix_pos) if prefix_ts is None
                                                      else prefix_ts.to(ts.dtype), ts], 1)
        if plain and prefix is None:
            q_pos = k_pos = pos[:1]
            chunk, N = self.causal_chunk, pos.shape[1]
            mask = torch.ones(N, N, dtype=torch.bool, device=pos.device).tril()[None]
        else:
            q_pos, k_pos = _shared_rows(pos), _shared_rows(k_pos)  # [1, N] when all rows agree
            # Key positions 0..P+N-1 in column order, the queries being the last N: every mask
            # (all include pos_k <= pos_q) is lower triangular after the prefix.
            Nk, N = k_pos.shape[1], pos.shape[1]
            column_order = (k_pos.shape[0] == 1 and q_pos.shape[0] == 1
                            and torch.equal(k_pos[0], torch.arange(Nk, device=pos.device))
                            and torch.equal(q_pos[0], k_pos[0, Nk - N:]))
            chunk = self.causal_chunk if column_order else None
            mask = causal_mask(kind, seg, pos, prefix_kind, prefix_seg, prefix_pos)  # [1, N, P+N]
            if mask is None:
                mask = attention_mask(kind, seg, q_pos, k_kind, k_seg, k_pos)
        if x.is_cuda:  # skipping the upper triangle saves CPU time, but costs a GPU launches
            chunk = None
        per_row_bias = self.bias.time_w is not None and q_ts is not None and k_ts is not None
        if per_row_bias and torch.is_grad_enabled():
            # Each chunk's slice of a [B, N, P+N] bias would get a zero-filled [B, N, P+N]
            # gradient of its own in backward: 8 fills per step were a third of a time-bias
            # model's CPU step.
            chunk = None
        weights = mask.to(x.dtype).mul_(self.inv_norm)  # [B or 1, N, P+N]
        q_ts = ts if q_ts is None else q_ts
        rab = self.bias(q_pos, k_pos, kind == ITEM, k_kind == ITEM, q_ts, k_ts).to(x.dtype)
        kept = []
        for i, layer in enumerate(self.layers):
            pk = pv = None
            if prefix is not None:
                pk, pv = prefix[:, i, 0], prefix[:, i, 1]
            x, k, v = layer(x, weights, rab, pk, pv, chunk)
            if keep is not None:
                kept.append(torch.stack([k[:, keep], v[:, keep]], dim=1))  # [B, 2, |keep|, H, Dh]
        return x, (torch.stack(kept, dim=1) if keep is not None else None)


def _shared_rows(t: torch.Tensor) -> torch.Tensor:
    """``t[:1]`` if every row of ``t`` ``[B, N]`` equals the first, else ``t``: attributes
    that all rows share make ``[1, Nq, Nk]`` masks and biases instead of ``[B, Nq, Nk]``."""
    return t[:1] if bool((t == t[:1]).all()) else t


def init_embedding_(weight: torch.Tensor, std: float = 0.02) -> None:
    nn.init.trunc_normal_(weight, std=std, a=-2 * std, b=2 * std)


def input_scale(dim: int) -> float:
    return math.sqrt(dim)


class ItemScoring:
    """Cosine scoring against the item table ``self.item_emb`` (shared by every model here)."""

    item_emb: nn.Embedding

    def item_vectors(self, ids: torch.Tensor | None = None) -> torch.Tensor:
        """L2-normalised item embeddings ``[I+1, D]`` (or of ``ids``)."""
        w = self.item_emb.weight if ids is None else self.item_emb(ids)
        return F.normalize(w, dim=-1)

    @staticmethod
    def query_positions(lengths: torch.Tensor, at: tuple[torch.Tensor, torch.Tensor] | None,
                        ) -> tuple[torch.Tensor, torch.Tensor]:
        """``recommend``'s ``at``: (rows, positions) to read the outputs at; by default the last
        item of every row."""
        rows, positions = at if at is not None else (torch.arange(len(lengths), device=lengths.device), lengths - 1)
        if bool((positions < 0).any() or (positions >= lengths[rows]).any()):
            raise ValueError("positions must lie within their row's items")
        return rows, positions

    def score(self, user_vectors: torch.Tensor, table: torch.Tensor | None = None) -> torch.Tensor:
        """``[B, D]`` -> cosine scores ``[B, I+1]``; column 0 (padding) is -inf. ``table``:
        ``item_vectors()`` computed once by a caller whose weights no longer change (serving)."""
        scores = user_vectors @ (self.item_vectors() if table is None else table).T
        scores[:, 0] = float("-inf")
        return scores
