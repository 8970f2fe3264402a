"""The recommend model's window cache in-process (serving/window_cache.py): milliseconds per
event of ``ModelRunner.recommend`` without and with it, for batches like the stream's.

    .venv/bin/python benchmarks/window_cache_bench.py       # ~2 min on one core

Model: the stream benchmark's PerSRec (2 blocks, dim 50, one head, K = 8, recent 50, folds of
25; random weights) over ml-latest-small's 9,724 items, CPU, one thread. A batch holds
``users`` users with ``burst`` consecutive events each (burst 1 is a steady stream, one event
per user per batch; a drain's batches hold ~11). Windows start at 50 items and grow by
``burst`` per batch, with no fold in between (every row is a hit after the first batch); each
configuration is timed ``rounds`` times, alternating without and with the cache, and the
median is reported. Results: ``results/window_cache_bench.json``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from persrec.models.checkpoint import make_checkpoint
from persrec.models.config import ModelConfig
from persrec.models.inputs import ModelInputs
from persrec.models.loss import build_model
from persrec.serving.inference import ModelRunner
from persrec.testing.machine import code_commit, cpu_model

RESULTS = Path(__file__).resolve().parent / "results"


def batches(rng, users: int, burst: int, steps: int, cfg: ModelConfig) -> list[ModelInputs]:
    """``steps + 1`` batches (the first warms the cache) of ``users`` users x ``burst`` rows."""
    length = 50 + burst * steps
    memory = rng.standard_normal((users, *cfg.memory_shape)).astype(np.float32)
    items = rng.integers(1, cfg.num_items + 1, size=(users, length))
    ts = np.sort(rng.integers(10**9, 11 * 10**8, size=(users, length)), axis=1)
    out = []
    for step in range(steps + 1):
        n = np.tile(np.arange(50 + (step - 1) * burst + 1, 50 + step * burst + 1), users) if step else np.full(users, 50)
        u = np.repeat(np.arange(users), burst if step else 1)
        inside = np.arange(n.max())[None] < n[:, None]
        out.append(ModelInputs(items[u, : n.max()] * inside, ts[u, : n.max()] * inside, n, memory[u],
                               np.ones(len(u), bool), ts[u, n - 1]))
    return out


def ms_per_event(runner: ModelRunner, work: list[ModelInputs]) -> float:
    runner.recommend(work[0], 10)  # fills the cache (when there is one)
    start = time.perf_counter()
    for x in work[1:]:
        runner.recommend(x, 10)
    return 1000 * (time.perf_counter() - start) / sum(len(x) for x in work[1:])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bursts", default="1,4,11")
    ap.add_argument("--users", type=int, default=64, help="users per batch")
    ap.add_argument("--steps", type=int, default=8, help="batches timed per round")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--out", type=Path, default=RESULTS / "window_cache_bench.json")
    args = ap.parse_args()
    torch.set_num_threads(1)
    cfg = ModelConfig(num_items=9724, dim=50, num_layers=2, num_heads=1, head_dim=50, max_len=200, recent_len=50,
                      segment_len=25, num_memory_tokens=8, dropout=0.0)
    torch.manual_seed(0)
    ck = make_checkpoint(build_model(cfg), "{}")
    rows = []
    for burst in (int(b) for b in args.bursts.split(",")):
        work = batches(np.random.default_rng(burst), args.users, burst, args.steps, cfg)
        times: dict[str, list[float]] = {"off": [], "on": []}
        for _ in range(args.rounds):
            for name, mb in (("off", 0), ("on", 256)):
                times[name].append(ms_per_event(ModelRunner(ck, "cpu", cpu_threads=1, window_cache_mb=mb), work))
        off, on = statistics.median(times["off"]), statistics.median(times["on"])
        rows.append({"burst": burst, "users_per_batch": args.users, "ms_per_event_off": round(off, 4),
                     "ms_per_event_on": round(on, 4), "speedup": round(off / on, 2),
                     "rounds_off": [round(t, 4) for t in times["off"]], "rounds_on": [round(t, 4) for t in times["on"]]})
        print(f"burst {burst}: {off:.3f} -> {on:.3f} ms/event ({off / on:.2f}x)")
    res = {"rows": rows, "machine": f"{cpu_model()}, 1 thread, torch {torch.__version__}",
           "date": time.strftime("%Y-%m-%d %H:%M"), "code": code_commit("serving", "models"),
           "command": "benchmarks/window_cache_bench.py"}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=2) + "\n")


if __name__ == "__main__":
    main()
