"""Does tritonserver survive loading python-backend models while others are answering?

RELIABILITY.md, "tritonserver aborted while a model switch ...": the switch test lost its
tritonserver now and then. This reproduces the conditions without the stream: a real
tritonserver (pytriton's) serves ``recommend`` and ``fold`` of a small PerSRec model, versions 1
and 2; three clients send them batches of 1 to 1,024 rows as fast as they are answered; meanwhile
``--loads`` other python-backend models (copies of ``recommend`` under new names) are loaded and
unloaded one after another. ``--loads 0`` is the control: the same traffic for ``--hold`` seconds,
nothing loaded. Each trial reports whether the server was still alive at the end, the requests
answered, and the python-backend stubs the kernel logged as crashed meanwhile (``dmesg``, where
readable). Results: ``results/triton_load_probe.json``.

    .venv/bin/python benchmarks/triton_load_probe.py --trials 3 --loads 6            # ~1-4 min a trial
    .venv/bin/python benchmarks/triton_load_probe.py --trials 2 --loads 0 --hold 120  # the control
    .venv/bin/python benchmarks/triton_load_probe.py --extra-arg=--backend-config=python,shm-default-byte-size=67108864
    .venv/bin/python benchmarks/triton_load_probe.py --trials 30 --loads 0           # starts only (~10 s a trial)

A server that dies while it starts its four python-backend instances counts as not surviving
(``died_starting``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch

from persrec.embedded._proc import ServiceBinaryNotFound, ServiceError
from persrec.embedded.triton import EmbeddedTriton
from persrec.models.checkpoint import make_checkpoint
from persrec.models.config import ModelConfig
from persrec.models.data import IdMap
from persrec.models.inputs import ModelInputs
from persrec.models.loss import build_model
from persrec.serving.export import export_repository
from persrec.stream.triton import TritonModels
from persrec.testing.machine import code_commit, cpu_model

RESULTS = Path(__file__).resolve().parent / "results"


def checkpoint(seed: int):
    cfg = ModelConfig(num_items=50, dim=16, num_heads=2, head_dim=8, max_len=20, dropout=0.0,
                      num_memory_tokens=2, recent_len=5, segment_len=5)
    torch.manual_seed(seed)
    return make_checkpoint(build_model(cfg), IdMap([str(i) for i in range(1, 51)]).to_json())


def stub_crashes() -> list[str]:
    """The kernel's lines about crashed python-backend stubs (empty where dmesg is not readable)."""
    try:
        out = subprocess.run(["dmesg"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [line for line in out.splitlines() if "triton_python_b" in line]


async def hammer(server: EmbeddedTriton, version: str, shape, stop: threading.Event) -> int:
    models = TritonModels(server.grpc_url, timeout_s=30, max_attempts=1, version=version)
    answered = 0
    try:
        while not stop.is_set():
            b = random.choice([1, 8, 64, 512, 1024])
            rows = [[random.randint(1, 50) for _ in range(random.randint(1, 9))] for _ in range(b)]
            x = ModelInputs.of_rows(rows, memory=np.random.rand(b, *shape).astype(np.float32),
                                    has_memory=np.ones(b, bool))
            await asyncio.gather(models.recommend(x), models.fold(x))
            answered += 1
    finally:
        await models.close()
    return answered


def trial(args, work: Path) -> dict:
    repo = work / "repo"
    for version in (1, 2):
        ck = checkpoint(version)
        export_repository(ck, repo, version=version)
    before = set(stub_crashes())
    server = EmbeddedTriton(repo, ["recommend", "fold"], work_dir=work / "triton", extra_args=args.extra_arg)
    try:
        server.start()  # four python-backend instances (two models, two versions) start at once
    except ServiceBinaryNotFound:
        raise
    except ServiceError as exc:  # it died loading them, before any traffic
        return dict(alive=False, died_starting=True, aborted_lock_exception="lock_exception" in str(exc),
                    stub_crashes=[c for c in stub_crashes() if c not in before], errors=[str(exc)[-300:]])
    stop, loaded, errors = threading.Event(), [], []

    def load_others() -> None:
        try:
            time.sleep(2)  # the clients are sending by then
            for i in range(args.loads):
                name = f"other{i}"
                shutil.copytree(repo / "recommend", repo / name)
                config = repo / name / "config.pbtxt"
                config.write_text(config.read_text().replace('name: "recommend"', f'name: "{name}"'))
                server.load_model(name)
                server.unload_model(name)
                loaded.append(name)
            time.sleep(args.hold)
        except Exception as exc:  # noqa: BLE001 - the server died under us: that is the finding
            errors.append(f"loading: {type(exc).__name__}: {exc}"[:300])
        finally:
            stop.set()

    async def clients() -> list[int]:
        shape = checkpoint(1).config.memory_shape
        results = await asyncio.gather(*(hammer(server, v, shape, stop) for v in ("1", "2", "1")),
                                       return_exceptions=True)
        stop.set()
        for r in results:
            if isinstance(r, BaseException):
                errors.append(f"client: {type(r).__name__}: {r}"[:300])
        return [r for r in results if isinstance(r, int)]

    started = time.monotonic()
    loader = threading.Thread(target=load_others)
    loader.start()
    answered = asyncio.run(clients())
    loader.join()
    alive = server.running
    server.stop()
    log = work / "triton" / "tritonserver.log"
    text = log.read_text(errors="replace") if log.is_file() else ""
    last_words = [line for line in text.splitlines()
                  if any(w in line for w in ("terminate called", "what():", "Signal (", "Stub process", "unhealthy"))]
    return dict(alive=alive, died_starting=False, aborted_lock_exception="lock_exception" in text, models_loaded=len(loaded),
                batches_answered=answered, seconds=round(time.monotonic() - started, 1),
                stub_crashes=[c for c in stub_crashes() if c not in before], server_log=last_words[-6:],
                errors=errors)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trials", type=int, default=3)
    ap.add_argument("--loads", type=int, default=6, help="models loaded and unloaded under traffic (0: control)")
    ap.add_argument("--hold", type=float, default=0.0, help="seconds of traffic after the loads")
    ap.add_argument("--extra-arg", action="append", default=[], help="tritonserver argument (repeatable)")
    ap.add_argument("--out", type=Path, default=RESULTS / "triton_load_probe.json")
    args = ap.parse_args()
    trials = []
    for i in range(args.trials):
        with tempfile.TemporaryDirectory(prefix="triton-load-probe-") as tmp:
            trials.append(trial(args, Path(tmp)))
        print(f"trial {i + 1}: {json.dumps(trials[-1])}", flush=True)
    run = dict(command=" ".join(["benchmarks/triton_load_probe.py"] + sys.argv[1:]), loads=args.loads,
               hold_s=args.hold, extra_args=args.extra_arg, trials=trials,
               survived=sum(t["alive"] and not t["aborted_lock_exception"] for t in trials),
               machine=dict(cpu=cpu_model()), finished=time.strftime("%Y-%m-%dT%H:%M:%S"),
               code=code_commit("serving", "benchmarks/triton_load_probe.py"))
    runs = json.loads(args.out.read_text()) if args.out.is_file() else []
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(runs + [run], indent=1) + "\n")
    print(f"{run['survived']} of {len(trials)} trials survived -> {args.out}")


if __name__ == "__main__":
    main()
