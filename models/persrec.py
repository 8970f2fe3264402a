"""PerSRec: HSTU with M learnable memory tokens that carry a user's long history.

Training and the reference computation run one masked pass over the full layout
(``persrec.models.layout``). Serving keeps, per user, only the memory: the keys and values of
the last token block at every layer, ``[L, 2, M, H, Dh]`` (index 0 keys, 1 values), and runs

- ``compress(H)``       ``[H | T]``                 -> memory  (RECOMPRESS policy, the paper)
- ``fold(memory, S)``   ``memory + [S | T]``        -> memory  (INCREMENTAL policy)
- ``recommend(memory, R)`` ``memory + [R]``         -> user vector, scored against all items

``recommend(compress(H), R)`` equals the full pass over ``[H | T | R]`` (tests/models). With
``num_memory_tokens=0`` the model is plain HSTU and ``recommend(None, R)`` runs over R alone.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import Architecture, ModelConfig
from .hstu import ItemScoring, HSTUStack, init_embedding_, input_scale, query_times
from .items import item_tower
from .layout import ITEM, PAD, TOKEN, LayoutBatch


class PerSRec(ItemScoring, nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        if cfg.architecture is not Architecture.HSTU:
            raise ValueError("PerSRec needs the HSTU architecture")
        self.cfg = cfg
        self.item_emb = item_tower(cfg.num_items, cfg.dim, cfg.item_repr, cfg.text_dim, cfg.id_dropout, cfg.new_item_ids)
        self.tokens = None
        if cfg.has_memory:
            self.tokens = nn.Parameter(torch.empty(cfg.num_memory_tokens, cfg.dim))
            init_embedding_(self.tokens)
        self.carry = None
        if cfg.memory_carry:  # zero at first: the model starts as one without the carry
            self.carry = nn.Linear(2 * cfg.num_heads * cfg.head_dim, cfg.dim, bias=False)
            nn.init.zeros_(self.carry.weight)
        self.pos_emb = None
        if cfg.abs_positions:
            self.pos_emb = nn.Embedding(cfg.max_len, cfg.dim)
            init_embedding_(self.pos_emb.weight)
        self.backbone = HSTUStack(cfg)
        self.dropout = nn.Dropout(cfg.dropout)
        self.scale = input_scale(cfg.dim)

    # ----------------------------------------------------------------- full (reference) pass
    def _embed(self, item_ids: torch.Tensor, kind: torch.Tensor, tok: torch.Tensor,
               carried: torch.Tensor | None = None) -> torch.Tensor:
        """Input vectors; ``carried`` ``[B, M, D]`` is added to token ``tok`` of each row."""
        x = self.item_emb(item_ids)  # [B, N, D]
        if self.tokens is not None:
            tokens = self.tokens[tok]
            if carried is not None:
                tokens = tokens + torch.gather(carried, 1, tok[..., None].expand(-1, -1, carried.shape[-1]))
            x = torch.where((kind == TOKEN)[..., None], tokens, x)
        x = x * self.scale
        if self.pos_emb is not None:  # rows start at position 0 (no memory tokens)
            N = x.shape[1]
            if N > self.cfg.max_len:
                raise ValueError(f"abs_positions models read at most max_len={self.cfg.max_len} items, got {N}")
            x = x + self.pos_emb.weight[:N]
        return self.dropout(x)

    def forward(self, batch: LayoutBatch) -> torch.Tensor:
        """One masked pass over the full layout -> L2-normalised outputs ``[B, N, D]``. With
        ``batch.memory``, the layout continues a user's earlier folds: the memory is block 0,
        which the layout's first segment reads, as ``fold`` reads a stored memory."""
        # one block reads the carried memory; a second would need the first's top layer
        if self.carry is not None and int((batch.kind == TOKEN).sum(1).max()) > self.cfg.num_memory_tokens:
            raise ValueError("a memory_carry model folds one segment at a time: lay rows out as one segment "
                             "and the recent part after a memory (history=lifelong training), not as several blocks")
        x = self._embed(batch.item_ids, batch.kind, batch.tok, self._carried(batch.memory, batch.has_memory))
        ts, q_ts = self._times(batch.ts, batch.qts)
        if batch.memory is None:
            # collate lays a model without memory tokens out as plain causal rows
            h, _ = self.backbone(x, batch.kind, batch.seg, batch.pos, ts, q_ts=q_ts, plain=self.tokens is None)
        else:
            prefix = self._prefix(batch.memory, batch.has_memory)
            h, _ = self.backbone(x, batch.kind, batch.seg, batch.pos + self.cfg.num_memory_tokens, ts,
                                 q_ts=q_ts, **prefix)
        return F.normalize(h, dim=-1)

    def _prefix(self, memory: torch.Tensor, has_memory: torch.Tensor | None) -> dict:
        """A stored memory as the backbone's prefix: block 0's tokens at positions 0..M-1 (a row
        without one: padding, which nothing attends to)."""
        B, M = memory.shape[0], self.cfg.num_memory_tokens
        if has_memory is None:
            has_memory = torch.ones(B, dtype=torch.bool, device=memory.device)
        pm = torch.arange(M, device=memory.device).expand(B, M)
        return dict(prefix=memory.to(self.backbone.bias.pos_w.dtype),
                    prefix_kind=torch.where(has_memory[:, None], TOKEN, PAD).expand(B, M),
                    prefix_seg=torch.zeros_like(pm), prefix_pos=pm)

    def _carried(self, memory: torch.Tensor | None, has_memory: torch.Tensor | None) -> torch.Tensor | None:
        """What a fold's tokens take from the previous memory ``[B, L, 2, M, H, Dh]``: its top
        layer's keys and values per token, projected to ``[B, M, D]`` (zero for a row without
        one; None for a model without the carry or a pass without a memory)."""
        if self.carry is None or memory is None:
            return None
        B, M = memory.shape[0], self.cfg.num_memory_tokens
        top = memory[:, -1].permute(0, 2, 1, 3, 4).reshape(B, M, -1).to(self.carry.weight.dtype)
        out = self.carry(top)
        return out if has_memory is None else out * has_memory[:, None, None].to(out.dtype)

    def _times(self, ts: torch.Tensor | None, q_ts: torch.Tensor | None):
        """(key times, query times) as the backbone reads them: none without a time bias, the
        items' own times as queries unless ``request_time``."""
        if not self.cfg.time_bias or ts is None:
            return None, None
        if self.cfg.request_time and q_ts is None:
            raise ValueError("a request_time model needs the query times (the next event's time)")
        return ts, (q_ts if self.cfg.request_time else None)

    def _block(self, items: torch.Tensor, lengths: torch.Tensor, with_tokens: bool):
        """Attributes of ``[items (seg 1) | tokens (block 1)]`` placed after a memory prefix."""
        B, N = items.shape
        M = self.cfg.num_memory_tokens
        dev = items.device
        ar = torch.arange(N, device=dev)
        kind = torch.where(ar[None] < lengths[:, None], ITEM, PAD)
        pos = (M + ar).expand(B, N)
        ids, tok = items, torch.zeros_like(items)
        if with_tokens:
            tm = torch.arange(M, device=dev).expand(B, M)
            kind = torch.cat([kind, torch.full_like(tm, TOKEN)], 1)
            pos = torch.cat([pos, M + lengths[:, None] + tm], 1)
            ids = torch.cat([items, torch.zeros_like(tm)], 1)
            tok = torch.cat([tok, tm], 1)
        return ids, kind, torch.ones_like(kind), pos, tok

    def _run(self, items, lengths, ts, memory, has_memory, with_tokens, after=None):
        B, N = items.shape
        M = self.cfg.num_memory_tokens
        ids, kind, seg, pos, tok = self._block(items, lengths, with_tokens)
        q_ts = None
        if ts is not None and self.cfg.request_time:
            q_ts = query_times(ts, lengths, after)
        if ts is not None and with_tokens:
            pad = lambda t: torch.cat([t, torch.zeros(B, M, dtype=t.dtype, device=t.device)], 1)  # noqa: E731
            ts = pad(ts)
            q_ts = None if q_ts is None else pad(q_ts)
        prefix = {} if memory is None else self._prefix(memory, has_memory)
        x = self._embed(ids, kind, tok, self._carried(memory, has_memory) if with_tokens else None)
        keep = slice(N, N + M) if with_tokens else None
        ts, q_ts = self._times(ts, q_ts)
        return self.backbone(x, kind, seg, pos, ts, keep=keep, q_ts=q_ts, **prefix)

    def compress(
        self, items: torch.Tensor, lengths: torch.Tensor, ts: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """History ``[B, N]`` (right-padded, ``lengths`` ``[B]``, may be 0) -> memory
        ``[B, L, 2, M, H, Dh]``. ``ts``: as in ``fold``."""
        return self.fold(None, None, items, lengths, ts)

    def fold(
        self, memory: torch.Tensor | None, has_memory: torch.Tensor | None,
        items: torch.Tensor, lengths: torch.Tensor, ts: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Fold segment ``items`` ``[B, N]`` into ``memory`` ``[B, L, 2, M, H, Dh]``.

        ``has_memory`` ``[B]`` bool says which rows have a previous memory; rows without one
        (a user's first fold) are compressed from the segment alone, as in training.
        ``ts`` ``[B, N]``: the items' times (time-bias models). A ``request_time`` model asks
        each item's query at the next item's time and the segment's last at its own
        (``layout.collate``): a memory depends on the events it holds only.
        """
        self._need_memory()
        _, kv = self._run(items, lengths, ts, memory, has_memory, with_tokens=True)
        return kv

    def empty_memory(self, batch_size: int = 1) -> torch.Tensor:
        """Memory of a user with no history yet: ``compress`` of an empty sequence."""
        dev = self.backbone.bias.pos_w.device
        items = torch.zeros(batch_size, 0, dtype=torch.long, device=dev)
        return self.compress(items, torch.zeros(batch_size, dtype=torch.long, device=dev))

    def recommend(
        self, memory: torch.Tensor | None, items: torch.Tensor, lengths: torch.Tensor,
        ts: torch.Tensor | None = None, at: tuple[torch.Tensor, torch.Tensor] | None = None,
        request_ts: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Memory ``[B, L, 2, M, H, Dh]`` (None without memory tokens) + recent items ``[B, N]``
        (right-padded, ``lengths`` >= 1) -> L2-normalised user vectors ``[B, D]``.

        ``ts`` ``[B, N]``: the items' times; ``request_ts`` ``[B]``: when each row's
        recommendation is asked for, which a ``request_time`` model reads (default: the time of
        the row's last item, i.e. at that event).

        ``at = (rows, positions)`` (``[Q]`` each) asks for the vectors after ``positions`` of
        ``rows`` instead, ``[Q, D]``: attention is causal and its biases depend on distances
        only, so the vector after position p of a row is ``recommend`` of the row's first p + 1
        items, and one pass answers every prefix of a row (a user's burst of events). Not for
        ``request_time`` models: there the query at p is asked at the time of item p + 1, so a
        prefix ending at p needs its own row."""
        if bool((lengths < 1).any()):
            raise ValueError("recommend needs at least one recent item per row")
        if (memory is None) == self.cfg.has_memory:
            raise ValueError("pass a memory exactly when the model has memory tokens")
        rows, positions = self.query_positions(lengths, at)
        if at is not None and self.cfg.request_time and ts is not None and bool((positions != lengths[rows] - 1).any()):
            raise ValueError("a request_time model answers at the last item of a row only")
        h, _ = self._run(items, lengths, ts, memory, None, with_tokens=False, after=request_ts)
        return F.normalize(h[rows, positions], dim=-1)

    def extend_cache(
        self, cache: torch.Tensor | None, cached: torch.Tensor, items: torch.Tensor, lengths: torch.Tensor,
        memory: torch.Tensor | None = None, ts: torch.Tensor | None = None, cache_ts: torch.Tensor | None = None,
        request_ts: torch.Tensor | None = None, at: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Serving from a per-user key/value cache (how NVIDIA recsys-examples serves HSTU):
        ``cache`` ``[B, L, 2, P, H, Dh]`` holds every layer's keys and values of each user's
        ``cached`` ``[B]`` earlier items (right-padded; None when P = 0); the new ``items``
        ``[B, N]`` (``lengths``) attend to them and to each other. Returns the user vectors after
        each row's last new item ``[B, D]`` and the new items' keys/values ``[B, L, 2, N, H, Dh]``
        to append.

        Plain HSTU: the cache is the whole history, and this equals one pass over it. With memory
        tokens, ``memory`` ``[B, L, 2, M, H, Dh]`` comes first and the cache holds the recent
        items after it: this equals ``recommend(memory, cached items + new items)``. After a
        fold the memory changes, and so do the recent items' keys and values: rebuild the cache
        then (``extend_cache(None, 0, recent, ..., memory)``).

        Time-bias models take the new items' times ``ts`` ``[B, N]`` and the cached ones'
        ``cache_ts`` ``[B, P]``. A ``request_time`` model asks each item's query at the next
        item's time and the last one's at ``request_ts`` ``[B]`` (default: its own time): so the
        keys/values of a row's last item hold only until the next event, which must send that
        item again with itself (cache all but the last; each event is then two positions).

        ``at = (rows, positions)`` (``[Q]`` each; positions among the new items) asks for the
        vectors after those positions instead, ``[Q, D]``, as in ``recommend``."""
        if (memory is None) == self.cfg.has_memory:
            raise ValueError("pass a memory exactly when the model has memory tokens")
        if self.cfg.time_bias and (ts is None or (cache is not None and cache_ts is None)):
            raise ValueError("a time-bias model needs the new items' times and the cached items' times")
        B, N = items.shape
        dev = items.device
        M = 0 if memory is None else self.cfg.num_memory_tokens
        P = 0 if cache is None else cache.shape[3]
        ar = torch.arange(N, device=dev)
        kind = torch.where(ar[None] < lengths[:, None], ITEM, PAD)
        pos = M + cached[:, None] + ar[None]  # each row's new items follow its own cached ones
        x = self._embed(items, kind, torch.zeros_like(items))
        parts = []  # (keys/values, kind, segment, position, time) of the prefix: the memory, then the cache
        if M:
            pm = torch.arange(M, device=dev).expand(B, M)
            parts.append((memory, torch.full_like(pm, TOKEN), torch.zeros_like(pm), pm, torch.zeros_like(pm)))
        if P:
            pp = torch.arange(P, device=dev).expand(B, P)
            parts.append((cache, torch.where(pp < cached[:, None], ITEM, PAD), torch.ones_like(pp), M + pp,
                          torch.zeros_like(pp) if cache_ts is None else cache_ts))
        prefix = {}
        if parts:
            kv, k_kind, k_seg, k_pos, k_ts = (torch.cat(t, dim) for t, dim in zip(zip(*parts), (3, 1, 1, 1, 1)))
            prefix = dict(prefix=kv.to(x.dtype), prefix_kind=k_kind, prefix_seg=k_seg, prefix_pos=k_pos,
                          prefix_ts=k_ts if self.cfg.time_bias else None)
        q_ts = query_times(ts, lengths, request_ts) if self.cfg.time_bias and self.cfg.request_time else None
        ts, q_ts = self._times(ts, q_ts)
        rows, positions = self.query_positions(lengths, at)
        if at is not None and self.cfg.request_time and bool((positions != lengths[rows] - 1).any()):
            raise ValueError("a request_time model answers at the last item of a row only")
        h, kv = self.backbone(x, kind, torch.ones_like(kind), pos, ts, keep=slice(0, N), q_ts=q_ts, **prefix)
        return F.normalize(h[rows, positions], dim=-1), kv

    def _need_memory(self) -> None:
        if not self.cfg.has_memory:
            raise ValueError("this model has no memory tokens (num_memory_tokens=0)")
