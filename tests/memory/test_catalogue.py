"""The item catalogue table (memory/catalogue.py) on SQLite and PostgreSQL."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from persrec.memory import SqlCatalogue, migrate, text_sha256


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def catalogue(request: pytest.FixtureRequest, tmp_path):
    url = f"sqlite:///{tmp_path / 'c.db'}" if request.param == "sqlite" else request.getfixturevalue("postgres_url")
    migrate(url)
    c = SqlCatalogue(url)
    yield c
    c.close()


def emb(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(6).astype(np.float32)


def test_ids_follow_the_trained_ones_and_revisions_count_changes(catalogue) -> None:
    v = f"v-{id(catalogue)}"
    got = catalogue.register(v, 100, [("a", text_sha256("A"), emb(1)), ("b", text_sha256("B"), emb(2))])
    assert [(r.item_id, r.dense_id, r.revision) for r in got] == [("a", 101, 1), ("b", 102, 2)]
    # the same text again: nothing; a new text: same id, next revision; a new item: next id
    got = catalogue.register(v, 100, [("a", text_sha256("A"), emb(1)), ("b", text_sha256("B2"), emb(3)),
                                      ("c", text_sha256("C"), emb(4))])
    assert [(r.item_id, r.dense_id, r.revision) for r in got] == [("b", 102, 3), ("c", 103, 4)]
    assert [(r.item_id, r.revision) for r in catalogue.since(v, 1)] == [("b", 3), ("c", 4)]
    rows = {r.item_id: r for r in catalogue.since(v)}
    assert np.array_equal(rows["b"].embedding, emb(3)) and np.array_equal(rows["a"].embedding, emb(1))
    assert rows["b"].registered_at == catalogue.since(v, 0, 2)[1].registered_at  # kept across the change
    s = catalogue.summary(v, newest=2)
    assert (s.items, s.revision, [r.item_id for r in s.newest]) == (3, 4, ["c", "b"])
    light = catalogue.since(v, embeddings=False)  # what a worker reads: ids and revisions
    assert [(r.item_id, r.dense_id, r.revision, len(r.embedding)) for r in light] == [
        ("a", 101, 1, 0), ("b", 102, 3, 0), ("c", 103, 4, 0)]
    assert catalogue.since("another version") == [] and catalogue.summary("another version").items == 0
    assert catalogue.delete_version(v) == 3 and catalogue.since(v) == []


def test_two_writers_never_share_an_id_or_a_revision(catalogue) -> None:
    v = f"w-{id(catalogue)}"
    errors = []

    def write(tag: str) -> None:
        try:
            for i in range(10):
                catalogue.register(v, 5, [(f"{tag}{i}", text_sha256(f"{tag}{i}"), emb(i))])
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=write, args=(t,)) for t in "xyz"]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    rows = catalogue.since(v)
    assert sorted(r.dense_id for r in rows) == list(range(6, 36))
    assert [r.revision for r in rows] == list(range(1, 31))


def test_a_trained_item_keeps_its_id_when_its_text_changes(catalogue) -> None:
    v = f"t-{id(catalogue)}"
    got = catalogue.register(v, 10, [("old", text_sha256("new text"), emb(1)), ("n", text_sha256("N"), emb(2))],
                             trained={"old": 7})
    assert [(r.item_id, r.dense_id, r.revision) for r in got] == [("old", 7, 1), ("n", 11, 2)]
