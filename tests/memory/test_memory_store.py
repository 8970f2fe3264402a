"""The same MemoryStore tests on every backend: in-memory, SQLite (a file) and PostgreSQL."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from datetime import UTC, datetime

import numpy as np
import pytest

from persrec.memory import (
    InMemoryMemoryStore,
    MemoryRecord,
    MemoryStore,
    SqlMemoryStore,
    StaleMemoryError,
    migrate,
)

SHAPE = (2, 2, 8, 1, 64)  # (L, 2, M, H, D/H)
StoreFactory = Callable[..., MemoryStore]


@pytest.fixture(
    params=["in_memory", "sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]
)
def make_store(request: pytest.FixtureRequest, tmp_path) -> Iterator[StoreFactory]:
    """A factory of stores on one fresh, migrated database (several stores may share it)."""
    backend = request.param
    url = None
    if backend == "sqlite":
        url = f"sqlite:///{tmp_path / 'memory.db'}"
    elif backend == "postgres":
        url = request.getfixturevalue("postgres_url")
    if url is not None:
        migrate(url)
    shared = InMemoryMemoryStore()
    stores: list[MemoryStore] = []

    def make(storage_dtype: str = "float16") -> MemoryStore:
        if url is None:
            return shared if storage_dtype == "float16" else InMemoryMemoryStore(storage_dtype)
        stores.append(SqlMemoryStore(url, storage_dtype))
        return stores[-1]

    yield make
    for store in stores:
        store.close()


@pytest.fixture
def store(make_store: StoreFactory) -> MemoryStore:
    return make_store()


def record(
    user_id: str,
    model_version: str = "v1",
    seed: int = 0,
    history: bool = True,
    times: bool = False,
    **kw,
) -> MemoryRecord:
    rng = np.random.default_rng(seed)
    return MemoryRecord(
        user_id=user_id,
        model_version=model_version,
        tensor=rng.standard_normal(SHAPE).astype(np.float32),
        events_folded=kw.pop("events_folded", 100 + seed),
        watermark=kw.pop("watermark", 2**40 + seed),  # needs BIGINT
        history=rng.integers(0, 2**40, size=16) if history else None,
        history_ts=rng.integers(0, 2**33, size=16) if times else None,  # past 2038: needs int64
        **kw,
    )


def test_round_trip_float16_rounds_like_numpy(store: MemoryStore) -> None:
    before = datetime.now(UTC)
    rec = record("u1")
    store.put_many([rec])
    got = store.get_many(["u1"], "v1")["u1"]
    assert got.tensor.dtype == np.float32 and got.tensor.shape == SHAPE
    np.testing.assert_array_equal(got.tensor, rec.tensor.astype(np.float16).astype(np.float32))
    assert (got.events_folded, got.watermark, got.model_version) == (100, 2**40, "v1")
    assert got.history is not None and got.history.dtype == np.int64
    np.testing.assert_array_equal(got.history, rec.history)
    assert got.row_version == 1
    assert got.updated_at is not None and got.updated_at.tzinfo is not None
    assert before.replace(microsecond=0) <= got.updated_at <= datetime.now(UTC)


def test_round_trip_float32_storage_is_exact(make_store: StoreFactory) -> None:
    store = make_store("float32")
    rec = record("u1", history=False)
    store.put_many([rec])
    got = store.get_many(["u1"], "v1")["u1"]
    np.testing.assert_array_equal(got.tensor, rec.tensor)
    assert got.history is None


def test_history_ts_round_trips_and_none_stays_none(store: MemoryStore) -> None:
    timed, untimed, bare = record("t", times=True), record("u"), record("b", history=False)
    store.put_many([timed, untimed, bare])
    got = store.get_many(["t", "u", "b"], "v1")
    assert got["t"].history_ts is not None and got["t"].history_ts.dtype == np.int64
    np.testing.assert_array_equal(got["t"].history_ts, timed.history_ts)
    np.testing.assert_array_equal(got["t"].history, timed.history)
    assert got["u"].history_ts is None and got["u"].history is not None
    assert got["b"].history_ts is None and got["b"].history is None

    store.put_many([record("t", seed=1)])  # an update without times clears the old ones
    assert store.get_many(["t"], "v1")["t"].history_ts is None


def test_history_ts_must_match_history() -> None:
    tensor = np.zeros(SHAPE, np.float32)
    with pytest.raises(ValueError, match="2 times for 3 history items"):
        MemoryRecord("u1", "v1", tensor, 3, 3, np.arange(3), np.arange(2))
    with pytest.raises(ValueError, match="without history"):
        MemoryRecord("u1", "v1", tensor, 3, 3, None, np.arange(3))


def test_get_many_returns_only_present_users(store: MemoryStore) -> None:
    store.put_many([record("a"), record("b", seed=1)])
    got = store.get_many(["a", "b", "missing", "a"], "v1")
    assert sorted(got) == ["a", "b"]
    assert got["b"].events_folded == 101
    assert store.get_many([], "v1") == {}


def test_memory_of_another_model_version_is_not_returned(store: MemoryStore) -> None:
    store.put_many([record("u1", "v1"), record("u2", "v2")])
    assert sorted(store.get_many(["u1", "u2"], "v1")) == ["u1"]
    assert sorted(store.get_many(["u1", "u2"], "v2")) == ["u2"]
    store.put_many([record("u1", "v2", seed=3)])  # built by the new model beside the old row
    assert store.get_many(["u1"], "v1")["u1"].events_folded == 100
    assert store.get_many(["u1"], "v2")["u1"].events_folded == 103
    assert store.count("v1") == 1 and store.count("v2") == 2 and store.count() == 3
    assert store.versions() == {"v1": 1, "v2": 2}


def test_each_model_versions_row_has_its_own_compare_and_set(store: MemoryStore) -> None:
    """The old model folds while the new one's memory is being built: neither write is stale
    to the other, and each row counts its own versions."""
    assert store.put_many([record("u1", "v1")]) == {"u1": 1}
    assert store.put_many([record("u1", "v1", seed=1)], expected_versions={"u1": 1}) == {"u1": 2}
    assert store.put_many([record("u1", "v2", seed=2)], expected_versions={"u1": 0}) == {"u1": 1}
    with pytest.raises(StaleMemoryError):  # the v2 row exists now
        store.put_many([record("u1", "v2", seed=4)], expected_versions={"u1": 0})
    assert store.put_many([record("u1", "v1", seed=3)], expected_versions={"u1": 2}) == {"u1": 3}
    got = store.get_many(["u1"], "v1")["u1"], store.get_many(["u1"], "v2")["u1"]
    assert [(r.row_version, r.events_folded) for r in got] == [(3, 103), (1, 102)]


def test_delete_version_retires_one_model_and_keeps_the_others(store: MemoryStore) -> None:
    store.put_many([record(f"u{i}", "old") for i in range(4)])
    store.put_many([record(f"u{i}", "new", seed=9) for i in range(2)])
    assert store.delete_version("old") == 4
    assert store.versions() == {"new": 2}
    assert sorted(store.get_many([f"u{i}" for i in range(4)], "new")) == ["u0", "u1"]
    assert store.delete_version("old") == 0


def test_upsert_increments_row_version(store: MemoryStore) -> None:
    assert store.put_many([record("u1"), record("u2")]) == {"u1": 1, "u2": 1}
    assert store.put_many([record("u1", seed=5), record("u3")]) == {"u1": 2, "u3": 1}
    got = store.get_many(["u1", "u2", "u3"], "v1")
    assert {u: r.row_version for u, r in got.items()} == {"u1": 2, "u2": 1, "u3": 1}
    assert got["u1"].events_folded == 105
    assert store.count() == 3


def test_compare_and_set_conflict_raises_and_writes_nothing(store: MemoryStore) -> None:
    store.put_many([record("u1"), record("u2")])
    store.put_many([record("u1", seed=1)])  # a concurrent writer: u1 is now at version 2

    batch = [record("u1", seed=7), record("u2", seed=7), record("new", seed=7)]
    with pytest.raises(StaleMemoryError) as err:
        store.put_many(batch, expected_versions={"u1": 1, "u2": 1, "new": 0})
    assert err.value.users == ("u1",)

    got = store.get_many(["u1", "u2", "new"], "v1")
    assert sorted(got) == ["u1", "u2"]
    assert (got["u1"].row_version, got["u1"].events_folded) == (2, 101)
    assert (got["u2"].row_version, got["u2"].events_folded) == (1, 100)

    assert store.put_many(batch, expected_versions={"u1": 2, "u2": 1, "new": 0}) == {
        "u1": 3,
        "u2": 2,
        "new": 1,
    }


def test_compare_and_set_sees_inserted_and_deleted_rows(store: MemoryStore) -> None:
    store.put_many([record("u1"), record("u2")])
    with pytest.raises(StaleMemoryError) as err:  # expected absent, but someone inserted it
        store.put_many([record("u1")], expected_versions={"u1": 0})
    assert err.value.users == ("u1",)

    store.delete_many(["u2"])
    with pytest.raises(StaleMemoryError):  # a deleted user must not come back from a stale write
        store.put_many([record("u2")], expected_versions={"u2": 1})
    assert store.get_many(["u2"], "v1") == {}


def test_put_many_rejects_malformed_batches(store: MemoryStore) -> None:
    with pytest.raises(ValueError, match="twice"):
        store.put_many([record("u1"), record("u1", seed=1)])
    with pytest.raises(ValueError, match="expected version"):
        store.put_many([record("u1"), record("u2")], expected_versions={"u1": 0})
    nan = record("u3")
    nan.tensor[0, 0, 0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="non-finite"):
        store.put_many([record("u4"), nan])
    assert store.count() == 0
    assert store.put_many([]) == {}


def test_delete_many(store: MemoryStore) -> None:
    store.put_many([record("u1", "v1"), record("u2", "v2"), record("u3")])
    store.put_many([record("u1", "v2")])
    assert store.delete_many(iter(["u1", "u2", "missing"])) == 3  # an erasure: every version
    assert store.get_many(["u1"], "v1") == {} and store.get_many(["u1", "u2"], "v2") == {}
    assert store.count() == 1
    assert store.delete_many([]) == 0


def test_behind_users_are_the_rows_a_rebuild_still_has_to_make(store: MemoryStore) -> None:
    store.put_many([record(f"u{i}", "v1", watermark=10 + i) for i in range(6)] + [record("other", "v0")])
    assert store.behind_users("v1", "v2", limit=3) == ["u0", "u1", "u2"]
    assert store.behind_users("v1", "v2", limit=3, after="u2") == ["u3", "u4", "u5"]  # pages
    assert store.behind_users("v1", "v2", limit=3, after="u5") == []
    # a shadow build made u0..u3 level with v1; then v1 folded more for u1, and u3 was erased
    store.put_many([record(f"u{i}", "v2", watermark=10 + i) for i in range(4)])
    store.put_many([record("u1", "v1", watermark=40)])
    store.delete_many(["u3"])
    assert store.behind_users("v1", "v2", limit=100) == ["u1", "u4", "u5"]
    assert store.behind_users("v2", "v1", limit=100) == []  # v2 is nowhere ahead of v1
    assert store.behind_users("v0", "v2", limit=100) == ["other"]


def test_stats_counts_payload_bytes(store: MemoryStore) -> None:
    assert (store.stats().rows, store.stats().bytes) == (0, 0)
    store.put_many([record("u1"), record("u2", history=False), record("u3", times=True)])
    tensor_bytes = int(np.prod(SHAPE)) * 2  # float16
    assert store.stats().rows == 3
    assert store.stats().bytes == 3 * tensor_bytes + 16 * 8 + 2 * 16 * 8


def test_large_batch_round_trip(store: MemoryStore) -> None:
    rng = np.random.default_rng(0)
    tensors = rng.standard_normal((5000, *SHAPE)).astype(np.float32)
    records = [
        MemoryRecord(f"user-{i:05d}", "v1", tensors[i], events_folded=i, watermark=i)
        for i in range(5000)
    ]
    assert set(store.put_many(records).values()) == {1}
    got = store.get_many([r.user_id for r in records] + ["nobody"], "v1")
    assert len(got) == 5000
    for i in (0, 1234, 4999):
        rec = got[f"user-{i:05d}"]
        assert rec.events_folded == i
        np.testing.assert_array_equal(rec.tensor, tensors[i].astype(np.float16).astype(np.float32))
    assert store.delete_many(got) == 5000


def test_concurrent_upserts_from_two_threads(make_store: StoreFactory) -> None:
    """Overlapping batches from two writers: no "database is locked", no deadlock, no lost
    row_version increment."""
    stores = [make_store(), make_store()]
    shared = [f"shared{i:03d}" for i in range(200)]
    errors: list[BaseException] = []

    def writer(n: int) -> None:
        try:
            for it in range(15):
                own = [f"t{n}-{it}-{i}" for i in range(50)]
                order = shared[::-1] if n else shared  # opposite orders: deadlock bait
                batch = [record(u, seed=n) for u in order] + [record(u) for u in own]
                stores[n].put_many(batch)
                stores[n].get_many(shared + own, "v1")
        except BaseException as exc:  # noqa: BLE001 - reported by the main thread
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    got = stores[0].get_many(shared, "v1")
    assert {r.row_version for r in got.values()} == {30}
    assert stores[0].count() == 200 + 2 * 15 * 50


def test_concurrent_compare_and_set_loses_no_update(make_store: StoreFactory) -> None:
    """Two read-modify-write loops on one user, retrying on StaleMemoryError: every increment
    of events_folded lands exactly once."""
    stores = [make_store(), make_store()]
    stores[0].put_many([record("hot", events_folded=0)])
    conflicts = [0, 0]
    errors: list[BaseException] = []

    def incrementer(n: int) -> None:
        try:
            for _ in range(20):
                while True:
                    cur = stores[n].get_many(["hot"], "v1")["hot"]
                    new = record("hot", events_folded=cur.events_folded + 1)
                    try:
                        stores[n].put_many([new], expected_versions={"hot": cur.row_version})
                        break
                    except StaleMemoryError:
                        conflicts[n] += 1
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=incrementer, args=(n,)) for n in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    hot = stores[0].get_many(["hot"], "v1")["hot"]
    assert (hot.events_folded, hot.row_version) == (40, 41)


@pytest.mark.postgres
def test_compare_and_set_catches_insert_racing_past_the_row_locks(
    postgres_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """PostgreSQL: a row inserted by another transaction after CAS step 1 (no lock covers a
    row that does not exist yet) is not overwritten by step 2."""
    migrate(postgres_url)
    racer, other = SqlMemoryStore(postgres_url), SqlMemoryStore(postgres_url)
    read_versions = racer._versions

    def versions_then_concurrent_insert(conn, user_ids):
        seen = read_versions(conn, user_ids)
        other.put_many([record("x", seed=9)])  # commits in its own transaction
        return seen

    monkeypatch.setattr(racer, "_versions", versions_then_concurrent_insert)
    with pytest.raises(StaleMemoryError) as err:
        racer.put_many([record("x"), record("y")], expected_versions={"x": 0, "y": 0})
    assert err.value.users == ("x",)
    got = other.get_many(["x", "y"], "v1")
    assert sorted(got) == ["x"] and got["x"].events_folded == 109 and got["x"].row_version == 1
    racer.close()
    other.close()
