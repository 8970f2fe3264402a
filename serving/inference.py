"""Batched model calls on numpy arrays: what the Triton python models run.

Kept free of Triton so the same code runs in-process (tests, offline checks) and inside
``triton_models/*/model.py``. Inputs: ``models.inputs.ModelInputs``.
"""

from __future__ import annotations

import gc
from pathlib import Path

import numpy as np
import torch

from persrec.models.checkpoint import Checkpoint, load_checkpoint
from persrec.models.device import pick_device
from persrec.models.inputs import ModelInputs
from persrec.serving.window_cache import WindowCache, row_key


class ModelRunner:
    def __init__(self, checkpoint: Checkpoint | str | Path, device: str = "auto",
                 cpu_threads: int | None = None, window_cache_mb: float = 0) -> None:
        self.device = pick_device(device)
        if self.device.type == "cpu" and cpu_threads:
            # Small batches gain nothing from more threads, and idle OpenMP threads spinning next
            # to the worker and the broker on a few cores cost a lot.
            torch.set_num_threads(cpu_threads)
        ck = checkpoint if isinstance(checkpoint, Checkpoint) else load_checkpoint(checkpoint)
        self.checkpoint = ck
        self.cfg = ck.config
        self.model_version = ck.model_version
        self.model = ck.build_model(self.device)
        self._empty = None
        self.catalogue_revision = 0  # the item-catalogue rows applied (apply_catalogue)
        with torch.inference_mode():
            self._table = self.model.item_vectors()  # [I+1, D], normalised once: weights are fixed
            if self.cfg.has_memory:
                self._empty = self.model.empty_memory(1)  # [1, L, 2, M, H, Dh]
        # the recent window's keys/values between a user's events (``recommend``)
        self.window_cache = None
        if self.cfg.has_memory and window_cache_mb > 0:
            self.window_cache = WindowCache(int(window_cache_mb * 2**20), self.cfg.request_time)

    def apply_catalogue(self, rows) -> None:
        """Read items registered since training (``memory.CatalogueItem`` rows: dense id, text
        embedding, revision) as the model reads any item by its text, in its inputs and in its
        answers. Raises for a model that reads items by id only."""
        if not rows:
            return
        if not self.cfg.item_repr.has_text:
            raise ValueError("this model reads items by id only: it cannot take catalogue items")
        ids = np.array([r.dense_id for r in rows], np.int64)
        self.model.item_emb.put_items(ids, np.stack([r.embedding for r in rows]))
        self.catalogue_revision = max(self.catalogue_revision, max(r.revision for r in rows))
        with torch.inference_mode():
            self._table = self.model.item_vectors()
        if self.window_cache is not None:  # an item's embedding may have changed with its text
            self.window_cache.clear()

    @property
    def num_items(self) -> int:
        """Items the model can answer with: the trained ones and the catalogue's."""
        return self._table.shape[0] - 1

    def _tensor(self, a: np.ndarray, dtype=None) -> torch.Tensor:
        return torch.as_tensor(np.ascontiguousarray(a), dtype=dtype, device=self.device)

    def _memory(self, memory: np.ndarray, has_memory: np.ndarray) -> torch.Tensor:
        """Rows without a memory get the new-user memory (``compress`` of nothing)."""
        mem = self._tensor(memory, torch.float32)
        has = self._tensor(has_memory, torch.bool)
        return torch.where(has[:, None, None, None, None, None], mem, self._empty)

    def recommend(self, x: ModelInputs, top_k: int, exclude_seen: bool = True) -> tuple[np.ndarray, np.ndarray]:
        """-> top-k dense item ids ``[B, k]`` int64 and cosine scores ``[B, k]`` float32.

        ``x.request_ts``: when each row's recommendation is asked for (a ``request_time`` model
        reads it; default: the row's last item's time). A row that is a prefix of another row
        (same memory, its items and times the first ones of the other's: a user's earlier event
        of a burst) is answered from that row's pass (``shared_prefixes``), except under a
        ``request_time`` model, whose query at an item is asked at the next item's time. The
        remaining rows run in groups of similar length (``width_groups``), each trimmed to its
        own longest row: a batch is padded to its longest row and attention is quadratic in
        it. ``x.catalogue``: a row is answered with no item after its highest known id.

        With a window cache (``serving.window_cache``), a row whose earlier items were computed
        under the same memory reuses their keys/values and computes the rest only; the answers
        are the same."""
        k = min(top_k, self.cfg.num_items)
        ids, scores = np.zeros((len(x), k), np.int64), np.zeros((len(x), k), np.float32)
        if self.cfg.request_time:
            carrier = np.arange(len(x))
        else:
            carrier = shared_prefixes(x.items, x.lengths, x.timestamps, x.memory, x.has_memory)
        carriers = np.unique(carrier)
        if self.window_cache is not None:
            self._recommend_cached(x, carrier, carriers, k, exclude_seen, ids, scores)
            return ids, scores
        for group in width_groups(x.lengths[carriers]):
            rows = carriers[group]
            queries = np.flatnonzero(np.isin(carrier, rows))
            vectors = self._vectors(x.take(rows), np.searchsorted(rows, carrier[queries]), x.lengths[queries] - 1)
            ids[queries], scores[queries] = self._rank(vectors, x, queries, k, exclude_seen)
        return ids, scores

    @torch.inference_mode()
    def _vectors(self, x: ModelInputs, rows, positions) -> torch.Tensor:
        ids = self._tensor(x.items, torch.long)
        lens = self._tensor(x.lengths, torch.long)
        ts = self._tensor(x.timestamps, torch.long)
        request = None if x.request_ts is None or not self.cfg.request_time else self._tensor(x.request_ts, torch.long)
        mem = self._memory(x.memory, x.has_memory) if self.cfg.has_memory else None
        rows, positions = self._tensor(rows, torch.long), self._tensor(positions, torch.long)
        return self.model.recommend(mem, ids, lens, ts, at=(rows, positions), request_ts=request)

    @torch.inference_mode()
    def _rank(self, vectors: torch.Tensor, x: ModelInputs, queries: np.ndarray, k: int,
              exclude_seen: bool) -> tuple[np.ndarray, np.ndarray]:
        """Top-k of user ``vectors`` ``[Q, D]``, the answers to rows ``queries`` of ``x``."""
        scores = self.model.score(vectors, self._table)
        known = None if x.catalogue is None else x.catalogue[queries, 1]
        if known is not None and int(known.min()) < self.num_items:  # items its worker cannot name yet
            cols = torch.arange(scores.shape[1], device=scores.device)
            scores.masked_fill_(cols[None] > self._tensor(known, torch.long)[:, None], float("-inf"))
        if exclude_seen:  # each query's own items (padding maps to column 0, already -inf)
            scores.scatter_(1, self._tensor(x.items[queries], torch.long), float("-inf"))
        top = torch.topk(scores, k, dim=1)
        return top.indices.cpu().numpy().astype(np.int64), top.values.float().cpu().numpy()

    def _recommend_cached(self, x: ModelInputs, carrier, carriers, k, exclude_seen, ids, scores) -> None:
        """``recommend`` through the window cache: each carrier row takes the keys/values of its
        longest prefix cached under its memory (at most up to its shortest query's last item but
        one), hits and misses run in separate groups by the width they compute, and each row's
        keys/values are stored for the next event. A ``request_time`` model's burst (several
        rows of one user: no carriers) runs in two waves: each user's longest row first, then
        the others from its keys/values, one item each."""
        order = np.argsort(carrier, kind="stable")  # each carrier's queries, in one pass
        queries_of = dict(zip(carriers.tolist(), np.split(order, np.cumsum(np.bincount(carrier)[carriers])[:-1])))
        keys = {c: row_key(x.memory[c], bool(x.has_memory[c]), int(x.items[c, 0]), int(x.timestamps[c, 0]))
                for c in carriers.tolist()}
        waves = [carriers]
        if self.cfg.request_time:
            longest: dict[tuple, int] = {}
            for c in carriers.tolist():
                if keys[c] not in longest or x.lengths[c] > x.lengths[longest[keys[c]]]:
                    longest[keys[c]] = c
            first = np.array(sorted(longest.values()), np.int64)
            waves = [first, np.setdiff1d(carriers, first)]
        for wave in waves:
            prefix, entries = {}, {}
            for c in wave.tolist():
                n, shortest = int(x.lengths[c]), int(x.lengths[queries_of[c]].min())
                prefix[c], entries[c] = self.window_cache.lookup(keys[c], x.items[c, :n], x.timestamps[c, :n],
                                                                 at_most=shortest - 1)
            p = np.array([prefix[c] for c in wave.tolist()], np.int64)
            new = x.lengths[wave] - p
            for hit in (p == 0, p > 0):  # misses, then hits, grouped by the width they compute
                for group in width_groups(new[hit]):
                    self._extend(x, wave[hit][group], prefix, entries, keys, queries_of, k, exclude_seen, ids, scores)

    @torch.inference_mode()
    def _extend(self, x: ModelInputs, rows: np.ndarray, prefix, entries, keys, queries_of, k, exclude_seen,
                ids, scores) -> None:
        p = np.array([prefix[c] for c in rows.tolist()], np.int64)
        n = x.lengths[rows]
        P, N = int(p.max()), int((n - p).max())
        # each row's items after its cached ones, and the cached ones' times
        at = np.minimum(p[:, None] + np.arange(N)[None], x.items.shape[1] - 1)
        new = np.arange(N)[None] < (n - p)[:, None]
        new_items = np.take_along_axis(x.items[rows], at, 1) * new
        new_ts = np.take_along_axis(x.timestamps[rows], at, 1) * new
        cache_ts = x.timestamps[rows, :P] * (np.arange(P)[None] < p[:, None])
        t = self._tensor
        cache = None
        if P:  # [G, P, L, 2, H, Dh] -> [G, L, 2, P, H, Dh]
            kept = [entries[c].kv[: p[i]] for i, c in enumerate(rows.tolist())]
            cache = torch.nn.utils.rnn.pad_sequence(kept, batch_first=True).permute(0, 2, 3, 1, 4, 5)
        queries = np.concatenate([queries_of[c] for c in rows.tolist()])
        at_rows = np.concatenate([np.full(len(queries_of[c]), i) for i, c in enumerate(rows.tolist())])
        at_pos = x.lengths[queries] - 1 - p[at_rows]
        request = None if x.request_ts is None or not self.cfg.request_time else t(x.request_ts[rows], torch.long)
        vectors, kv = self.model.extend_cache(
            cache, t(p, torch.long), t(new_items, torch.long), t(n - p, torch.long),
            self._memory(x.memory[rows], x.has_memory[rows]), t(new_ts, torch.long), t(cache_ts, torch.long),
            request, at=(t(at_rows, torch.long), t(at_pos, torch.long)))
        ids[queries], scores[queries] = self._rank(vectors, x, queries, k, exclude_seen)
        kv = kv.permute(0, 3, 1, 2, 4, 5)  # [G, N, L, 2, H, Dh]
        for i, c in enumerate(rows.tolist()):
            keep = int(n[i]) - (1 if self.cfg.request_time else 0)  # request_time: the last item's query moves
            self.window_cache.store(keys[c], x.items[c, : n[i]], x.timestamps[c, : n[i]], entries[c], int(p[i]),
                                    kv[i, : keep - p[i]])

    def fold(self, x: ModelInputs) -> np.ndarray:
        """New memory ``[B, L, 2, M, H, Dh]`` float32 (``has_memory`` False = compress), rows
        grouped by length as in ``recommend``."""
        out = np.zeros((len(x), *self.cfg.memory_shape), np.float32)
        for rows in width_groups(x.lengths):
            out[rows] = self._fold(x.take(rows))
        return out

    @torch.inference_mode()
    def _fold(self, x: ModelInputs) -> np.ndarray:
        mem = self._tensor(x.memory, torch.float32)
        has = self._tensor(x.has_memory, torch.bool)
        out = self.model.fold(mem, has, self._tensor(x.items, torch.long), self._tensor(x.lengths, torch.long),
                              self._tensor(x.timestamps, torch.long))
        return out.float().cpu().numpy()


