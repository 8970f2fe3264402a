"""Window bookkeeping: folds and trims by seq number never lose or repeat an event."""

import json

from persrec.stream import window as win


def fill(n: int) -> win.Window:
    w = win.Window()
    for i in range(1, n + 1):
        w = win.append(w, f"e{i}", f"i{i}", 1000 + i)
    return w


def test_append_counts_and_remembers_event_ids() -> None:
    w = fill(5)
    assert w.seq == 5 and w.items == ["i1", "i2", "i3", "i4", "i5"] and w.base == 0
    assert win.seen(w, "e3") and not win.seen(w, "e6")
    assert len(fill(win.RECENT_IDS + 10).recent) == win.RECENT_IDS


def test_fold_segment_takes_whole_segments_leaves_recent_items_and_respects_in_flight_limit() -> None:
    w = fill(47)
    seg, ts, wm = win.fold_segment(w, 0, recent_len=20, segment_len=10)  # 27 beyond recent: 2 segments
    assert seg == [f"i{i}" for i in range(1, 21)] and ts[0] == 1001 and wm == 20
    seg, _, wm = win.fold_segment(w, 0, recent_len=20, segment_len=10, max_segments=1)
    assert seg == [f"i{i}" for i in range(1, 11)] and wm == 10
    seg, _, wm = win.fold_segment(w, 0, recent_len=20, segment_len=10, max_watermark=14)
    assert len(seg) == 10 and wm == 10  # a whole segment below the limit, never part of one
    assert win.fold_segment(w, 0, recent_len=20, segment_len=10, max_watermark=9)[0] == []
    assert win.fold_segment(fill(29), 0, recent_len=20, segment_len=10)[0] == []  # not a whole one yet


def test_trim_after_fold_and_crash_between_memory_write_and_trim() -> None:
    w = fill(30)
    _, _, wm = win.fold_segment(w, 0, recent_len=20, segment_len=10)
    # The memory (watermark 10) is written; the worker dies before trimming the window.
    # On restart the untrimmed window + watermark still give each event exactly once.
    items, _ = win.effective(w, wm)
    assert items == [f"i{i}" for i in range(11, 31)]
    trimmed = win.trim(w, wm)
    assert trimmed.base == 10 and trimmed.items == items
    assert win.trim(trimmed, wm) == trimmed  # idempotent
    assert win.effective(win.append(trimmed, "e31", "i31", 2000), wm)[0][-1] == "i31"


def test_encoding_round_trip_and_windows_of_earlier_releases() -> None:
    w = win.append(fill(70), "e71", "i71", 900, ("interactions", 3, 12))  # a time that goes back
    assert win.decode(win.encode(w)) == w
    assert win.decode(win.encode(win.Window())) == win.Window() == win.decode(None)
    legacy = b'{"seq": 3, "items": ["a", "b"], "ts": [5, 7], "recent_ids": ["e2", "e3"], "source": null}'
    old = win.decode(legacy)  # the JSON the table held before the compact encoding
    assert (old.seq, old.items, old.ts, old.source) == (3, ["a", "b"], [5, 7], None)
    assert win.seen(old, "e3") and not win.seen(old, "e1")
    as_json = json.dumps({"seq": w.seq, "items": w.items, "ts": w.ts, "source": w.source,
                          "recent_ids": [f"e{k}" for k in range(8, 72)]})
    assert len(win.encode(w)) < 0.7 * len(as_json)


def test_fold_after_the_memory_was_lost_continues_the_window_numbering() -> None:
    w = win.trim(fill(40), 10)  # events 1..10 were in a memory that is gone (model change)
    seg, _, wm = win.fold_segment(w, 0, recent_len=20, segment_len=10)
    assert seg == [f"i{i}" for i in range(11, 21)] and wm == 20


def _runtime(has_memory: bool, window_len: int = 5, recent_len: int = 3, history_len: int = 2,
             items=("a",)):
    from persrec.models.data import IdMap
    from persrec.stream.manifest import Manifest
    from persrec.stream.memories import CachedMemory
    from persrec.stream.runtime import Runtime, StreamConfig

    manifest = Manifest("v", 1, window_len=window_len, recent_len=recent_len, top_k=10,
                        memory_shape=(1, 2, 2, 1, 4), has_memory=has_memory, policy="recompress",
                        history_len=history_len)
    rt = Runtime(None, None, IdMap(list(items)), manifest, StreamConfig(), read_window=None)
    rt.remember = rt.memories.remember
    return rt, CachedMemory


