"""The main job (``persrec demo``) on a served checkpoint: broker, Triton and a worker start in
a fresh work dir, the dataset streams through, recommendations come out, everything stops."""

import io
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from rich.console import Console

from persrec.demo import run_demo
from persrec.embedded._proc import free_ports, http_ok
from persrec.models.checkpoint import save_checkpoint
from persrec.models.data import data_dir
from persrec.settings import Settings
from persrec.stack import wait_for

pytestmark = [pytest.mark.kafka, pytest.mark.triton, pytest.mark.slow]


def test_demo_streams_the_dataset_and_stops_everything(served_model, tmp_path) -> None:
    checkpoint = save_checkpoint(served_model.checkpoint, tmp_path / "model.pt")
    api_port, web_port = free_ports(2)
    settings = Settings(work_dir=tmp_path / "var", api_port=api_port, worker_web_port=web_port)
    out = io.StringIO()
    ratings = data_dir() / "ml-latest-small" / "ratings.csv"
    result = run_demo(settings, ratings, checkpoint, rate=200, duration=25,
                      console=Console(file=out, width=120))
    assert result["first_recommendation_s"] is not None
    assert 0 < result["recs_out"] <= result["events_in"] and result["events_published"] > 0
    assert result["dlq"] == 0
    assert "stopped broker, Triton and worker" in out.getvalue()
    assert (tmp_path / "var" / "demo" / "persrec.db").is_file()  # the SQLite memory store


def _live() -> dict[int, int]:
    """pid -> parent pid of every process that has not exited (zombies left out)."""
    parent = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            state, ppid = stat.read_text().rsplit(")", 1)[1].split()[:2]
        except (OSError, ValueError):
            continue
        if state != "Z":
            parent[int(stat.parent.name)] = int(ppid)
    return parent


def _descendants(pid: int) -> set[int]:
    """Every live process below ``pid``."""
    parent = _live()
    found, frontier = set(), {pid}
    while frontier:
        frontier = {p for p, pp in parent.items() if pp in frontier} - found
        found |= frontier
    return found


def test_sigterm_stops_the_demo_and_everything_it_started(served_model, tmp_path) -> None:
    """``kill`` / ``timeout`` / a supervisor stop the demo as Ctrl-C does: the broker, Triton and
    the worker stop with it (they outlived a SIGTERM before)."""
    checkpoint = save_checkpoint(served_model.checkpoint, tmp_path / "model.pt")
    api_port, web_port = free_ports(2)
    env = os.environ | {"PERSREC_WORK_DIR": str(tmp_path / "var"), "PERSREC_API_PORT": str(api_port),
                        "PERSREC_WORKER_WEB_PORT": str(web_port)}
    ratings = data_dir() / "ml-latest-small" / "ratings.csv"
    demo = subprocess.Popen([sys.executable, "-m", "persrec.cli", "demo", str(ratings), "--checkpoint", str(checkpoint),
                             "--rate", "100"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    started: set[int] = set()
    try:
        db = tmp_path / "var" / "demo" / "persrec.db"
        wait_for(lambda: http_ok(f"http://127.0.0.1:{api_port}/healthz") and db.is_file(), 240, "the demo serving")
        time.sleep(3)
        started |= _descendants(demo.pid)
        assert len(started) >= 3  # broker, tritonserver (and its stubs), worker
        demo.send_signal(signal.SIGTERM)
        assert demo.wait(timeout=120) == 0
        wait_for(lambda: not started & set(_live()), 30, "the demo's services stopped")
    finally:
        for pid in {demo.pid} | (started & set(_live())):  # nothing outlives a failed test
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        demo.wait()
