"""Pytest fixtures for a real PostgreSQL server (an `EmbeddedPostgres` per test session).

- `embedded_postgres` (session): the running server.
- `postgres_url` (function): a SQLAlchemy URL of a fresh, empty database, dropped after the
  test, so tests never see each other's rows.

Mark tests that use them `@pytest.mark.postgres`. A missing server is a failure, not a skip:
the suite is meant to run against PostgreSQL everywhere `scripts/dev setup` has run.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from persrec.embedded.postgres import EmbeddedPostgres, PostgresError


@pytest.fixture(scope="session")
def embedded_postgres() -> Iterator[EmbeddedPostgres]:
    # Not pytest's tmp_path: its parents are mode 0700, and the server may run as the
    # `postgres` OS user (when tests run as root), which must reach the data directory.
    base = Path(tempfile.mkdtemp(prefix="persrec-pgtest-"))
    base.chmod(0o755)
    server, error = None, None
    try:
        server = EmbeddedPostgres(base / "data").start()
    except PostgresError as exc:
        error = str(exc)
    if server is None:
        shutil.rmtree(base, ignore_errors=True)
        # Outside the except block, so the report shows only this message.
        pytest.fail(f"embedded PostgreSQL unavailable: {error}", pytrace=False)
    try:
        yield server
    finally:
        server.stop()
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def postgres_url(embedded_postgres: EmbeddedPostgres) -> Iterator[str]:
    name = f"test_{os.getpid()}_{uuid.uuid4().hex[:12]}"
    embedded_postgres.create_database(name)
    yield embedded_postgres.url_for(name)
    embedded_postgres.drop_database(name)