def test_window_of_a_model_without_memory_keeps_only_its_longest_input():
    rt, _ = _runtime(has_memory=False)
    w = win.Window()
    for k in range(12):
        w = rt.trimmed("u", win.append(w, f"e{k}", f"i{k}", k))
    assert w.seq == 12 and w.items == [f"i{k}" for k in range(7, 12)]


def test_window_of_a_memory_model_drops_what_the_cached_memory_folded():
    rt, CachedMemory = _runtime(has_memory=True)
    w = win.Window()
    for k in range(12):
        w = rt.trimmed("u", win.append(w, f"e{k}", f"i{k}", k))
    assert len(w.items) == 12  # no memory yet: nothing folded, nothing dropped
    rt.remember("u", CachedMemory(None, events_folded=8, watermark=8))
    assert rt.trimmed("u", w).items == ["i8", "i9", "i10", "i11"]


def test_redelivered_messages_are_seen_however_far_back() -> None:
    # After a crash the restored window can be ahead of the committed offsets by more than
    # RECENT_IDS of one user's events: input offsets, not ids, recognise those redeliveries.
    w = win.Window()
    for k in range(200):
        w = win.append(w, f"e{k}", f"i{k}", k, ("interactions", 2, 1000 + k))
    assert w.source == ["interactions", 2, 1199] and not win.seen(w, "e0")
    assert win.seen(w, "e0", ("interactions", 2, 1000)) and win.seen(w, "e199", ("interactions", 2, 1199))
    assert not win.seen(w, "e200", ("interactions", 2, 1200))
    assert not win.seen(w, "x", ("interactions", 3, 5)) and not win.seen(w, "x", ("other", 2, 5))
    assert win.trim(w, 150).source == w.source
    assert win.decode(win.encode(w)) == w


def test_queued_request_reads_a_memory_without_its_future_events() -> None:
    from persrec.stream.runtime import RecRequest

    rt, CachedMemory = _runtime(has_memory=True)
    w = fill(12)
    queued_before_load = RecRequest("u", w, "e12", 0.0, {}, 0.0)
    rt.request_queued(queued_before_load)  # no memory loaded yet: pins folds below seq 12
    assert queued_before_load.memory is None and rt.memories.oldest_in_flight("u") == 12
    rt.remember("u", CachedMemory(None, events_folded=8, watermark=8))
    assert rt.memories.for_request(queued_before_load, rt.memories.get("u")).watermark == 8
    rt.request_done(queued_before_load)
    assert rt.memories.oldest_in_flight("u") is None

    r = RecRequest("u", rt.trimmed("u", w), "e12", 0.0, {}, 0.0)
    rt.request_queued(r)  # holds the memory its window was trimmed against: pins nothing
    assert r.memory.watermark == 8 and rt.memories.oldest_in_flight("u") is None
    # Later events arrive and a fold passes the queued request's snapshot (seq 12).
    rt.remember("u", CachedMemory(None, events_folded=20, watermark=20))
    used = rt.memories.for_request(r, rt.memories.get("u"))
    assert used.watermark == 8 and win.effective(r.window, used.watermark)[0] == ["i9", "i10", "i11", "i12"]
    later = RecRequest("u", rt.trimmed("u", fill(24)), "e24", 0.0, {}, 0.0)
    rt.request_queued(later)
    assert rt.memories.for_request(later, rt.memories.get("u")).watermark == 20
    rt.request_done(r)
    rt.request_done(later)
    assert rt.memories.in_flight == {}


