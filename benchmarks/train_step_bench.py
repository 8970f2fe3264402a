"""Training step time by negative sampling mode (issue 18: per-position negatives must stay fast).

One step = a batch's forward pass, the loss, backward and the optimiser update, on ML-1M's
training examples (batch 128, length 200, HSTU 2 x 50). Modes:

- ``shared K``: one set of K negatives per sequence (the loss before issue 18);
- ``per_position K``: K negatives for every position (the official sampler, ``gathered_dot``);
- ``full``: a softmax over all items;
- ``shared 128, collate each step``: the step as it was before issue 18, laying every batch out
  again (``collate``) instead of gathering rows of the examples laid out once.

    .venv/bin/python benchmarks/train_step_bench.py --threads 1 --steps 10 --out benchmarks/results/train_step_cpu.json
    .venv/bin/python benchmarks/train_step_bench.py --device cuda --out benchmarks/results/train_step_cuda.json

Each mode runs ``--warmup`` steps, then ``--steps`` timed ones over the same batches; the
median is reported. Modes run back to back in one process.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from persrec.models import experiment
from persrec.models.config import ModelConfig
from persrec.models.data import default_dataset_path
from persrec.models.layout import collate
from persrec.models.loss import Negatives, build_model, next_item_loss
from persrec.models.recipe import OFFICIAL
from persrec.models.train import Examples, draw_batches, make_optimizer, training_examples
from persrec.testing.machine import cpu_model

RESULTS = Path(__file__).resolve().parent / "results"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_mode(data, negatives: Negatives, k: int, device, steps: int, warmup: int,
              collate_each_step: bool = False) -> dict:
    torch.manual_seed(0)
    overrides = OFFICIAL.model_overrides(200, has_timestamps=False) | dict(num_negatives=k)
    cfg = ModelConfig(num_items=data.id_map.num_items, **overrides)
    model = build_model(cfg).to(device).train()
    tcfg = OFFICIAL.train_config(negatives=negatives)
    opt = make_optimizer(model.parameters(), tcfg)
    seqs = data.split.train.items
    examples = Examples(seqs, None, cfg, device)
    inputs, targets, _, _ = training_examples(seqs, None, cfg.max_len)
    rng = np.random.default_rng(0)
    batches = draw_batches(examples.lengths, tcfg, rng)
    gen = torch.Generator(device=device).manual_seed(0)
    times = []
    for i in range(warmup + steps):
        idx = batches[i % len(batches)]
        sync(device)
        t0 = time.perf_counter()
        if collate_each_step:
            batch = collate([inputs[j] for j in idx], cfg, [targets[j] for j in idx]).to(device)
        else:
            batch = examples.batch(idx)
        loss = next_item_loss(model(batch), batch.targets, model, k, cfg.temperature, negatives, gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sync(device)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return dict(negatives=negatives.value, k=k, collate_each_step=collate_each_step,
                median_s=statistics.median(times), p90_s=float(np.percentile(times, 90)), steps=steps)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=None, help="dataset file (default: ML-1M sequences)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--out", type=Path, default=RESULTS / "train_step_cpu.json")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    data = experiment.load_dataset(args.data or default_dataset_path())
    modes = [(Negatives.SHARED, 128, True), (Negatives.SHARED, 128, False), (Negatives.SHARED, 512, False),
             (Negatives.PER_POSITION, 128, False), (Negatives.PER_POSITION, 512, False),
             (Negatives.FULL, 0, False)]
    rows = []
    for negatives, k, each in modes:
        row = time_mode(data, negatives, k, device, args.steps, args.warmup, each)
        rows.append(row)
        print(f"{negatives.value:>12} K={k:<4} collate each step={each!s:5}  median {row['median_s'] * 1000:7.1f} ms  p90 {row['p90_s'] * 1000:7.1f} ms", flush=True)
    base = rows[0]["median_s"]
    for row in rows:
        row["ratio_to_before"] = row["median_s"] / base
    out = dict(
        command="benchmarks/train_step_bench.py " + " ".join(
            f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if v is not None and k != "out"),
        machine=dict(cpu=cpu_model(), threads=torch.get_num_threads(), device=str(device),
                     gpu=torch.cuda.get_device_name() if device.type == "cuda" else None,
                     torch=torch.__version__),
        data=data.name, batch_size=128, max_len=200, rows=rows,
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2))
    print(f"-> {args.out}")


if __name__ == "__main__":
    main()
