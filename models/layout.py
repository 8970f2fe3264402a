"""Where every position sits in a sequence, and who may attend to whom. Pure functions.

A model input is a row of positions, each an item, a memory token or padding, with
a segment number ``seg`` and a position id ``pos``. Token block ``b`` follows item segment ``b``.
One rule (``attention_mask``) covers every layout the models use:

- an item of segment s sees earlier items of segment s and the tokens of block s-1;
- a token of block b sees the items of segment b and the tokens of blocks b-1 and b (causally).

Layouts (P history items, M tokens, R recent items; ``|`` concatenates):
- plain HSTU: ``[items]``, all in segment 1;
- RECOMPRESS (the paper): ``[H seg 1 | T blk 1 | R seg 2]`` so R reaches H only through T;
- INCREMENTAL: ``[S1 seg 1 | T blk 1 | S2 seg 2 | T blk 2 | ... | R seg J+1]``.
Serving reproduces them block by block: the stored memory is the previous block's keys and
values, placed in front as block 0 with ``pos`` 0..M-1. Attention biases depend only on
``pos_q - pos_k``, so offsetting all positions of a user by a constant changes nothing.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import torch

from .config import MemoryPolicy, ModelConfig

PAD, ITEM, TOKEN = 0, 1, 2


def attention_mask_reference(
    q_kind: torch.Tensor, q_seg: torch.Tensor, q_pos: torch.Tensor,
    k_kind: torch.Tensor, k_seg: torch.Tensor, k_pos: torch.Tensor,
) -> torch.Tensor:
    """The rule, case by case. ``[B, Nq]`` query and ``[B, Nk]`` key attributes ->
    ``[B, Nq, Nk]`` bool (True = attend). ``attention_mask`` computes the same, faster."""
    qk, qs, qp = q_kind[:, :, None], q_seg[:, :, None], q_pos[:, :, None]
    kk, ks, kp = k_kind[:, None, :], k_seg[:, None, :], k_pos[:, None, :]
    q_item, q_tok = qk == ITEM, qk == TOKEN
    k_item, k_tok = kk == ITEM, kk == TOKEN
    same, prev = ks == qs, ks == qs - 1
    allowed = (
        (q_item & k_item & same)
        | (q_item & k_tok & prev)
        | (q_tok & k_item & same)
        | (q_tok & k_tok & (same | prev))
    )
    return allowed & (kp <= qp)


def attention_mask(
    q_kind: torch.Tensor, q_seg: torch.Tensor, q_pos: torch.Tensor,
    k_kind: torch.Tensor, k_seg: torch.Tensor, k_pos: torch.Tensor,
) -> torch.Tensor:
    """``attention_mask_reference`` in four ``[B, Nq, Nk]`` operations instead of about ten.

    Each key gets a code, ``2 * seg`` for an item and ``2 * seg + 1`` for a token, so that what
    a query of segment s may see is one interval of codes: an item query sees ``[2s-1, 2s]``
    (tokens of block s-1, items of segment s), a token query ``[2s-1, 2s+1]`` (also the tokens
    of its own block); padding keys and queries get codes and intervals that never meet.
    Attributes may have batch 1 (shared by all rows, e.g. ``pos`` in training).
    """
    never = -4  # below every interval: seg >= 0, so lo >= -1
    k_code = torch.where(k_kind == PAD, never, 2 * k_seg + (k_kind == TOKEN).long())
    q_real = q_kind != PAD
    lo = torch.where(q_real, 2 * q_seg - 1, 1 - never)  # padding queries: an empty interval
    hi = torch.where(q_real, 2 * q_seg + (q_kind == TOKEN).long(), never - 1)
    k_code = k_code[:, None, :]
    in_interval = (k_code >= lo[:, :, None]) & (k_code <= hi[:, :, None])
    return in_interval & (k_pos[:, None, :] <= q_pos[:, :, None])


def is_plain_causal(kind: torch.Tensor, seg: torch.Tensor, pos: torch.Tensor, start: int = 0) -> bool:
    """True when every row is ``[items | padding]`` in one segment with positions
    ``start..start+N-1`` (plain HSTU training and serving). Then, for every item query,
    ``attention_mask`` is the causal mask: right padding only ever sits after the queries that
    could see it."""
    n = kind.shape[1]
    return (
        not bool((kind == TOKEN).any())
        and bool((kind[:, 1:] <= kind[:, :-1]).all())  # ITEM (1) never after PAD (0)
        and bool(((seg == seg[:, :1]) | (kind == PAD)).all())
        and bool((pos == torch.arange(start, start + n, device=pos.device)).all())
    )


def causal_mask(
    kind: torch.Tensor, seg: torch.Tensor, pos: torch.Tensor,
    prefix_kind: torch.Tensor | None = None, prefix_seg: torch.Tensor | None = None,
    prefix_pos: torch.Tensor | None = None,
) -> torch.Tensor | None:
    """``[1, N, P+N]`` bool ``[ones(N, P) | tril(N, N)]`` when that is what ``attention_mask``
    gives every item query, else None.

    That holds for plain causal items (``is_plain_causal``, positions after the prefix) behind a
    prefix of P tokens of the items' previous block at positions ``0..P-1``: the serving path
    ``recommend(memory, R)``. Masks of this shape skip the per-row mask and let the attention
    drop the masked upper triangle (``hstu_attention``'s ``causal_chunk``).
    """
    P = 0 if prefix_kind is None else prefix_kind.shape[1]
    if P and not (
        bool((prefix_kind == TOKEN).all())
        and bool((prefix_seg == seg[:, :1] - 1).all())
        and bool((prefix_pos == torch.arange(P, device=pos.device)).all())
    ):
        return None
    if not is_plain_causal(kind, seg, pos, start=P):
        return None
    N = kind.shape[1]
    mask = torch.ones(N, P + N, dtype=torch.bool, device=kind.device).tril(diagonal=P)
    return mask[None]


@dataclass(frozen=True)
class UserLayout:
    """One user's layout. ``src[i]`` = index into the user's items (-1 if not an item),
    ``tok[i]`` = memory-token index (-1 if not a token), ``closes[i]``: the last item of a
    segment that a token block follows (a memory's last item)."""

    kind: np.ndarray
    seg: np.ndarray
    src: np.ndarray
    tok: np.ndarray
    closes: np.ndarray


def segment_lengths(n: int, cfg: ModelConfig) -> list[int]:
    """Split ``n`` items into the item segments of the training layout (last = recent part).

    INCREMENTAL, as the stream folds: whole segments of ``segment_len`` from the oldest item,
    leaving at least ``recent_len`` recent items; the recent part keeps the rest (``recent_len``
    to ``recent_len + segment_len - 1`` items). With no whole segment, an empty one keeps the
    layout's token block (a memory of nothing, as a new user's)."""
    if not cfg.has_memory:
        return [n]
    recent = min(n, cfg.recent_len)
    history = n - recent
    if cfg.policy is MemoryPolicy.RECOMPRESS:
        return [history, recent]
    folds = history // cfg.segment_len
    return [cfg.segment_len] * folds + [0] * (folds == 0) + [n - folds * cfg.segment_len]


@functools.lru_cache(maxsize=4096)
def _user_layout(seg_lens: tuple[int, ...], num_tokens: int) -> UserLayout:
    kind, seg, src, tok, closes = [], [], [], [], []
    start = 0
    for s, n in enumerate(seg_lens, start=1):
        kind += [ITEM] * n
        seg += [s] * n
        src += range(start, start + n)
        tok += [-1] * n
        start += n
        last_segment = s == len(seg_lens)
        closes += [False] * (n - 1) + [not last_segment] if n else []
        if not last_segment:  # every segment but the last (recent) one is followed by tokens
            kind += [TOKEN] * num_tokens
            seg += [s] * num_tokens
            src += [-1] * num_tokens
            tok += range(num_tokens)
            closes += [False] * num_tokens
    as_arr = lambda x: np.asarray(x, dtype=np.int64)  # noqa: E731
    return UserLayout(as_arr(kind), as_arr(seg), as_arr(src), as_arr(tok), np.asarray(closes, bool))


def user_layout(n: int, cfg: ModelConfig) -> UserLayout:
    return _user_layout(tuple(segment_lengths(n, cfg)), cfg.num_memory_tokens)


@dataclass
class LayoutBatch:
    """A padded batch in the full (training / reference) layout. All tensors ``[B, N]`` int64
    except ``last`` ``[B]``: the position of each row's last item (where the next item is scored).
    ``targets`` is 0 wherever there is no next-item target. ``ts``: each item's time;
    ``qts``: the time its query is asked at (the next event's, see ``hstu.query_times``)."""

    item_ids: torch.Tensor
    kind: torch.Tensor
    seg: torch.Tensor
    pos: torch.Tensor
    tok: torch.Tensor
    targets: torch.Tensor
    last: torch.Tensor
    ts: torch.Tensor | None = None
    qts: torch.Tensor | None = None
    # A memory carried in from folds before the layout (block 0): ``[B, L, 2, M, H, Dh]``, and
    # ``has_memory`` ``[B]`` (rows without one read the new-user memory, as in serving).
    memory: torch.Tensor | None = None
    has_memory: torch.Tensor | None = None

    def rows(self, index: torch.Tensor, width: int | None = None) -> "LayoutBatch":
        """Rows ``index`` of the batch, cut to their first ``width`` columns."""
        cut = lambda t: None if t is None else t[index, :width]  # noqa: E731
        pick = lambda t: None if t is None else t[index]  # noqa: E731
        return LayoutBatch(cut(self.item_ids), cut(self.kind), cut(self.seg), cut(self.pos),
                           cut(self.tok), cut(self.targets), self.last[index], cut(self.ts), cut(self.qts),
                           pick(self.memory), pick(self.has_memory))

    def to(self, device: torch.device | str) -> "LayoutBatch":
        move = lambda t: None if t is None else t.to(device, non_blocking=True)  # noqa: E731
        return LayoutBatch(*(move(getattr(self, f)) for f in self.__dataclass_fields__))


def collate(
    inputs: list[np.ndarray],
    cfg: ModelConfig,
    targets: list[np.ndarray] | None = None,
    timestamps: list[np.ndarray] | None = None,
    query_timestamps: list[np.ndarray] | None = None,
) -> LayoutBatch:
    """Lay out each user's ``inputs`` (item ids, oldest first, each non-empty) and pad to the
    longest row. ``targets[b][i]`` is the item to predict after ``inputs[b][i]`` (0 = none);
    ``timestamps``/``query_timestamps`` are aligned with ``inputs`` (the items' times and the
    times of the events each one's query predicts). The last item of a segment that tokens
    follow is asked at its own time instead: a memory holds the events it was made of and
    nothing later, so ``compress``/``fold`` of a segment need no time from after it."""
    layouts = [user_layout(len(x), cfg) for x in inputs]
    B, N = len(inputs), max(len(lay.kind) for lay in layouts)
    item_ids = np.zeros((B, N), np.int64)
    kind = np.zeros((B, N), np.int64)
    seg = np.zeros((B, N), np.int64)
    tok = np.zeros((B, N), np.int64)
    tgt = np.zeros((B, N), np.int64)
    ts = np.zeros((B, N), np.int64) if timestamps is not None else None
    qts = np.zeros((B, N), np.int64) if query_timestamps is not None else None
    last = np.zeros(B, np.int64)
    for b, (x, lay) in enumerate(zip(inputs, layouts)):
        n = len(lay.kind)
        is_item = lay.src >= 0
        kind[b, :n], seg[b, :n] = lay.kind, lay.seg
        tok[b, :n] = np.maximum(lay.tok, 0)
        item_ids[b, :n][is_item] = x[lay.src[is_item]]
        if targets is not None:
            tgt[b, :n][is_item] = targets[b][lay.src[is_item]]
        if ts is not None:
            ts[b, :n][is_item] = timestamps[b][lay.src[is_item]]
        if qts is not None:
            qts[b, :n][is_item] = query_timestamps[b][lay.src[is_item]]
            qts[b, :n][lay.closes] = timestamps[b][lay.src[lay.closes]]
        last[b] = np.flatnonzero(is_item)[-1]
    pos = np.broadcast_to(np.arange(N, dtype=np.int64), (B, N)).copy()
    t = torch.from_numpy
    return LayoutBatch(
        t(item_ids), t(kind), t(seg), t(pos), t(tok), t(tgt), t(last),
        None if ts is None else t(ts), None if qts is None else t(qts),
    )
