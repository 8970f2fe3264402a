"""The main job (``persrec demo``) on a served checkpoint: broker, Triton and a worker start in
a fresh work dir, the dataset streams through, recommendations come out, everything stops."""

import io

import pytest
from rich.console import Console

from persrec.demo import run_demo
from persrec.embedded._proc import free_ports
from persrec.models.checkpoint import save_checkpoint
from persrec.models.data import data_dir
from persrec.settings import Settings

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
