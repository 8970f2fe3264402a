"""Alembic migrations of the memory schema, on SQLite and PostgreSQL."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import Engine, inspect

from persrec.memory import (
    Base,
    SqlMemoryStore,
    create_engine_for,
    current_revision,
    downgrade,
    migrate,
)


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
    assert current_revision(url) == "0001"
    assert schema_diff(engine) == []

    downgrade(url)
    assert current_revision(url) is None
    assert "user_memory" not in inspect(engine).get_table_names()

    migrate(engine)
    assert current_revision(engine) == "0001"
    assert schema_diff(engine) == []
    migrate(url)  # already at head: a no-op
    assert current_revision(url) == "0001"


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
