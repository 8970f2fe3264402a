"""Engine factory: one place that knows the per-backend connection settings."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sqlalchemy import Connection, Engine, create_engine, event
from sqlalchemy.engine import URL, make_url

# Execution option asking the SQLite `begin` hook for BEGIN IMMEDIATE: a write transaction
# takes the write lock up front (waiting up to busy_timeout) instead of upgrading a read
# lock later, which SQLite may refuse at once with "database is locked".
SQLITE_WRITE = {"sqlite_begin_immediate": True}


def create_engine_for(url: str | URL, *, busy_timeout_ms: int = 30_000, **kwargs: Any) -> Engine:
    """An engine for `url` with the settings the memory store relies on.

    - SQLite: WAL journal, synchronous=NORMAL, busy_timeout, foreign keys, and SQLAlchemy (not
      the sqlite3 driver) emitting BEGIN, on every new connection. The parent directory of a
      database file is created.
    - PostgreSQL: a bare `postgresql://` URL selects the psycopg (3) driver; pre-ping on.
    """
    u = make_url(url)
    if u.drivername == "postgresql":
        u = u.set(drivername="postgresql+psycopg")
    if u.get_backend_name() == "sqlite":
        if u.database and u.database != ":memory:" and not u.database.startswith("file:"):
            Path(u.database).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(u, **kwargs)
        configure_sqlite(engine, busy_timeout_ms)
        return engine
    kwargs.setdefault("pool_pre_ping", True)
    return create_engine(u, **kwargs)


def configure_sqlite(engine: Engine, busy_timeout_ms: int = 30_000) -> None:
    """Attach the connection pragmas and BEGIN handling to a SQLite engine."""

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        # Take transaction control away from the driver (see `_on_begin`).
        dbapi_conn.isolation_level = None
        cur = dbapi_conn.cursor()
        try:
            cur.execute(f"PRAGMA busy_timeout = {int(busy_timeout_ms)}")
            cur.execute("PRAGMA journal_mode = WAL")
            cur.execute("PRAGMA synchronous = NORMAL")
            cur.execute("PRAGMA foreign_keys = ON")
        finally:
            cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Connection) -> None:
        immediate = conn.get_execution_options().get("sqlite_begin_immediate", False)
        conn.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")


class EngineUser:
    """Base of the stores over one engine: the engine given, or one made from a URL (and
    disposed of by ``close``); ``_writer`` begins write transactions (SQLite: BEGIN IMMEDIATE)."""

    def __init__(self, url_or_engine: str | URL | Engine) -> None:
        if isinstance(url_or_engine, Engine):
            self._engine, self._owns_engine = url_or_engine, False
        else:
            self._engine, self._owns_engine = create_engine_for(url_or_engine), True
        self._writer = self._engine.execution_options(**SQLITE_WRITE)

    def close(self) -> None:
        if self._owns_engine:
            self._engine.dispose()
