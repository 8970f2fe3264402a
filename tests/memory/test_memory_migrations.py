"""Alembic migrations of the memory schema, on SQLite and PostgreSQL."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import Engine, MetaData, Table, inspect, select

from persrec.memory import (
    Base,
    MemoryRecord,
    SqlMemoryStore,
    create_engine_for,
    current_revision,
    downgrade,
    migrate,
)
from persrec.memory.rows import record_to_columns, utc_now

HEAD = "0006"


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def url(request: pytest.FixtureRequest, tmp_path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'sub' / 'memory.db'}"  # parent dir does not exist yet
    return request.getfixturevalue("postgres_url")


@pytest.fixture
def engine(url: str) -> Iterator[Engine]:
    engine = create_engine_for(url)
    yield engine
    engine.dispose()


def schema_diff(engine: Engine) -> list:
    with engine.connect() as conn:
        ctx = MigrationContext.configure(conn, opts={"compare_type": True})
        return compare_metadata(ctx, Base.metadata)


def test_upgrade_downgrade_upgrade(url: str, engine: Engine, tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)  # migrations are found from the package, not the cwd
    assert current_revision(url) is None
    migrate(url)
    assert current_revision(url) == HEAD
    assert schema_diff(engine) == []

    downgrade(url)
    assert current_revision(url) is None
    assert "user_memory" not in inspect(engine).get_table_names()

    migrate(engine)
    assert current_revision(engine) == HEAD
    assert schema_diff(engine) == []
    migrate(url)  # already at head: a no-op
    assert current_revision(url) == HEAD


def user_memory_rows(engine: Engine) -> list[dict[str, Any]]:
    """Every user_memory row as the database returns it, in the table's current shape."""
    table = Table("user_memory", MetaData(), autoload_with=engine)
    with engine.connect() as conn:
        query = select(table).order_by(table.c.user_id)
        return [dict(row) for row in conn.execute(query).mappings()]


def test_upgrade_from_0001_keeps_rows_and_adds_null_history_ts(url: str, engine: Engine) -> None:
    migrate(url, "0001")
    rng = np.random.default_rng(0)
    records = [
        MemoryRecord(
            f"u{i}",
            "v1",
            rng.standard_normal((2, 2, 4, 1, 8)).astype(np.float32),
            events_folded=i,
            watermark=2**40 + i,
            history=rng.integers(0, 2**40, size=i) if i % 2 else None,
        )
        for i in range(20)
    ]
    columns = [record_to_columns(rec, "float16", utc_now()) | {"row_version": 1} for rec in records]
    for row in columns:
        del row["history_ts"]  # not a column at 0001
    table = Table("user_memory", MetaData(), autoload_with=engine)
    with engine.begin() as conn:
        conn.execute(table.insert(), columns)
    before = user_memory_rows(engine)
    assert len(before) == 20

    migrate(url)
    assert current_revision(url) == HEAD
    assert schema_diff(engine) == []
    after = user_memory_rows(engine)
    assert [r.pop("history_ts") for r in after] == [None] * 20
    assert after == before

    store = SqlMemoryStore(engine)
    got = store.get_many([r.user_id for r in records], "v1")
    for rec in records:
        assert got[rec.user_id].history_ts is None
        np.testing.assert_array_equal(got[rec.user_id].history, rec.history)
    timed = MemoryRecord(
        "timed", "v1", records[0].tensor, 3, 3, np.array([7, 8, 9]), np.array([1, 2**33, 5])
    )
    assert store.put_many([timed, records[1]]) == {"timed": 1, "u1": 2}
    got = store.get_many(["timed", "u1"], "v1")
    np.testing.assert_array_equal(got["timed"].history_ts, [1, 2**33, 5])
    assert got["u1"].history_ts is None

    downgrade(url, "0001")  # drops the times, keeps the rows and the index
    rows = user_memory_rows(engine)
    assert len(rows) == 21 and "history_ts" not in rows[0]
    indexes = inspect(engine).get_indexes("user_memory")
    assert [ix["name"] for ix in indexes] == ["ix_user_memory_model_version"]


def test_store_does_not_create_tables(url: str, engine: Engine) -> None:
    store = SqlMemoryStore(engine)
    assert "user_memory" not in inspect(engine).get_table_names()
    with pytest.raises(Exception, match="user_memory"):
        store.count()


def test_sqlite_connections_are_configured(tmp_path) -> None:
    engine = create_engine_for(f"sqlite:///{tmp_path / 'm.db'}")
    try:
        with engine.connect() as conn:
            pragma = lambda name: conn.exec_driver_sql(f"PRAGMA {name}").scalar()
            assert pragma("journal_mode") == "wal"
            assert pragma("synchronous") == 1  # NORMAL
            assert pragma("busy_timeout") == 30000
            assert pragma("foreign_keys") == 1
    finally:
        engine.dispose()


def test_upgrade_to_versioned_rows_keeps_every_row_and_downgrade_keeps_the_newest(url: str, engine: Engine) -> None:
    """0002 -> 0003 on a populated database: no row lost, and a user can then hold one row per
    model version. Downgrade keeps each user's most recent row."""
    migrate(url, "0002")
    rng = np.random.default_rng(1)
    tensor = lambda: rng.standard_normal((2, 2, 4, 1, 8)).astype(np.float32)  # noqa: E731
    old = [MemoryRecord(f"u{i}", "v1", tensor(), i, 2**40 + i, np.arange(i), np.arange(i) * 7 if i % 2 else None)
           for i in range(30)]
    table = Table("user_memory", MetaData(), autoload_with=engine)  # the 0002 shape: one row a user
    with engine.begin() as conn:
        conn.execute(table.insert(), [record_to_columns(rec, "float16", utc_now()) | {"row_version": 1 + (i < 5)}
                                      for i, rec in enumerate(old)])
    store = SqlMemoryStore(engine)
    before = user_memory_rows(engine)
    assert len(before) == 30

    migrate(url)
    assert current_revision(url) == HEAD
    assert schema_diff(engine) == []
    assert user_memory_rows(engine) == before
    assert inspect(engine).get_pk_constraint("user_memory")["constrained_columns"] == ["user_id", "model_version"]

    clock = iter([utc_now().replace(year=2030, microsecond=i) for i in range(10)])
    later = SqlMemoryStore(engine, clock=lambda: next(clock))
    assert later.put_many([MemoryRecord("u0", "v2", tensor(), 99, 99), MemoryRecord("u1", "v2", tensor(), 98, 98)]) == {
        "u0": 1, "u1": 1}
    assert store.versions() == {"v1": 30, "v2": 2}
    assert store.get_many(["u0"], "v1")["u0"].row_version == 2  # the old model's row is untouched

    downgrade(url, "0002")
    rows = {r["user_id"]: r for r in user_memory_rows(engine)}
    assert len(rows) == 30
    assert (rows["u0"]["model_version"], rows["u0"]["events_folded"]) == ("v2", 99)
    assert (rows["u1"]["model_version"], rows["u1"]["events_folded"]) == ("v2", 98)
    assert {r["model_version"] for u, r in rows.items() if u not in ("u0", "u1")} == {"v1"}
    assert inspect(engine).get_pk_constraint("user_memory")["constrained_columns"] == ["user_id"]
