"""The window cache (serving/window_cache.py) changes how much the recommend model computes,
never what it answers: a runner with it gives every request of a simulated stream (windows that
grow, folds that change the memory, bursts, retries, old rows sent again) the answer of a
runner without it."""

import dataclasses

import numpy as np
import pytest
import torch

from persrec.models.checkpoint import make_checkpoint
from persrec.models.config import ModelConfig
from persrec.models.inputs import ModelInputs
from persrec.models.loss import build_model
from persrec.serving.inference import ModelRunner
from persrec.serving.triton_batch import concat_rows
from persrec.serving.window_cache import Entry, WindowCache, row_key, usable_prefix

from ..models.test_persrec_exactness import irregular_times

R, S = 5, 4  # recent window, fold segment


def checkpoint(mode: str, seed: int = 0):
    torch.manual_seed(seed)
    timed = {"none": {}, "time": dict(time_bias=True, num_time_buckets=129, bias_init_std=0.5),
             "request": dict(time_bias=True, request_time=True, num_time_buckets=129, bias_init_std=0.5),
             "carry": dict(memory_carry=True)}[mode]
    cfg = ModelConfig(num_items=60, dim=16, num_layers=2, num_heads=2, head_dim=8, max_len=30, num_memory_tokens=3,
                      recent_len=R, segment_len=S, policy="incremental", dropout=0.0, **timed)
    model = build_model(cfg)
    with torch.no_grad():
        model.backbone.bias.pos_w.normal_()
        if model.carry is not None:
            model.carry.weight.normal_()
    return make_checkpoint(model, "{}")


def stream_rows(runner: ModelRunner, rng, users: int, events: int) -> list[ModelInputs]:
    """The rows a worker sends, event by event: each user's memory and the window after it
    (folding a segment of S once R + S items wait), the event's time as the request time."""
    cfg = runner.cfg
    items = {u: list(rng.integers(1, 61, size=events)) for u in range(users)}
    times = {u: list(irregular_times(rng, events)) for u in range(users)}
    memory = {u: np.zeros(cfg.memory_shape, np.float32) for u in range(users)}
    has = dict.fromkeys(range(users), False)
    start, seen = dict.fromkeys(range(users), 0), dict.fromkeys(range(users), 0)
    rows = []
    for u in rng.permutation(np.repeat(np.arange(users), events)).tolist():
        seen[u] += 1
        window, ts = items[u][start[u]: seen[u]], times[u][start[u]: seen[u]]
        rows.append(ModelInputs.of_rows([window], [ts], memory=memory[u][None], has_memory=np.array([has[u]]),
                                        request_ts=np.array([ts[-1]])))
        if len(window) >= R + S:
            x = ModelInputs.of_rows([window[:S]], [ts[:S]], memory=memory[u][None], has_memory=np.array([has[u]]))
            memory[u], has[u] = runner.fold(x)[0], True
            start[u] += S
    return rows


def batch(rows: list[ModelInputs]) -> ModelInputs:
    """The rows as one batch, as Triton's dynamic batcher joins requests (``concat_rows``)."""
    fields = [{k: v for k, v in dataclasses.asdict(r).items() if v is not None} for r in rows]
    return ModelInputs(**concat_rows(fields, pad=("items", "timestamps"))[0])


@pytest.mark.parametrize("mode", ["none", "time", "request", "carry"])
def test_cached_answers_equal_uncached_through_folds_bursts_and_retries(mode: str) -> None:
    ck = checkpoint(mode)
    plain, cached = ModelRunner(ck, "cpu"), ModelRunner(ck, "cpu", window_cache_mb=4)
    rng = np.random.default_rng(1)
    rows = stream_rows(plain, rng, users=6, events=40)  # 40 events: 8 folds a user
    sent = 0
    while sent < len(rows):
        size = int(rng.integers(1, 7))  # consecutive events: often one user's burst
        group = rows[sent: sent + size]
        sent += size
        if rng.random() < 0.15:  # a retry of an earlier event, and an old row after newer ones
            group = group + [rows[int(rng.integers(0, sent))]]
        x = batch(group)
        want, got = plain.recommend(x, 10), cached.recommend(x, 10)
        assert np.array_equal(want[0], got[0])
        assert np.abs(want[1] - got[1]).max() <= 1e-5
    assert cached.window_cache.hits > cached.window_cache.misses


