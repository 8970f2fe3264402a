"""The model-switch tables (memory/switches.py) on SQLite and PostgreSQL."""

from __future__ import annotations

import threading
import uuid

import pytest

from persrec.memory import SqlSwitches, migrate


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def switches(request: pytest.FixtureRequest, tmp_path):
    url = f"sqlite:///{tmp_path / 's.db'}" if request.param == "sqlite" else request.getfixturevalue("postgres_url")
    migrate(url)
    s = SqlSwitches(url)
    yield s
    s.close()


def test_the_first_recorded_offset_of_a_partition_stays(switches) -> None:
    app = f"app-{uuid.uuid4().hex[:6]}"
    assert switches.current(app) is None and switches.offsets(app, "B") == {}
    req = switches.request(app, 1, 2, "B")
    assert switches.current(app) == req and (req.from_triton_version, req.to_triton_version) == (1, 2)
    assert switches.record(app, "B", 0, 120) == 120
    assert switches.record(app, "B", 0, 95) == 120  # a later owner of partition 0 keeps 120
    assert switches.record(app, "B", 3, 7) == 7
    assert switches.offsets(app, "B") == {0: 120, 3: 7} and switches.offsets(app, "A") == {}
    # a rollback is a new request: the old one's offsets are gone
    back = switches.request(app, 2, 1, "A")
    assert switches.current(app) == back and switches.offsets(app, "B") == {}
    assert switches.finish(app) and switches.current(app) is None and not switches.finish(app)


def test_a_request_names_where_each_version_is_served(switches) -> None:
    app = f"app-{uuid.uuid4().hex[:6]}"
    req = switches.request(app, 1, 2, "B", to_triton_url="triton-green:8001")
    assert switches.current(app) == req
    assert (req.triton_url(1), req.triton_url(2)) == (None, "triton-green:8001")  # None: the workers' own
    back = switches.request(app, 2, 1, "A", from_triton_url="triton-green:8001")  # the rollback
    assert switches.current(app) == back and (back.triton_url(1), back.triton_url(2)) == (None, "triton-green:8001")


def test_concurrent_workers_agree_on_one_offset(switches) -> None:
    app = f"app-{uuid.uuid4().hex[:6]}"
    switches.request(app, 1, 2, "B")
    got, barrier = [], threading.Barrier(4)

    def worker(offset: int) -> None:
        barrier.wait()
        got.append(switches.record(app, "B", 5, offset))

    threads = [threading.Thread(target=worker, args=(o,)) for o in (10, 20, 30, 40)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(got)) == 1 and got[0] in (10, 20, 30, 40) and switches.offsets(app, "B") == {5: got[0]}
