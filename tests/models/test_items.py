"""Items as vectors from their text (models/items.py, models/text.py): the content tower."""

import numpy as np
import pytest
import torch

from persrec.models.config import ModelConfig
from persrec.models.data import IdMap, data_dir
from persrec.models.items import ItemRepr
from persrec.models.layout import collate
from persrec.models.loss import build_model
from persrec.models.text import HashingEncoder, encode_cached, item_texts, movielens_texts

from .test_persrec_exactness import TOL, pad


def text_model(repr_: str, policy: str = "recompress", **kw):
    torch.manual_seed(0)
    cfg = ModelConfig(num_items=30, dim=16, num_heads=2, head_dim=8, max_len=40, num_memory_tokens=3, recent_len=5,
                      segment_len=4, policy=policy, dropout=0.0, item_repr=repr_, text_dim=12, **kw)
    m = build_model(cfg).eval()
    m.item_emb.set_text(HashingEncoder(12).encode([f"movie {i} genre {i % 4}" for i in range(1, 31)]))
    return m


def test_hashing_encoder_is_deterministic_and_normalised() -> None:
    enc = HashingEncoder(32)
    a = enc.encode(["Toy Story (1995) | Animation, Comedy", "Heat (1995) | Action"])
    assert a.shape == (2, 32) and np.allclose(np.linalg.norm(a, axis=1), 1.0)
    assert np.array_equal(a, HashingEncoder(32).encode(["Toy Story (1995) | Animation, Comedy", "Heat (1995) | Action"]))
    assert not np.allclose(a[0], a[1])


def test_encodings_are_cached_by_text(tmp_path) -> None:
    calls = []

    class Counting(HashingEncoder):
        def encode(self, texts):
            calls.append(list(texts))
            return super().encode(texts)

    enc = Counting(8)
    first = encode_cached(["a b", "c", "a b"], enc, tmp_path)
    again = encode_cached(["c", "d"], enc, tmp_path)
    assert [sorted(c) for c in calls] == [["a b", "c"], ["d"]]  # each distinct text once, ever
    assert np.array_equal(first[1], again[0]) and np.array_equal(first[0], first[2])


@pytest.mark.parametrize("repr_", ["text", "id+text"])
def test_item_vectors_of_the_text_representations(repr_: str) -> None:
    m = text_model(repr_)
    table = m.item_vectors()
    assert table.shape == (31, 16) and torch.all(table[0] == 0)  # padding
    assert torch.allclose(m.item_emb(torch.tensor([3])), m.item_emb.weight[3:4])
    if repr_ == "text":  # nothing learned per id: equal texts give equal vectors
        m.item_emb.text[5] = m.item_emb.text[6]
        assert torch.allclose(m.item_vectors()[5], m.item_vectors()[6])


@pytest.mark.parametrize("repr_", ["text", "id+text"])
@pytest.mark.parametrize("policy", ["recompress", "incremental"])
@torch.no_grad()
def test_the_memory_path_is_exact_with_text_items(repr_: str, policy: str) -> None:
    m = text_model(repr_, policy)
    rng = np.random.default_rng(0)
    seqs = [rng.integers(1, 31, size=n) for n in (23, 7, 14)]
    batch = collate(seqs, m.cfg)
    want = m(batch)[torch.arange(3), batch.last]
    from persrec.models.lifelong import lifelong_vectors

    assert (lifelong_vectors(m, seqs, None, None) - want).abs().max().item() <= TOL if policy == "incremental" else True
    if policy == "recompress":
        R = m.cfg.recent_len
        mem = m.compress(*pad([s[:-R] for s in seqs]))
        got = m.recommend(mem, *pad([s[-R:] for s in seqs]))
        assert (got - want).abs().max().item() <= TOL


@torch.no_grad()
def test_a_new_item_is_recommendable_from_its_text_alone() -> None:
    m = text_model("id+text")
    emb = HashingEncoder(12).encode(["movie 7 genre 3"])  # a new item, worded like item 7
    (new,) = m.item_emb.add_items(emb)
    assert new == 31 and m.item_vectors().shape == (32, 16)
    assert torch.all(m.item_emb.id_emb.weight[31] == 0)  # no id part for a new item
    scores = m.score(m.recommend(m.empty_memory(1), torch.tensor([[7, 7, 7]]), torch.tensor([3])))
    assert torch.isfinite(scores[0, 31])
    from persrec.models.items import ItemTower

    with pytest.raises(ValueError, match="id-only"):
        ItemTower(5, 4, ItemRepr.ID, 0).add_items(emb)


