"""The memory store across PostgreSQL crashes and restarts (a private embedded server)."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from persrec.embedded.postgres import EmbeddedPostgres
from persrec.memory import MemoryRecord, SqlMemoryStore, migrate

pytestmark = pytest.mark.postgres


@pytest.fixture
def server() -> Iterator[EmbeddedPostgres]:
    base = Path(tempfile.mkdtemp(prefix="persrec-pgcrash-"))
    base.chmod(0o755)  # the server may run as the `postgres` OS user
    try:
        with EmbeddedPostgres(base / "data", database="memory") as pg:
            yield pg
    finally:
        shutil.rmtree(base, ignore_errors=True)


def rec(user_id: str, events: int) -> MemoryRecord:
    return MemoryRecord(user_id, "v1", np.full((1, 2, 4, 1, 8), 0.5, np.float32), events, events)


def test_committed_memories_survive_kill_and_the_store_reconnects(server: EmbeddedPostgres) -> None:
    migrate(server.url)
    store = SqlMemoryStore(server.url)
    store.put_many([rec(f"u{i}", i) for i in range(100)])
    url = server.url

    server.kill()
    assert not server.running
    server.start()
    assert server.url == url  # same port: clients keep their URL

    got = store.get_many([f"u{i}" for i in range(100)], "v1")  # pooled connections were dead
    assert len(got) == 100 and got["u42"].watermark == 42

    server.restart()
    assert store.put_many([rec("u1", 7)]) == {"u1": 2}
    store.close()
