"""DistributedDataParallel on CPU (gloo): two processes launched by torchrun train together."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.skipif(
    not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
    reason="needs torch.distributed with gloo",
)

TINY = ["--dim", "16", "--head-dim", "8", "--max-len", "30", "--recent-len", "10",
        "--memory-tokens", "2", "--set", "batch_size=64"]


def torchrun(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = os.environ | {"OMP_NUM_THREADS": "1", "PERSREC_DEVICE": "cpu"}
    # --standalone: a local rendezvous on a free port, so parallel test runs do not collide.
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           *args]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_cli_trains_under_torchrun_and_writes_a_checkpoint(tmp_path: Path) -> None:
    out = tmp_path / "model"
    proc = torchrun(["-m", "persrec.cli", "train", "synthetic", "--epochs", "2", "--out", str(out),
                     *TINY], cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "2 process(es)" in " ".join(proc.stdout.split())  # rich wraps lines
    assert (out / "best.pt").is_file() and (out / "last.pt").is_file()
    assert (out / "metrics.json").is_file()


DRIVER = textwrap.dedent("""
    import sys, torch, torch.distributed as dist
    from persrec.models import experiment
    from persrec.models.train import TrainConfig, leave_process_group

    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    out = sys.argv[1]
    data = experiment.load_dataset("synthetic")
    overrides = dict(num_memory_tokens=2, recent_len=10, max_len=30, dim=16, head_dim=8)
    model, result = experiment.train_on(data, overrides, TrainConfig(epochs=3, batch_size=64),
                                        out_dir=None)
    torch.save({"state": model.state_dict(), "losses": [r.loss for r in result.history],
                "world": dist.get_world_size()}, f"{out}/rank{dist.get_rank()}.pt")
    leave_process_group()
""")


def test_both_ranks_end_with_identical_trained_weights(tmp_path: Path) -> None:
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    proc = torchrun([str(driver), str(tmp_path)], cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert r0["world"] == r1["world"] == 2
    assert r0["losses"][-1] < r0["losses"][0]  # it trained
    assert r0["state"].keys() == r1["state"].keys()
    for name, tensor in r0["state"].items():
        assert torch.equal(tensor, r1["state"][name]), name