def test_movielens_texts_from_the_official_files() -> None:
    ml1m = data_dir() / "ml-1m" / "movies.dat"
    small = data_dir() / "ml-latest-small" / "movies.csv"
    if not (ml1m.is_file() and small.is_file()):
        pytest.skip("MovieLens movies files not in the data dir")
    a, b = movielens_texts(ml1m), movielens_texts(small)
    assert a["1"] == "Toy Story (1995) | Animation, Children's, Comedy"
    assert len(a) == 3883 and len(b) == 9742
    assert b["1"].startswith("Toy Story (1995) | Adventure, Animation")
    assert item_texts(IdMap(["1", "unknown"]), a) == [a["1"], "unknown"]


def test_held_out_items_never_reach_training() -> None:
    from persrec.models.coldstart import hold_out_items
    from persrec.models.data import SequenceData, leave_one_out

    rng = np.random.default_rng(1)
    seqs = SequenceData([str(u) for u in range(50)], [rng.integers(1, 101, size=30) for _ in range(50)],
                        [np.arange(30) for _ in range(50)])
    split = leave_one_out(seqs)
    cold_split, cold = hold_out_items(split, 100, 0.1, seed=3)
    assert len(cold) == 10 and np.array_equal(cold, hold_out_items(split, 100, 0.1, seed=3)[1])
    for s, t, orig in zip(cold_split.train.items, cold_split.train.timestamps, split.train.items):
        assert not np.isin(s, cold).any()
        assert np.array_equal(s, orig[~np.isin(orig, cold)]) and len(t) == len(s)
    assert cold_split.test is split.test and cold_split.valid is split.valid


@pytest.mark.parametrize("negatives", ["shared", "per_position", "full"])
def test_items_outside_the_negative_pool_get_no_gradient(negatives: str) -> None:
    from persrec.models.loss import next_item_loss

    m = text_model("id+text")
    hidden = torch.nn.functional.normalize(torch.randn(4, 6, 16, generator=torch.Generator().manual_seed(2)), dim=-1)
    targets = torch.randint(1, 26, (4, 6), generator=torch.Generator().manual_seed(3))
    pool = torch.arange(1, 26)  # items 26..30 do not exist yet
    loss = next_item_loss(hidden, targets, m, 64, 0.05, negatives, torch.Generator().manual_seed(4), pool)
    loss.backward()
    grad = m.item_emb.id_emb.weight.grad
    assert torch.count_nonzero(grad[26:]) == 0 and torch.count_nonzero(grad[1:26].abs().sum(1)) > 20
    # without the pool the same items are pushed down as negatives
    m.zero_grad()
    next_item_loss(hidden, targets, m, 64, 0.05, negatives, torch.Generator().manual_seed(4)).backward()
    assert torch.count_nonzero(m.item_emb.id_emb.weight.grad[26:].abs().sum(1)) > 0


def test_unknown_items_are_learned_nothing_about_in_training() -> None:
    # The cold-start evaluation: held-out items keep a zero id embedding through training, so the
    # model knows them by their text alone, as an item published after training.
    from persrec.models import experiment
    from persrec.models.coldstart import hold_out_items
    from persrec.models.data import SequenceData, leave_one_out
    from persrec.models.train import TrainConfig

    rng = np.random.default_rng(1)
    seqs = SequenceData([str(u) for u in range(40)], [rng.integers(1, 31, size=12) for _ in range(40)])
    split, cold = hold_out_items(leave_one_out(seqs), 30, 0.2, seed=0)
    data = experiment.Dataset("toy", seqs, IdMap([str(i) for i in range(1, 31)]), split)
    text = HashingEncoder(12).encode([f"movie {i}" for i in range(1, 31)])
    overrides = dict(dim=16, num_heads=2, head_dim=8, max_len=12, dropout=0.0, item_repr="id+text", text_dim=12)
    model, _ = experiment.train_on(data, overrides, TrainConfig(epochs=2, batch_size=8, seed=0), out_dir=None,
                                   text_embeddings=text, unknown_items=cold)
    ids = model.item_emb.id_emb.weight.detach()
    assert torch.count_nonzero(ids[torch.as_tensor(cold)]) == 0
    warm = np.setdiff1d(np.arange(1, 31), cold)
    assert torch.count_nonzero(ids[torch.as_tensor(warm)].abs().sum(1)) == len(warm)


