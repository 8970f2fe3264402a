"""Items registered while a model serves: the runner reads them by their text, in its inputs and
its answers, and follows the catalogue in the database (serving/catalogue.py)."""

import numpy as np
import pytest
import torch

from persrec.memory import SqlCatalogue, migrate, text_sha256
from persrec.models.checkpoint import make_checkpoint
from persrec.models.config import ModelConfig
from persrec.models.data import IdMap
from persrec.models.inputs import ModelInputs
from persrec.models.loss import build_model
from persrec.models.text import HashingEncoder
from persrec.serving.catalogue import CatalogueFollower, CatalogueUnavailable
from persrec.serving.inference import ModelRunner

ENC = HashingEncoder(16)
TEXTS = [f"film {i} about {['war', 'love', 'space', 'crime'][i % 4]}" for i in range(1, 41)]


def runner(repr_: str = "text", memory_tokens: int = 0) -> ModelRunner:
    torch.manual_seed(0)
    cfg = ModelConfig(num_items=40, dim=16, num_heads=2, head_dim=8, max_len=20, num_memory_tokens=memory_tokens,
                      recent_len=6, segment_len=4, dropout=0.0, item_repr=repr_, text_dim=16 if repr_ != "id" else 0,
                      text_encoder=ENC.name)
    model = build_model(cfg).eval()
    if repr_ != "id":
        model.item_emb.set_text(ENC.encode(TEXTS))
    return ModelRunner(make_checkpoint(model, IdMap([str(i) for i in range(1, 41)]).to_json()), "cpu")


def row(items, catalogue=None) -> ModelInputs:
    return ModelInputs.of_rows([items], [list(range(100, 100 + len(items)))], catalogue=catalogue)


class Row:  # a memory.CatalogueItem as the runner reads it
    def __init__(self, dense_id, revision, text):
        self.dense_id, self.revision, self.embedding = dense_id, revision, ENC.encode([text])[0]


@pytest.mark.parametrize("repr_", ["text", "id+text"])
def test_a_new_item_with_a_known_text_scores_like_it(repr_: str) -> None:
    r = runner(repr_)
    ids, scores = r.recommend(row([3, 7, 9]), 5)
    top = int(ids[0, 0])
    r.apply_catalogue([Row(41, 1, TEXTS[top - 1])])  # item 41: the top item's twin by text
    assert r.num_items == 41 and r.catalogue_revision == 1
    ids2, scores2 = r.recommend(row([3, 7, 9], np.array([[1, 41]])), 5)
    pos = {int(i): float(s) for i, s in zip(ids2[0], scores2[0])}
    if repr_ == "text":  # no id part: the twin has the very same vector
        assert 41 in pos and abs(pos[41] - pos[top]) < 1e-5
    else:  # the trained item has its id part too; the new one only its text
        assert 41 in {int(i) for i in r.recommend(row([3, 7, 9], np.array([[1, 41]])), 38)[0][0]}
    # a worker that cannot name item 41 yet never gets it
    masked = r.recommend(row([3, 7, 9], np.array([[1, 40]])), 30)[0][0]  # 30 of the 37 it may name
    assert 41 not in masked.tolist()
    assert np.array_equal(r.recommend(row([3, 7, 9], np.array([[1, 40]])), 5)[0], ids)
    # and the new item is read in a history like any other: as its twin by text
    if repr_ == "text":
        a = r.recommend(row([3, 7, 41], np.array([[1, 41]])), 5)
        b = r.recommend(row([3, 7, top], np.array([[1, 41]])), 5)
        assert np.allclose(a[1], b[1], atol=1e-5)


@torch.no_grad()
def test_a_new_item_reads_the_id_its_text_predicts_under_new_item_ids_text() -> None:
    # The trained ids here are exactly linear in the texts, so the fitted map predicts them: a new
    # item worded like a trained one gets that item's id part, and so its very vector and score.
    torch.manual_seed(0)
    cfg = ModelConfig(num_items=40, dim=16, num_heads=2, head_dim=8, max_len=20, dropout=0.0, item_repr="id+text",
                      text_dim=16, text_encoder=ENC.name, new_item_ids="text")
    model = build_model(cfg).eval()
    tower = model.item_emb
    tower.set_text(ENC.encode(TEXTS))
    tower.id_emb.weight[1:] = tower.text[1:] @ torch.randn(16, 16) * 0.3 - 0.1
    tower.fit_new_ids()
    r = ModelRunner(make_checkpoint(model, IdMap([str(i) for i in range(1, 41)]).to_json()), "cpu")
    ids, _ = r.recommend(row([3, 7, 9]), 5)
    top = int(ids[0, 0])
    r.apply_catalogue([Row(41, 1, TEXTS[top - 1])])
    ids2, scores2 = r.recommend(row([3, 7, 9], np.array([[1, 41]])), 5)
    pos = {int(i): float(s) for i, s in zip(ids2[0], scores2[0])}
    assert 41 in pos and abs(pos[41] - pos[top]) < 1e-4
    # under 'zero' (the default) the same new item has no id part
    zero = runner("id+text")
    zero.apply_catalogue([Row(41, 1, TEXTS[top - 1])])
    assert torch.count_nonzero(zero.model.item_emb.id_emb.weight[41]) == 0


def test_a_changed_text_moves_the_item_and_keeps_its_id() -> None:
    r = runner("text")
    before = r.recommend(row([1, 2]), 40)
    r.apply_catalogue([Row(5, 1, TEXTS[9])])  # item 5 now reads like item 10
    assert r.num_items == 40
    ids, scores = r.recommend(row([1, 2]), 40)
    got = dict(zip(ids[0].tolist(), scores[0].tolist()))
    assert abs(got[5] - got[10]) < 1e-5
    assert dict(zip(before[0][0].tolist(), before[1][0].tolist()))[5] != pytest.approx(got[5], abs=1e-4)


def test_an_id_only_model_refuses_catalogue_items() -> None:
    with pytest.raises(ValueError, match="by id only"):
        runner("id").apply_catalogue([Row(41, 1, "x")])


def test_the_follower_reads_the_database_up_to_the_revision_asked(tmp_path) -> None:
    url = f"sqlite:///{tmp_path / 'c.db'}"
    migrate(url)
    r = runner("text")
    follower = CatalogueFollower(r, url)
    follower.sync(0)  # nothing asked: no database read
    with pytest.raises(CatalogueUnavailable, match="unavailable: revision 1 is not in the database"):
        follower.sync(1)
    cat = SqlCatalogue(url)
    cat.register(r.model_version, 40, [(f"n{i}", text_sha256(t), ENC.encode([t])[0]) for i, t in enumerate(["a b", "c d"])])
    follower.sync(1)
    assert r.catalogue_revision == 2 and r.num_items == 42  # it read every row there was
    with pytest.raises(CatalogueUnavailable, match="PERSREC_DATABASE_URL is not set"):
        CatalogueFollower(runner("text"), "").sync(1)
    with pytest.raises(CatalogueUnavailable, match="unavailable"):
        CatalogueFollower(runner("text"), f"sqlite:///{tmp_path / 'missing' / 'nothing.db'}").sync(1)