def test_request_behind_a_memory_restored_ahead_of_its_window() -> None:
    """After a crash the database can hold a memory that folded events the restored window has
    not re-applied yet: requests for those redelivered events read that memory (and no items)."""
    from persrec.stream.runtime import RecRequest

    rt, CachedMemory = _runtime(has_memory=True)
    r = RecRequest("u", fill(12), "e12", 0.0, {}, 0.0)
    rt.request_queued(r)  # memory not loaded yet
    rt.remember("u", CachedMemory(None, events_folded=20, watermark=20))  # loaded: ahead of seq 12
    used = rt.memories.for_request(r, rt.memories.get("u"))
    assert used.watermark == 20 and win.effective(r.window, used.watermark)[0] == []


def test_reads_past_the_cap_start_on_a_quarter_of_it() -> None:
    cap = 200
    for n in range(1, 700):
        start = win.read_start(n, cap)
        if n <= cap:
            assert start == 0
        else:
            assert start % 50 == 0 and cap - 50 < n - start <= cap, n
    # a burst of 200 events past the cap reads from 4 starts, not 200
    assert len({win.read_start(n, cap) for n in range(cap + 1, cap + 201)}) == 4


def test_an_overflowing_burst_of_one_user_needs_one_model_row_per_start() -> None:
    """Events of one user queued behind a lagging fold (40 items after the watermark for the
    last, against a cap of 8): their model inputs are prefixes of one another in groups, so the
    model runs one row per group, and each event still reads its own latest items."""
    import numpy as np

    from persrec.serving.inference import shared_prefixes

    rt, _ = _runtime(has_memory=True, window_len=6, recent_len=4, history_len=4,
                     items=[f"i{k}" for k in range(1, 41)])
    inputs = [[a.tolist() for a in rt.reader.read(fill(n), 0)] for n in range(9, 41)]
    for n, (ids, _) in zip(range(9, 41), inputs):
        assert ids[-1] == n and 6 < len(ids) <= 8  # item "ik" has dense id k
    width = max(len(i) for i, _ in inputs)
    items, ts = np.zeros((len(inputs), width), np.int64), np.zeros((len(inputs), width), np.int64)
    for row, (i, t) in enumerate(inputs):
        items[row, :len(i)], ts[row, :len(t)] = i, t
    lengths = np.array([len(i) for i, _ in inputs])
    assert len(np.unique(shared_prefixes(items, lengths, ts))) == 16  # 32 events, 2 per start


def test_batch_inputs_equal_each_requests_own_model_inputs() -> None:
    """``ItemReader.read_batch`` maps a user's latest snapshot once and slices it for the user's
    other requests. Whatever the batch holds (unknown items, snapshots trimmed to other
    watermarks, two memories of one user, a window replaced after an erasure, a memory ahead
    of its window, overflowing windows), each request gets exactly its own ``read``."""
    import random

    from persrec.stream.runtime import RecRequest

    rng = random.Random(7)
    catalogue = [f"{k}" for k in range(1, 30)]  # single characters among them: shared str objects
    for trial in range(300):
        rt, CachedMemory = _runtime(has_memory=True, window_len=6, recent_len=4, history_len=4,
                                    items=catalogue)
        reqs, used = [], []
        for u in range(rng.randint(1, 3)):
            user = f"u{u}"
            memories = [CachedMemory(None, watermark=rng.randint(0, 30)) for _ in range(rng.randint(1, 2))]
            lineages = rng.randint(1, 2)  # 2: the window was erased and rebuilt meanwhile
            for _ in range(lineages):
                w = win.Window()
                for k in range(rng.randint(1, 40)):
                    item = rng.choice(catalogue + ["unknown", "x"])
                    w = win.append(w, f"{user}-{k}", item, rng.choice([5, 6, 1000 + k]))
                    if rng.random() < 0.3:
                        snapshot = win.trim(w, rng.randint(0, w.seq)) if rng.random() < 0.3 else w
                        reqs.append(RecRequest(user, snapshot, f"{user}-{k}", 0.0, {}, 0.0))
                        used.append(rng.choice(memories))
        got = rt.reader.read_batch([r.window for r in reqs], [r.user_id for r in reqs],
                                   [m.watermark for m in used], used)
        for r, m, (ids, ts) in zip(reqs, used, got):
            want_ids, want_ts = rt.reader.read(r.window, m.watermark)
            assert (ids.tolist(), ts.tolist()) == (want_ids.tolist(), want_ts.tolist()), trial
