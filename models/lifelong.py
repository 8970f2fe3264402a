"""A user's whole history, as the stream serves it: whole segments folded into the memory, in
order, and the rest read raw (INCREMENTAL; RECOMPRESS compresses the last aged-out items).

The stream folds a user's events in whole segments of ``segment_len`` from the first event on,
leaving at least ``recent_len`` recent ones (``stream.window.fold_segment``). These functions do
the same offline, in batches: ``fold_chains`` builds the memories, ``lifelong_vectors`` answers
from them, and ``LifelongExamples`` trains on windows taken anywhere in a history, with the
memory of everything before the window carried in (folds without gradient, refreshed once per
epoch: truncated backpropagation through the folds).
"""

from __future__ import annotations

import numpy as np
import torch

from .config import MemoryPolicy, ModelConfig
from .evaluate import pad_ids
from .layout import LayoutBatch, collate


def whole_segments(n: int, cfg: ModelConfig) -> int:
    """How many whole segments of ``n`` events the stream has folded (``recent_len`` stay)."""
    return max(n - cfg.recent_len, 0) // cfg.segment_len


@torch.no_grad()
def fold_chains(
    model, histories: list[np.ndarray], times: list[np.ndarray] | None, segments: list[int], *,
    device: torch.device | str = "cpu", batch_size: int = 512,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each history's first ``segments[u]`` whole segments folded in order, as the stream folds
    them: memories ``[U, L, 2, M, H, Dh]`` and ``has_memory`` ``[U]`` (False: no segment; such a
    row holds the new-user memory). Users fold side by side, ``batch_size`` at a time; the
    model runs in eval mode."""
    cfg = model.cfg
    was_training = model.training
    model.eval()
    U, seg = len(histories), cfg.segment_len
    memory = model.empty_memory(1).to(device).expand(U, *cfg.memory_shape).clone()
    has = torch.zeros(U, dtype=torch.bool, device=device)
    order = np.argsort([-s for s in segments], kind="stable")  # most folds first
    for start in range(0, U, batch_size):
        users = order[start : start + batch_size]
        for j in range(int(segments[users[0]]) if len(users) else 0):
            active = users[np.array([segments[u] > j for u in users])]
            items = [histories[u][j * seg : (j + 1) * seg] for u in active]
            stamps = None if times is None else pad_ids([times[u][j * seg : (j + 1) * seg] for u in active], device)
            idx = torch.from_numpy(active).to(device)
            memory[idx] = model.fold(memory[idx], has[idx], pad_ids(items, device),
                                     torch.full((len(active),), seg, device=device), stamps)
            has[idx] = True
    model.train(was_training)
    return memory, has


@torch.no_grad()
def lifelong_vectors(
    model, histories: list[np.ndarray], times: list[np.ndarray] | None, request_ts: np.ndarray | None,
    *, device: torch.device | str = "cpu", recompress_budget: int | None = None, batch_size: int = 256,
) -> torch.Tensor:
    """User vectors ``[U, D]`` from each user's entire history, on the serving path: the memory
    of every whole segment (INCREMENTAL: the fold chain; RECOMPRESS: ``compress`` of the last
    ``recompress_budget`` of those items, default ``max_len - recent_len``) and the rest read raw.
    ``request_ts`` ``[U]``: when each is asked (a request-time model's last query)."""
    cfg = model.cfg
    model.eval()
    folds = [whole_segments(len(h), cfg) for h in histories]
    cut = [f * cfg.segment_len for f in folds]
    if cfg.policy is MemoryPolicy.INCREMENTAL:
        memory, has = fold_chains(model, histories, times, folds, device=device)
    else:
        budget = recompress_budget or cfg.max_len - cfg.recent_len
        memory = torch.empty(len(histories), *cfg.memory_shape, device=device)
        has = torch.tensor([c > 0 for c in cut], device=device)
        order = np.argsort(cut, kind="stable")
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            aged = [histories[u][: cut[u]][-budget:] for u in idx]
            stamps = None if times is None else pad_ids([times[u][: cut[u]][-budget:] for u in idx], device)
            memory[torch.from_numpy(idx).to(device)] = model.compress(
                pad_ids(aged, device), torch.tensor([len(a) for a in aged], device=device), stamps)
    out = torch.empty(len(histories), cfg.dim, device=device)
    order = np.argsort([len(h) - c for h, c in zip(histories, cut)], kind="stable")
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        rows = torch.from_numpy(idx).to(device)
        recent = [histories[u][cut[u]:] for u in idx]
        stamps = None if times is None else pad_ids([times[u][cut[u]:] for u in idx], device)
        request = None if request_ts is None else torch.as_tensor(request_ts[idx], device=device)
        mem = torch.where(has[rows][:, None, None, None, None, None], memory[rows], model.empty_memory(1).to(device))
        out[rows] = model.recommend(mem, pad_ids(recent, device), torch.tensor([len(r) for r in recent], device=device),
                                    stamps, request_ts=request)
    return out


class LifelongExamples:
    """INCREMENTAL training as served: every epoch, each user's example is a window ending
    anywhere in their history, laid out as ``[S | T | ... | S | T | R]`` over the last
    ``(max_len - recent_len) // segment_len`` whole segments and the recent part, with the
    memory of every earlier whole segment carried in (``fold_chains``, no gradient, with the
    weights at the epoch's start). A user short of that gets the plain layout from their first
    event, as before.

    ``fold_grad``: the last that-many carried segments are not folded at the epoch's start but in
    each step, with the current weights and their gradient (``batch``), so the loss of the window
    reaches what those folds wrote: truncated backpropagation through ``fold_grad`` more folds.
    """

    def __init__(self, seqs: list[np.ndarray], ts: list[np.ndarray] | None, cfg: ModelConfig, device,
                 fold_grad: int = 0) -> None:
        if cfg.policy is not MemoryPolicy.INCREMENTAL or not cfg.has_memory:
            raise ValueError("lifelong examples are for INCREMENTAL models with memory tokens")
        if fold_grad < 0:
            raise ValueError(f"fold_grad must be >= 0, not {fold_grad}")
        if cfg.memory_carry and fold_grad < 1:
            raise ValueError("a memory_carry model learns its carry through the folds: fold_grad >= 1")
        keep = [i for i, s in enumerate(seqs) if len(s) >= 2]
        self.seqs = [seqs[i] for i in keep]
        self.ts = None if ts is None else [ts[i] for i in keep]
        self.cfg, self.device, self.fold_grad = cfg, device, fold_grad
        # a memory_carry model reads one token block in a pass: its window is one segment and the recent part
        self.window_segments = 1 if cfg.memory_carry else (cfg.max_len - cfg.recent_len) // cfg.segment_len
        self.all: LayoutBatch | None = None
        self.model = None

    def __len__(self) -> int:
        return len(self.seqs)

    def refresh(self, model, rng: np.random.Generator) -> None:
        """Draw this epoch's windows and fold what lies before each with the current weights
        (all but the last ``fold_grad`` segments: those fold in each step)."""
        cfg, seg, G = self.cfg, self.cfg.segment_len, self.fold_grad
        ends = [int(rng.integers(1, len(s))) for s in self.seqs]  # inputs s[:e], targets s[1:e+1]
        carried = [max(whole_segments(e, cfg) - self.window_segments, 0) for e in ends]
        early = [max(c - G, 0) for c in carried]
        memory, has = fold_chains(model, self.seqs, self.ts, early, device=self.device)
        starts = [c * seg for c in carried]
        inputs = [s[a:e] for s, a, e in zip(self.seqs, starts, ends)]
        targets = [s[a + 1 : e + 1] for s, a, e in zip(self.seqs, starts, ends)]
        times = qtimes = None
        if self.ts is not None:
            times = [t[a:e] for t, a, e in zip(self.ts, starts, ends)]
            qtimes = [t[a + 1 : e + 1] for t, a, e in zip(self.ts, starts, ends)]
        batch = collate(inputs, cfg, targets, times, qtimes).to(self.device)
        batch.memory, batch.has_memory = memory, has
        self.all, self.model = batch, model
        self.width = (batch.kind != 0).sum(1).cpu().numpy()
        self.lengths = np.array([len(x) for x in inputs])
        if G:  # the segments folded in each step, aligned to end at the window: [U, G, seg]
            U = len(self.seqs)
            late_items = torch.zeros(U, G, seg, dtype=torch.long)
            late_times = None if self.ts is None else torch.zeros(U, G, seg, dtype=torch.long)
            late = torch.zeros(U, G, dtype=torch.bool)
            for u, (a, c) in enumerate(zip(early, carried)):
                for j in range(c - a):
                    at, lo = G - (c - a) + j, (a + j) * seg
                    late[u, at] = True
                    late_items[u, at] = torch.from_numpy(self.seqs[u][lo : lo + seg])
                    if late_times is not None:
                        late_times[u, at] = torch.from_numpy(self.ts[u][lo : lo + seg])
            # on the training device once, not in every step
            self.late, self.late_items = late.to(self.device), late_items.to(self.device)
            self.late_times = None if late_times is None else late_times.to(self.device)

    def batch(self, idx: np.ndarray) -> LayoutBatch:
        index = torch.from_numpy(np.asarray(idx)).to(self.all.kind.device)
        b = self.all.rows(index, int(self.width[idx].max()))
        if not self.fold_grad:
            return b
        memory, has = b.memory, b.has_memory
        lengths = torch.full((len(idx),), self.cfg.segment_len, device=index.device)
        for j in range(self.fold_grad):
            late = self.late[index, j]
            if not late.any():
                continue
            stamps = None if self.late_times is None else self.late_times[index, j]
            folded = self.model.fold(memory, has, self.late_items[index, j], lengths, stamps)
            memory = torch.where(late[:, None, None, None, None, None], folded, memory)
            has = has | late
        b.memory, b.has_memory = memory, has
        return b
