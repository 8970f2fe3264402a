"""The serving path (memory + recent) must give exactly the training pass's answer."""

import numpy as np
import pytest
import torch

from persrec.models.config import ModelConfig
from persrec.models.layout import collate, segment_lengths
from persrec.models.persrec import PerSRec

TOL = 1e-5
# The time bias: none; each query at its own item's time; each query at the time of the event it
# predicts (the official HSTU setup: the last one at the request's time).
MODES = {"none": dict(time_bias=False), "own": dict(time_bias=True),
         "request": dict(time_bias=True, request_time=True, num_time_buckets=129)}


def pad(rows: list[np.ndarray], min_width: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    width = max([min_width] + [len(r) for r in rows])
    out = np.zeros((len(rows), width), np.int64)
    for i, r in enumerate(rows):
        out[i, : len(r)] = r
    return torch.from_numpy(out), torch.tensor([len(r) for r in rows])


def make(policy: str, mode: str | bool, seed: int, **kw) -> PerSRec:
    torch.manual_seed(seed)
    time = MODES[{False: "none", True: "own"}.get(mode, mode)]
    cfg = ModelConfig(
        num_items=200, dim=24, num_layers=3, num_heads=2, head_dim=8, max_len=64,
        num_memory_tokens=kw.pop("m", 4), recent_len=kw.pop("recent", 6), segment_len=5,
        policy=policy, dropout=0.0, **time, **kw,
    )
    model = PerSRec(cfg).eval()
    # Random non-zero biases so the test exercises them (they start at zero).
    with torch.no_grad():
        model.backbone.bias.pos_w.normal_()
        if model.backbone.bias.time_w is not None:
            model.backbone.bias.time_w.normal_()
    return model


def irregular_times(rng: np.random.Generator, n: int) -> np.ndarray:
    """Times like real logs: ties, seconds apart within a session, hours or days between."""
    gaps = rng.choice([0, 1, 30, 600, 7200, 86400 * 3], size=n, p=[.15, .25, .25, .15, .1, .1])
    return 10**9 + np.cumsum(gaps * rng.uniform(0.5, 1.5, size=n)).astype(np.int64)


def random_users(rng: np.random.Generator, lengths: list[int]):
    seqs = [rng.integers(1, 201, size=n) for n in lengths]
    ts = [irregular_times(rng, n) for n in lengths]
    return seqs, ts


def full_pass_vectors(model: PerSRec, seqs, ts, request=None) -> torch.Tensor:
    """The training pass; with ``request`` (one time per user), each query is asked at the next
    item's time, the last one at the request's."""
    qts = None if request is None else [np.append(t[1:], r) for t, r in zip(ts, request)]
    batch = collate(seqs, model.cfg, timestamps=ts, query_timestamps=qts)
    h = model(batch)
    return h[torch.arange(len(seqs)), batch.last]


def requests_after(rng: np.random.Generator, ts) -> np.ndarray:
    return np.array([t[-1] + int(rng.integers(0, 5000)) for t in ts])




@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("seed", range(3))
@torch.no_grad()
def test_recommend_of_compress_equals_full_pass(mode: str, seed: int) -> None:
    rng = np.random.default_rng(seed)
    model = make("recompress", mode, seed)
    lengths = list(rng.integers(1, 60, size=7)) + [1, 6, 7]  # includes empty histories
    seqs, ts = random_users(rng, lengths)
    request = requests_after(rng, ts) if mode == "request" else None
    reference = full_pass_vectors(model, seqs, ts, request)

    R = model.cfg.recent_len
    hist, recent = [s[:-R] for s in seqs], [s[-R:] for s in seqs]
    hist_ts, recent_ts = [t[:-R] for t in ts], [t[-R:] for t in ts]
    H, h_len = pad(hist, min_width=3)  # extra padding columns must not matter
    memory = model.compress(H, h_len, pad(hist_ts, 3)[0])
    assert memory.shape == (len(seqs), *model.cfg.memory_shape)
    R_ids, r_len = pad(recent, min_width=9)
    served = model.recommend(memory, R_ids, r_len, pad(recent_ts, 9)[0],
                             request_ts=None if request is None else torch.from_numpy(request))

    assert (served - reference).abs().max().item() <= TOL
    scores_ref, scores = model.score(reference), model.score(served)
    assert (scores[:, 1:] - scores_ref[:, 1:]).abs().max().item() <= TOL


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("seed", range(3))
@torch.no_grad()
def test_successive_folds_equal_multi_block_pass(mode: str, seed: int) -> None:
    rng = np.random.default_rng(100 + seed)
    model = make("incremental", mode, seed)
    lengths = list(rng.integers(1, 50, size=6)) + [1, 6, 11, 12]
    seqs, ts = random_users(rng, lengths)
    request = requests_after(rng, ts) if mode == "request" else None
    reference = full_pass_vectors(model, seqs, ts, request)

    # Fold each user's segments in a batch where users sit at different fold counts.
    seg_lens = [segment_lengths(len(s), model.cfg) for s in seqs]
    starts = [0] * len(seqs)
    memory = model.empty_memory(len(seqs))
    has_memory = torch.zeros(len(seqs), dtype=torch.bool)
    for step in range(max(len(s) for s in seg_lens) - 1):
        active = [i for i, s in enumerate(seg_lens) if step < len(s) - 1]
        ends = [starts[i] + seg_lens[i][step] for i in active]
        segs = [seqs[i][starts[i] : e] for i, e in zip(active, ends)]
        seg_ts = [ts[i][starts[i] : e] for i, e in zip(active, ends)]
        S, s_len = pad(segs)
        idx = torch.tensor(active)
        new = model.fold(memory[idx], has_memory[idx], S, s_len, pad(seg_ts)[0])
        memory[idx] = new
        has_memory[idx] = True
        for i in active:
            starts[i] += seg_lens[i][step]
    recent = [s[st:] for s, st in zip(seqs, starts)]
    recent_ts = [t[st:] for t, st in zip(ts, starts)]
    R_ids, r_len = pad(recent)
    served = model.recommend(memory, R_ids, r_len, pad(recent_ts)[0],
                             request_ts=None if request is None else torch.from_numpy(request))
    assert (served - reference).abs().max().item() <= TOL


@torch.no_grad()
def test_request_time_changes_the_answer_and_defaults_to_the_last_event() -> None:
    """A request-time model's last query is asked at the request's time: a later request gives
    another vector, and without one it is asked at the last event's own time."""
    model = make("recompress", "request", 3)
    rng = np.random.default_rng(3)
    seqs, ts = random_users(rng, [12])
    R = model.cfg.recent_len
    memory = model.compress(*pad([seqs[0][:-R]]), pad([ts[0][:-R]])[0])
    r, rl = pad([seqs[0][-R:]])
    rt = pad([ts[0][-R:]])[0]
    at_event = model.recommend(memory, r, rl, rt)
    assert torch.equal(at_event, model.recommend(memory, r, rl, rt, request_ts=torch.tensor([int(ts[0][-1])])))
    week_later = model.recommend(memory, r, rl, rt, request_ts=torch.tensor([int(ts[0][-1]) + 7 * 86400]))
    assert (week_later - at_event).abs().max().item() > 1e-4
    with pytest.raises(ValueError, match="last item"):
        model.recommend(memory, r, rl, rt, at=(torch.tensor([0]), torch.tensor([2])))


@torch.no_grad()
def test_new_user_memory_is_compress_of_nothing_and_serves() -> None:
    model = make("recompress", False, 0)
    empty = model.empty_memory(3)
    assert torch.equal(empty[0], empty[2])
    rng = np.random.default_rng(0)
    seqs, ts = random_users(rng, [1, 4, 6])  # <= recent_len: no history at all
    R_ids, r_len = pad(seqs)
    served = model.recommend(empty, R_ids, r_len)
    reference = full_pass_vectors(model, seqs, None)
    assert (served - reference).abs().max().item() <= TOL


@torch.no_grad()
def test_batch_equals_each_user_alone() -> None:
    model = make("recompress", True, 1)
    rng = np.random.default_rng(5)
    seqs, ts = random_users(rng, [3, 40, 17, 1, 25])
    R = model.cfg.recent_len
    H, hl = pad([s[:-R] for s in seqs])
    Ht, _ = pad([t[:-R] for t in ts])
    Rr, rl = pad([s[-R:] for s in seqs])
    Rt, _ = pad([t[-R:] for t in ts])
    together = model.recommend(model.compress(H, hl, Ht), Rr, rl, Rt)
    for i, (s, t) in enumerate(zip(seqs, ts)):
        h, hlen = pad([s[:-R]])
        ht, _ = pad([t[:-R]])
        r, rlen = pad([s[-R:]])
        rt, _ = pad([t[-R:]])
        alone = model.recommend(model.compress(h, hlen, ht), r, rlen, rt)
        assert (alone[0] - together[i]).abs().max().item() <= TOL
        full_alone = full_pass_vectors(model, [s], [t])
        assert (full_alone[0] - together[i]).abs().max().item() <= TOL


@torch.no_grad()
def test_history_reaches_recent_only_through_tokens() -> None:
    model = make("recompress", False, 2)
    rng = np.random.default_rng(7)
    seq = rng.integers(1, 201, size=30)
    changed = seq.copy()
    changed[3] = changed[3] % 200 + 1  # one history item differs
    a, b = full_pass_vectors(model, [seq], None), full_pass_vectors(model, [changed], None)
    assert (a - b).abs().max().item() > 1e-4, "history must influence recent outputs"

    # Cut the token path: with the memory fixed, the history no longer matters at all.
    R = model.cfg.recent_len
    memory = model.compress(*pad([seq[:-R]]))
    r, rl = pad([seq[-R:]])
    same_memory = model.recommend(memory, r, rl)
    assert torch.equal(same_memory, model.recommend(memory, r, rl))
    # ...and the full pass with tokens removed from the mask of recent items ignores history:
    cut = make("recompress", False, 2, m=4)
    cut.load_state_dict(model.state_dict())
    batch_a = collate([seq], cut.cfg)
    batch_b = collate([changed], cut.cfg)
    for batch in (batch_a, batch_b):  # recent items may no longer see the tokens
        recent = batch.seg == 2
        batch.seg[recent] = 5  # a segment with no preceding token block
    ha = cut(batch_a)[0, batch_a.last[0]]
    hb = cut(batch_b)[0, batch_b.last[0]]
    assert torch.equal(ha, hb)


def test_recommend_rejects_empty_recent_and_wrong_memory() -> None:
    model = make("recompress", False, 0)
    with pytest.raises(ValueError):
        model.recommend(model.empty_memory(1), torch.zeros(1, 2, dtype=torch.long), torch.tensor([0]))
    with pytest.raises(ValueError):
        model.recommend(None, torch.ones(1, 2, dtype=torch.long), torch.tensor([2]))


@pytest.mark.parametrize("mode", ["none", "own"])
@torch.no_grad()
def test_vectors_at_positions_equal_recommend_of_each_prefix(mode: str) -> None:
    """One pass over a row answers each of its prefixes: what serves a user's burst at once
    (not for request-time models: their query at p is asked when item p + 1 happened)."""
    model = make("recompress", mode, 4)
    rng = np.random.default_rng(4)
    (seq,), (ts,) = random_users(rng, [40])
    memory = model.compress(*pad([rng.integers(1, 201, size=20)]))
    items, lengths = pad([seq])
    t = torch.from_numpy(ts)[None]
    positions = torch.tensor([0, 7, 21, 39])
    at = model.recommend(memory, items, lengths, t, at=(torch.zeros(4, dtype=torch.long), positions))
    for q, p in enumerate(positions.tolist()):
        alone = model.recommend(memory, items[:, :p + 1], torch.tensor([p + 1]), t[:, :p + 1])
        assert (at[q] - alone[0]).abs().max().item() <= TOL, p
    with pytest.raises(ValueError):
        model.recommend(memory, items, lengths, t, at=(torch.tensor([0]), torch.tensor([40])))


@pytest.mark.parametrize("mode", ["none", "request"])
@torch.no_grad()
def test_a_lifelong_chain_of_folds_equals_the_multi_block_pass(mode: str) -> None:
    """A user of 235 events: 46 folds of 5, each reading the previous memory only, give the
    answer of one masked pass over the 46-block layout (what the stream does over a lifetime)."""
    model = make("incremental", mode, 7, m=3)
    rng = np.random.default_rng(7)
    seqs, ts = random_users(rng, [235, 57])
    request = requests_after(rng, ts) if mode == "request" else None
    cfg = model.cfg
    reference = full_pass_vectors(model, seqs, ts, request)  # layout longer than max_len: fine
    memory, has = model.empty_memory(2), torch.zeros(2, dtype=torch.bool)
    starts = [0, 0]
    seg_lens = [segment_lengths(len(s), cfg) for s in seqs]  # the last one is the recent part
    assert len(seg_lens[0]) - 1 >= 40
    for step in range(max(len(x) for x in seg_lens) - 1):
        active = [i for i in range(2) if step < len(seg_lens[i]) - 1]
        seg = [seqs[i][starts[i]:starts[i] + seg_lens[i][step]] for i in active]
        seg_ts = [ts[i][starts[i]:starts[i] + seg_lens[i][step]] for i in active]
        idx = torch.tensor(active)
        memory[idx] = model.fold(memory[idx], has[idx], *pad(seg), pad(seg_ts)[0])
        has[idx] = True
        for i, s in zip(active, seg):
            starts[i] += len(s)
    recent = [s[st:] for s, st in zip(seqs, starts)]
    recent_ts = [t[st:] for t, st in zip(ts, starts)]
    served = model.recommend(memory, *pad(recent), pad(recent_ts)[0],
                             request_ts=None if request is None else torch.from_numpy(request))
    assert (served - reference).abs().max().item() <= TOL