@pytest.mark.parametrize("mode", ["none", "request"])
def test_one_event_at_a_time_misses_only_after_a_user_first_event_and_each_fold(mode: str) -> None:
    ck = checkpoint(mode)
    runner = ModelRunner(ck, "cpu", window_cache_mb=4)
    rows = stream_rows(runner, np.random.default_rng(1), users=6, events=40)
    for r in rows:
        runner.recommend(r, 10)
    cache = runner.window_cache
    folds = 6 * ((40 - R - S) // S + 1)  # 8 a user
    # a request_time model keeps all but a row's last item: a user's second event misses too
    firsts = 6 if mode == "none" else 12
    assert (cache.misses, cache.hits) == (firsts + folds, len(rows) - firsts - folds)
    # a hit computes its new item only (two under request_time): the rest of its window is reused
    computed = sum(int(r.lengths[0]) for r in rows) - cache.reused
    assert computed == cache.hits * (1 if mode == "none" else 2) + missed_items(rows, mode)


def test_a_request_time_burst_computes_its_longest_row_then_one_item_for_each_other() -> None:
    ck = checkpoint("request")
    plain, cached = ModelRunner(ck, "cpu"), ModelRunner(ck, "cpu", window_cache_mb=4)
    rows = stream_rows(plain, np.random.default_rng(3), users=1, events=R + S - 1)  # no fold yet
    for r in rows[:3]:
        cached.recommend(r, 10)
    cache = cached.window_cache
    before = (cache.hits, cache.misses, cache.reused)
    burst = batch(rows[3:])  # events 4..R+S-1 at once: rows of 4..R+S-1 items
    want, got = plain.recommend(burst, 10), cached.recommend(burst, 10)
    assert np.array_equal(want[0], got[0]) and np.abs(want[1] - got[1]).max() <= 1e-5
    longest, others = R + S - 1, [n for n in range(4, R + S - 1)]
    # the longest row reuses the 2 keys/values kept after event 3; each other row all but its last
    assert (cache.hits - before[0], cache.misses - before[1]) == (1 + len(others), 0)
    assert cache.reused - before[2] == 2 + sum(n - 1 for n in others)
    assert longest - 2 + len(others) < sum(n - 2 for n in range(4, longest + 1))  # vs each row alone


def missed_items(rows: list[ModelInputs], mode: str) -> int:
    """Items computed by the misses: a user's first event(s) and the whole window after a fold."""
    total, last = 0, {}
    for r in rows:
        n = int(r.lengths[0])
        key = (r.memory.tobytes(), bool(r.has_memory[0]), int(r.items[0, 0]))
        if key not in last or (mode == "request" and last[key] == 1):
            total += n
        last[key] = n
    return total


def test_a_fold_is_a_miss_and_the_row_after_it_a_hit() -> None:
    ck = checkpoint("none")
    runner = ModelRunner(ck, "cpu", window_cache_mb=1)
    rows = stream_rows(runner, np.random.default_rng(2), users=1, events=R + S + 2)
    for r in rows:
        runner.recommend(r, 5)
    cache = runner.window_cache
    # events 1..R+S on the first memory (first a miss), then R+1 items on the folded one
    # (first a miss again), then a hit
    assert (cache.misses, cache.hits) == (2, R + S + 2 - 2)
    assert len(cache) == 2  # the entry under the old memory stays until it is evicted


def test_entries_are_evicted_oldest_first_within_the_budget() -> None:
    fresh = torch.zeros(10, 2, 2, 1, 8)  # 10 items' keys/values, position first
    cache = WindowCache(max_bytes=10**9, request_time=False)
    cache.store(row_key(None, False, 0, 0), np.arange(10), np.arange(10), None, 0, fresh)
    one = cache.nbytes  # an entry: its buffer (with room for more), its row and its key
    cache = WindowCache(max_bytes=3 * one, request_time=False)
    keys = [row_key(None, False, u, 0) for u in range(5)]
    for u in range(4):
        cache.store(keys[u], np.arange(10), np.arange(10), None, 0, fresh)
    assert len(cache) == 3 and cache.evictions == 1 and cache.nbytes == 3 * one
    assert cache.lookup(keys[0], np.arange(11), np.arange(11), at_most=10) == (0, None)
    p, entry = cache.lookup(keys[1], np.arange(11), np.arange(11), at_most=10)
    assert p == 10 and entry is not None
    cache.store(keys[4], np.arange(10), np.arange(10), None, 0, fresh)  # evicts 2: 1 was used last
    assert cache.lookup(keys[2], np.arange(11), np.arange(11), at_most=10)[0] == 0
    assert cache.lookup(keys[1], np.arange(11), np.arange(11), at_most=10)[0] == 10


def test_an_extension_is_appended_in_place_and_a_divergence_copied() -> None:
    cache = WindowCache(max_bytes=10**9, request_time=False)
    key = row_key(None, False, 0, 0)
    kv = lambda n, v: torch.full((n, 1, 2, 1, 2), float(v))  # noqa: E731
    cache.store(key, np.arange(4), np.arange(4), None, 0, kv(4, 1))
    p, entry = cache.lookup(key, np.arange(5), np.arange(5), at_most=4)
    buffer = entry.kv
    cache.store(key, np.arange(5), np.arange(5), entry, p, kv(1, 2))  # the next event: in place
    p, entry = cache.lookup(key, np.arange(6), np.arange(6), at_most=5)
    assert p == 5 and entry.kv is buffer and entry.kv[:5, 0, 0, 0, 0].tolist() == [1, 1, 1, 1, 2]
    # an old row sent again (its first 3 items): a new buffer, the old one untouched
    old = np.array([0, 1, 2, 9])
    p, entry = cache.lookup(key, old, np.arange(4), at_most=3)
    assert p == 3
    cache.store(key, old, np.arange(4), entry, p, kv(1, 7))
    p, again = cache.lookup(key, old, np.arange(4), at_most=4)
    assert p == 4 and again.kv is not buffer and again.kv[:4, 0, 0, 0, 0].tolist() == [1, 1, 1, 7]
    assert buffer[:5, 0, 0, 0, 0].tolist() == [1, 1, 1, 1, 2]


def test_usable_prefix_stops_at_the_first_difference_and_one_earlier_under_request_time() -> None:
    entry = Entry(np.array([5, 6, 7, 8]), np.array([10, 20, 30, 40]), torch.zeros(8, 1, 2, 1, 2), 4)
    same = np.array([5, 6, 7, 8, 9]), np.array([10, 20, 30, 40, 50])
    assert usable_prefix(entry, *same, request_time=False) == 4
    assert usable_prefix(entry, np.array([5, 6, 1, 8, 9]), same[1], request_time=False) == 2
    assert usable_prefix(entry, same[0], np.array([10, 20, 30, 41, 50]), request_time=False) == 3
    assert usable_prefix(entry, np.array([5, 6]), np.array([10, 20]), request_time=False) == 2
    request = Entry(entry.items, entry.ts, entry.kv, 3)  # all but the last item
    assert usable_prefix(request, *same, request_time=True) == 3
    assert usable_prefix(request, same[0], np.array([10, 20, 30, 41, 50]), request_time=True) == 2


def test_the_key_is_the_memory_and_the_first_event() -> None:
    mem = np.ones((2, 2, 3, 1, 4), np.float32)
    assert row_key(mem, True, 1, 10) == row_key(mem.copy(), True, 1, 10)
    assert row_key(mem, True, 1, 10) != row_key(mem * 2, True, 1, 10)
    assert row_key(mem, True, 1, 10) != row_key(mem, True, 2, 10) != row_key(mem, True, 1, 11)
    assert row_key(mem, False, 1, 10) == row_key(mem * 2, False, 1, 10)  # a new user's memory is the model's