def test_persrec_train_reads_item_texts_and_names_the_encoder(tmp_path, monkeypatch) -> None:
    # `persrec train --items text`: a JSON Lines catalogue (the items topic's shape), the
    # encoder named in the checkpoint so that the served model encodes new items the same way.
    from typer.testing import CliRunner

    from persrec.cli import app
    from persrec.models.checkpoint import load_checkpoint

    monkeypatch.setenv("PERSREC_WORK_DIR", str(tmp_path / "var"))
    catalogue = tmp_path / "items.jsonl"
    catalogue.write_text("\n".join(f'{{"item_id": "{i}", "text": "item {i} kind {i % 5}"}}' for i in range(1, 401)))
    out = tmp_path / "m"
    result = CliRunner().invoke(app, ["train", "synthetic", "--items", "text", "--item-texts", str(catalogue),
                                      "--text-encoder", "hashing-16", "--epochs", "1", "--dim", "16", "--head-dim", "16",
                                      "--max-len", "20", "--out", str(out), "--threads", "1"])
    assert result.exit_code == 0, result.output
    ck = load_checkpoint(out / "best.pt")
    assert (ck.config.item_repr.value, ck.config.text_dim, ck.config.text_encoder) == ("text", 16, "hashing-16")
    bad = CliRunner().invoke(app, ["train", "synthetic", "--items", "text", "--epochs", "1", "--out", str(out)])
    assert bad.exit_code != 0 and "--item-texts" in bad.output


def test_id_dropout_shows_a_share_of_the_items_by_text_alone_in_training_only() -> None:
    m = text_model("id+text", id_dropout=0.5)
    tower = m.item_emb
    with torch.no_grad():
        tower.id_emb.weight[1:].normal_()  # every item has a visible id part
    ids = torch.arange(1, 31)
    text_only = tower.proj(tower.text[ids])
    full = tower.id_emb(ids) + text_only
    assert torch.allclose(tower(ids), full) and torch.allclose(tower.weight[1:], full)  # eval: never dropped
    m.train()
    torch.manual_seed(3)
    dropped = []
    for _ in range(40):
        x, table = tower(ids), tower.weight[1:]
        gone = torch.isclose(x, text_only).all(-1)
        assert torch.equal(torch.isclose(table, text_only).all(-1), gone)  # the output table: the same draw
        assert torch.allclose(x[~gone], full[~gone])  # the others keep their id part
        dropped.append(gone.float().mean().item())
    assert 0.4 <= float(np.mean(dropped)) <= 0.6
    with pytest.raises(ValueError, match="id\\+text"):
        ModelConfig(num_items=3, id_dropout=0.5)


def test_the_text_to_id_map_recovers_a_linear_relation_and_its_ridge_grows_with_noise() -> None:
    from persrec.models.items import fit_text_to_id

    g = torch.Generator().manual_seed(0)
    text, true_w = torch.randn(600, 20, generator=g), torch.randn(20, 6, generator=g)
    ids = text @ true_w + 0.5
    w, b = fit_text_to_id(text, ids)
    # the smallest ridge on the grid (1e-3 of the mean eigenvalue) shrinks it by about as much
    assert torch.allclose(w, true_w, rtol=5e-3, atol=5e-3) and torch.allclose(b, torch.full((6,), 0.5), atol=5e-3)
    # ids that the text does not explain at all: the map shrinks to (nearly) their mean
    noise = torch.randn(600, 6, generator=g) + 2.0
    w, b = fit_text_to_id(text, noise)
    assert w.abs().max() < 0.05 and (b - noise.mean(0)).abs().max() < 0.05
    with pytest.raises(ValueError, match="at least"):
        fit_text_to_id(text[:5], ids[:5])


