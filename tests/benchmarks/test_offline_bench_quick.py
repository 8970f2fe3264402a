"""The offline benchmark's --quick mode runs end to end on the synthetic dataset."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "offline_bench.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("offline_bench", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_quick_offline_rows_write_json_table_and_plot(bench, tmp_path: Path) -> None:
    bench.main(["--quick", "--data", "synthetic", "--out", str(tmp_path), "--threads", "1",
                "--rows", "sasrec,hstu-full,hstu-recent,recompress-k4,incremental-k2",
                "--run-dir", str(tmp_path / "runs")])
    result = json.loads((tmp_path / "offline_synthetic_quick.json").read_text())
    rows = result["rows"]
    assert set(rows) == {"sasrec", "hstu-full", "hstu-recent", "recompress-k4", "incremental-k2"}
    for r in rows.values():
        assert 0 <= r["test"]["ndcg@10"] <= 1 and r["ms_per_request_b1"] > 0
        assert r["state_bytes_per_user"] > 0 and r["epochs_run"] == 1
    # A memory request reads M keys + the recent items instead of the whole window.
    assert rows["recompress-k4"]["flops_per_request"] < rows["hstu-full"]["flops_per_request"]
    assert "| recompress-k4 |" in (tmp_path / "offline_synthetic_quick.md").read_text()
    assert (tmp_path / "offline_synthetic_quick.png").stat().st_size > 0

    bench.main(["--quick", "--data", "synthetic", "--out", str(tmp_path), "--intervals",
                "--run-dir", str(tmp_path / "runs")])
    pairs = json.loads((tmp_path / "offline_synthetic_quick.json").read_text())["intervals"]
    assert set(pairs) == {f"{r}/{b}" for r in ("recompress-k4", "incremental-k2") for b in ("hstu-full", "hstu-recent")}
    assert all(p["lo"] <= p["ratio"] <= p["hi"] for p in pairs.values())
    bench.main(["--quick", "--data", "synthetic", "--out", str(tmp_path), "--retime"])
    retimed = json.loads((tmp_path / "offline_synthetic_quick.json").read_text())["rows"]
    assert retimed.keys() == rows.keys()
    assert retimed["hstu-full"]["test"] == rows["hstu-full"]["test"]  # accuracy untouched


def test_quick_long_history_cost_grows_for_full_history_only(bench, tmp_path: Path) -> None:
    bench.main(["--quick", "--long-history", "--data", "synthetic", "--out", str(tmp_path)])
    points = json.loads((tmp_path / "long_history_synthetic_quick.json").read_text())["points"]
    assert [p["history"] for p in points] == sorted(p["history"] for p in points)
    assert points[-1]["full_flops"] > 2 * points[0]["full_flops"]
    assert points[-1]["persrec_flops"] == points[1]["persrec_flops"]  # flat past the recent window
    assert (tmp_path / "long_history_synthetic_quick.png").stat().st_size > 0
