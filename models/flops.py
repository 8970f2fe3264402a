"""Analytic cost of one forward pass, in floating-point operations (2 per multiply-add).

Counts the matrix products that dominate (projections, attention, feed-forward, scoring) and
leaves out elementwise work (norms, activations, masks), which is small in FLOPs though not in
time. Attention counts only the pairs a query may see: causal pairs within the pass plus every
cached prefix key, i.e. what an implementation that skips masked pairs computes.
"""

from __future__ import annotations

from .config import Architecture, ModelConfig


def attention_pairs(queries: int, prefix: int = 0) -> int:
    """(query, key) pairs of ``queries`` causal positions after ``prefix`` cached keys."""
    return queries * prefix + queries * (queries + 1) // 2


def encoder_flops(cfg: ModelConfig, queries: int, prefix: int = 0) -> int:
    """One pass of the backbone over ``queries`` positions (after ``prefix`` cached keys)."""
    L, D, n = cfg.num_layers, cfg.dim, queries
    pairs = attention_pairs(queries, prefix)
    if cfg.architecture is Architecture.SASREC:
        proj = 2 * n * D * 4 * D  # q, k, v, out
        ffn = 2 * n * D * D * 2
        attn = 2 * pairs * D * 2  # QK^T and AV
        return L * (proj + ffn + attn)
    inner = cfg.num_heads * cfg.head_dim
    proj = 2 * n * D * 4 * inner + 2 * n * inner * D  # uvqk and out
    attn = 2 * pairs * inner * 2
    return L * (proj + attn)


def score_flops(cfg: ModelConfig) -> int:
    """Cosine scores of one user vector against every item."""
    return 2 * cfg.dim * cfg.num_items


def full_request_flops(cfg: ModelConfig, history: int) -> int:
    """Serve from the raw sequence: one pass over the last ``min(history, max_len)`` items."""
    return encoder_flops(cfg, min(history, cfg.max_len)) + score_flops(cfg)


def memory_request_flops(cfg: ModelConfig, recent: int) -> int:
    """Serve from a memory: ``recommend(memory, recent)``, ``recent`` queries after M keys."""
    return encoder_flops(cfg, recent, prefix=cfg.num_memory_tokens) + score_flops(cfg)


def compress_flops(cfg: ModelConfig, history: int) -> int:
    """``compress(H)``: one pass over ``[H | T]`` (RECOMPRESS policy)."""
    return encoder_flops(cfg, history + cfg.num_memory_tokens)


def fold_flops(cfg: ModelConfig, segment: int) -> int:
    """``fold(memory, S)``: one pass over ``[S | T]`` after M cached keys (INCREMENTAL policy)."""
    M = cfg.num_memory_tokens
    return encoder_flops(cfg, segment + M, prefix=M)


def _resent(cfg: ModelConfig) -> int:
    """Items a cached request sends again: under ``request_time`` the previous item's query is
    asked at the new event's time, so its keys/values are computed again (``extend_cache``)."""
    return 1 if cfg.time_bias and cfg.request_time else 0


def cached_request_flops(cfg: ModelConfig, recent: int) -> int:
    """Serve from a memory with the recent items' keys/values cached: the newest of ``recent``
    items (and under ``request_time`` the one before it) after the M memory keys and the
    cached items."""
    n = 1 + _resent(cfg)
    return encoder_flops(cfg, n, prefix=cfg.num_memory_tokens + recent - n) + score_flops(cfg)


def cached_update_flops(cfg: ModelConfig) -> int:
    """What a fold costs a cached PerSRec: the fold, and the keys/values of the ``recent_len - 1``
    items the fold leaves in the window (all but the last under ``request_time``), rebuilt
    against the new memory."""
    M = cfg.num_memory_tokens
    return fold_flops(cfg, cfg.segment_len) + encoder_flops(cfg, cfg.recent_len - 1 - _resent(cfg), prefix=M)