def shared_prefixes(items: np.ndarray, lengths: np.ndarray, timestamps: np.ndarray | None = None,
                    memory: np.ndarray | None = None, has_memory: np.ndarray | None = None) -> np.ndarray:
    """``carrier[b]``: a row whose first ``lengths[b]`` items and timestamps are row b's, under
    the same memory (or none), longest first; ``b`` itself when no other row holds it. Pure
    numpy; ``items`` ``[B, W]`` right-padded, ``lengths`` ``[B]``.

    Rows are grouped by first item, first time and memory (equal bytes; rows without one all get
    the new-user memory); every row is compared with the longest of its group at once, and only
    a row that is not its prefix is compared, one by one, with the group's other carriers."""
    lengths = lengths.reshape(-1)
    B = len(lengths)
    carrier = np.arange(B)
    if B == 0 or items.shape[1] == 0:
        return carrier
    ts = np.zeros_like(items) if timestamps is None else timestamps
    memory_id = np.full(B, -1)
    if memory is not None:
        has = np.ones(B, bool) if has_memory is None else has_memory.reshape(-1).astype(bool)
        if has.any():
            rows = np.ascontiguousarray(memory[has]).reshape(int(has.sum()), -1)
            as_bytes = rows.view(np.dtype((np.void, rows.dtype.itemsize * rows.shape[1]))).ravel()
            memory_id[has] = np.unique(as_bytes, return_inverse=True)[1].reshape(-1)
    order = np.argsort(-lengths, kind="stable")
    keys = list(zip(items[:, 0].tolist(), ts[:, 0].tolist(), memory_id.tolist()))
    longest: dict[tuple, int] = {}
    for b in order.tolist():
        longest.setdefault(keys[b], b)
    head = np.array([longest[k] for k in keys])
    inside = np.arange(items.shape[1])[None] < lengths[:, None]
    prefix_of_head = ((items == items[head]) & (ts == ts[head]) | ~inside).all(axis=1)
    candidates: dict[tuple, list[int]] = {}
    for b in order.tolist():
        n = int(lengths[b])
        if n < 1:
            continue
        found = candidates.setdefault(keys[b], [])
        if found and prefix_of_head[b]:  # found[0] is the group's head
            carrier[b] = found[0]
            continue
        for c in found:
            if np.array_equal(items[c, :n], items[b, :n]) and np.array_equal(ts[c, :n], ts[b, :n]):
                carrier[b] = c
                break
        else:
            found.append(b)
    return carrier


