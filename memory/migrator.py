"""Run the memory schema's Alembic migrations from code, whatever the current directory."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.migration import MigrationContext
from sqlalchemy import Connection, Engine, text
from sqlalchemy.engine import URL

from persrec.memory import migrations
from persrec.memory.engine import SQLITE_WRITE, create_engine_for

SCRIPT_LOCATION = str(Path(migrations.__file__).parent)
# Arbitrary constant key: concurrent migrate() calls on one PostgreSQL database queue up.
_PG_LOCK_KEY = 0x7065727372656301


def alembic_config(connection: Connection | None = None) -> Config:
    """An Alembic config for this package's migrations, bound to `connection` if given."""
    cfg = Config()
    cfg.set_main_option("script_location", SCRIPT_LOCATION)
    cfg.attributes["connection"] = connection
    return cfg


def migrate(url_or_engine: str | URL | Engine, revision: str = "head") -> None:
    """Upgrade the database to `revision` (default: the latest), in one transaction."""
    with _migration_connection(url_or_engine) as conn:
        command.upgrade(alembic_config(conn), revision)


def downgrade(url_or_engine: str | URL | Engine, revision: str = "base") -> None:
    """Downgrade the database to `revision` (default: empty, no memory table)."""
    with _migration_connection(url_or_engine) as conn:
        command.downgrade(alembic_config(conn), revision)


def current_revision(url_or_engine: str | URL | Engine) -> str | None:
    """The revision the database is at, or None if never migrated."""
    with _engine(url_or_engine) as engine, engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


@contextmanager
def _migration_connection(url_or_engine: str | URL | Engine) -> Iterator[Connection]:
    with _engine(url_or_engine) as engine, engine.execution_options(**SQLITE_WRITE).begin() as conn:
        if conn.dialect.name == "postgresql":
            conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _PG_LOCK_KEY})
        yield conn


@contextmanager
def _engine(url_or_engine: str | URL | Engine) -> Iterator[Engine]:
    if isinstance(url_or_engine, Engine):
        yield url_or_engine
        return
    engine = create_engine_for(url_or_engine)
    try:
        yield engine
    finally:
        engine.dispose()