@torch.no_grad()
def test_new_items_get_the_id_their_text_predicts() -> None:
    m = text_model("id+text", new_item_ids="text")
    tower = m.item_emb
    tower.id_emb.weight[1:] = tower.text[1:] @ torch.randn(12, 16, generator=torch.Generator().manual_seed(1)) + 0.25
    held = np.array([4, 9, 17])  # never trained: their id rows hold anything
    tower.id_emb.weight[torch.as_tensor(held)] = 7.0
    trained_rows = tower.id_emb.weight.clone()
    tower.fit_new_ids(np.setdiff1d(np.arange(1, 31), held))
    h, trained = torch.as_tensor(held), torch.as_tensor(np.setdiff1d(np.arange(31), held))
    assert torch.allclose(tower.id_emb.weight[h], tower.text[h] @ tower.text_to_id + tower.text_to_id_bias)
    assert torch.equal(tower.id_emb.weight[trained], trained_rows[trained])  # trained ids kept
    # the ids here are exactly linear in the texts: the map predicts the held-out ids they had
    want_held = tower.text[h] @ torch.randn(12, 16, generator=torch.Generator().manual_seed(1)) + 0.25
    assert torch.allclose(tower.id_emb.weight[h], want_held, atol=1e-2)
    # an item published after training (past trained_items) reads the id its text predicts, again
    # when its text changes; a trained item that gets a new text keeps its id
    emb = HashingEncoder(12).encode(["movie 7 genre 3", "movie 8 genre 0"])
    tower.put_items(np.array([31, 5]), emb)
    want = torch.as_tensor(emb[0]) @ tower.text_to_id + tower.text_to_id_bias
    assert torch.allclose(tower.id_emb.weight[31], want) and torch.equal(tower.id_emb.weight[5], trained_rows[5])
    tower.put_items(np.array([31]), emb[1:])
    assert torch.allclose(tower.id_emb.weight[31], torch.as_tensor(emb[1]) @ tower.text_to_id + tower.text_to_id_bias)
    # 'zero' (the default) changes nothing
    z = text_model("id+text")
    before = z.item_emb.id_emb.weight.clone()
    z.item_emb.fit_new_ids(np.arange(1, 20))
    assert torch.equal(before, z.item_emb.id_emb.weight) and not hasattr(z.item_emb, "text_to_id")
    with pytest.raises(ValueError, match="id\\+text"):
        ModelConfig(num_items=3, item_repr="text", text_dim=4, new_item_ids="text")


def test_training_fits_the_map_and_the_checkpoint_keeps_it(tmp_path) -> None:
    from persrec.models import experiment
    from persrec.models.checkpoint import load_checkpoint
    from persrec.models.coldstart import hold_out_items
    from persrec.models.data import SequenceData, leave_one_out
    from persrec.models.train import TrainConfig

    rng = np.random.default_rng(1)
    seqs = SequenceData([str(u) for u in range(40)], [rng.integers(1, 31, size=12) for _ in range(40)])
    split, cold = hold_out_items(leave_one_out(seqs), 30, 0.2, seed=0)
    data = experiment.Dataset("toy", seqs, IdMap([str(i) for i in range(1, 31)]), split)
    text = HashingEncoder(12).encode([f"movie {i} genre {i % 4}" for i in range(1, 31)])
    overrides = dict(dim=16, num_heads=2, head_dim=8, max_len=12, dropout=0.0, item_repr="id+text", text_dim=12,
                     new_item_ids="text")
    model, fit = experiment.train_on(data, overrides, TrainConfig(epochs=2, batch_size=8, seed=0), out_dir=tmp_path,
                                     text_embeddings=text, unknown_items=cold)
    tower = model.item_emb
    assert torch.count_nonzero(tower.text_to_id) > 0
    c = torch.as_tensor(cold)
    assert torch.allclose(tower.id_emb.weight[c], tower.text[c] @ tower.text_to_id + tower.text_to_id_bias)
    again = load_checkpoint(fit.checkpoint).build_model()
    assert torch.equal(again.item_emb.text_to_id, tower.text_to_id)
    assert torch.equal(again.item_vectors(), model.item_vectors())