def width_groups(lengths: np.ndarray, smallest: int = 16) -> list[np.ndarray]:
    """Indices of ``lengths`` ``[B]`` grouped by the power of two (at least ``smallest``) that
    holds each length: rows of one group differ in length by at most 2x, so trimming a group to
    its longest row wastes less than half of its attention on padding."""
    buckets = np.maximum(smallest, 2 ** np.ceil(np.log2(np.maximum(lengths, 1)))).astype(np.int64)
    return [np.flatnonzero(buckets == b) for b in np.unique(buckets)]


def triton_params(args: dict) -> dict[str, str]:
    """A python-backend model's config parameters (``initialize(args)``), name -> value."""
    import json

    config = json.loads(args["model_config"])
    return {k: v["string_value"] for k, v in config.get("parameters", {}).items()}


def runner_from_triton_args(args: dict) -> tuple[ModelRunner, dict[str, str]]:
    """The runner a python-backend model's ``initialize(args)`` needs, and its config parameters.

    The checkpoint sits in the version directory; the model version in the config must match it.
    """
    import json

    params = triton_params(args)
    device = "cpu"
    if args["model_instance_kind"] == "GPU":
        device = f"cuda:{args['model_instance_device_id']}"
    model_dir = Path(args["model_repository"])
    path = model_dir / args["model_version"] / "checkpoint.pt"
    runner = ModelRunner(path, device, cpu_threads=int(params.get("cpu_threads", "1")),
                         window_cache_mb=float(params.get("window_cache_mb", "0")))
    # the version's manifest names its model (repositories written before it: the config)
    manifest = model_dir / args["model_version"] / "manifest.json"
    expected = json.loads(manifest.read_text())["model_version"] if manifest.is_file() else params.get("model_version")
    if runner.model_version != expected:
        raise RuntimeError(f"checkpoint {runner.model_version} != {expected}, the model of version {args['model_version']}")
    # The model and torch stay for the life of the stub process: keep them out of the collector's
    # full passes (170-325 ms each over a process like this; see stream.worker).
    gc.collect()
    gc.freeze()
    return runner, params


def catalogue_from_triton_args(runner: ModelRunner, params: dict[str, str]):
    """The ``CatalogueFollower`` of a model exported with a CATALOGUE input (None without): it
    reads the database named by ``PERSREC_DATABASE_URL`` in Triton's environment."""
    if params.get("catalogue", "false") != "true":
        return None
    from persrec.serving.catalogue import CatalogueFollower
    from persrec.settings import Settings

    return CatalogueFollower(runner, Settings().database_url)


def encoder_from_triton_args(args: dict):
    """The text encoder an ``encode_items`` model's ``initialize(args)`` needs."""
    from persrec.models.text import encoder_named

    params = triton_params(args)
    device = f"cuda:{args['model_instance_device_id']}" if args["model_instance_kind"] == "GPU" else "cpu"
    return encoder_named(params["text_encoder"], device)
