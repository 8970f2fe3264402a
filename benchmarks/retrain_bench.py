"""``persrec retrain`` on one day of ml-latest-small (issue 22, item 3): a model trained on
everything before the day with the most users (at most 7 in this log) is fine-tuned on that
day's events and gated on each of that day's users' newest event (``--days`` widens the window).

    .venv/bin/python benchmarks/retrain_bench.py     # ~5 min on 2 cores

The served model: HSTU, the ``best`` recipe, ``--train-epochs`` epochs on every event before
the day (no validation: a fixed budget). Then the real CLI, ``persrec retrain --since DAY
--until DAY+1d``. Results: ``benchmarks/results/retrain_bench.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

from persrec.models.checkpoint import make_checkpoint, save_checkpoint
from persrec.models.config import ModelConfig
from persrec.models.data import build_sequences, data_dir
from persrec.models.logs import Interactions, load_interactions
from persrec.models.loss import build_model
from persrec.models.recipe import recipe_named
from persrec.models.train import fit
from persrec.testing.machine import code_commit, cpu_model

RESULTS = Path(__file__).resolve().parent / "results"
RATINGS = data_dir() / "ml-latest-small" / "ratings.csv"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--train-epochs", type=int, default=30)
    ap.add_argument("--epochs", type=int, default=3, help="fine-tuning epochs")
    ap.add_argument("--days", type=int, default=1, help="days of new events")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    torch.set_num_threads(1)
    inter = load_interactions(RATINGS)
    days = inter.timestamps // 86400
    user_days = np.unique(np.stack([days, np.unique(inter.users, return_inverse=True)[1].ravel()]), axis=1)[0]
    day = int(np.bincount(user_days - days.min()).argmax() + days.min())  # the day with the most users
    start, end = day * 86400, (day + args.days) * 86400 - 1
    before = inter.timestamps < start
    seqs, id_map = build_sequences(inter)  # the id map of the whole log (the served catalogue)
    past, _ = build_sequences(Interactions(inter.users[before], inter.items[before], inter.timestamps[before]), id_map)
    recipe = recipe_named("best")
    cfg = ModelConfig(num_items=id_map.num_items, dim=50, head_dim=50, max_len=200, dropout=0.2,
                      **recipe.model_overrides(200, True))
    torch.manual_seed(1)
    model = build_model(cfg)
    t0 = time.monotonic()
    fit(model, past.items, past.timestamps, None, recipe.train_config(epochs=args.train_epochs, patience=None, seed=1))
    train_s = time.monotonic() - t0
    work = Path(tempfile.mkdtemp(prefix="retrain-bench-"))
    save_checkpoint(make_checkpoint(model, id_map.to_json()), work / "served.pt")
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "persrec.cli", "retrain", str(work / "served.pt"), str(RATINGS),
                           "--since", str(start), "--until", str(end), "--epochs", str(args.epochs),
                           "--threads", "1", "--out", str(work / "out")],
                          capture_output=True, text=True, env=dict(os.environ) | {"COLUMNS": "200"})
    wall = time.monotonic() - t0
    if proc.returncode not in (0, 3):
        raise SystemExit(proc.stdout + proc.stderr)
    gate = json.loads((work / "out" / "gate.json").read_text())
    res = {"day": datetime.fromtimestamp(start, timezone.utc).date().isoformat(), "events_that_day": gate["new_events"],
           "served_model_train_s": round(train_s, 1), "served_model_epochs": args.train_epochs,
           "retrain_cli_wall_s": round(wall, 1), "exit_code": proc.returncode, "gate": gate,
           "machine": {"cpu": cpu_model(), "cores": os.cpu_count(), "threads": 1},
           "code": code_commit()}
    (args.out / "retrain_bench.json").write_text(json.dumps(res, indent=2))
    old, new = gate["old"], gate["new"]
    md = "\n".join([
        "# persrec retrain: one day of ml-latest-small", "",
        f"`benchmarks/retrain_bench.py` on {res['machine']['cpu']} ({res['machine']['cores']} cores, 1 thread); "
        f"code {res['code'] or 'unrecorded'}. The served model: HSTU `best`, {args.train_epochs} epochs on every "
        f"event before {res['day']} ({res['served_model_train_s']} s). `persrec retrain --since {res['day']} "
        f"--until +{args.days} day(s) --epochs {args.epochs}`: {gate['new_events']} events of {gate['users']} users, "
        f"{gate['holdout_rows']} held out (each user's newest); the CLI took {res['retrain_cli_wall_s']} s "
        f"(fine-tuning {gate['train_seconds']} s).", "",
        "| model | NDCG@10 | HR@10 | HR@50 |", "|---|---|---|---|",
        f"| current | {old['ndcg@10']:.4f} | {old['hr@10']:.4f} | {old['hr@50']:.4f} |",
        f"| retrained | {new['ndcg@10']:.4f} | {new['hr@10']:.4f} | {new['hr@50']:.4f} |", "",
        f"Gate (NDCG@10, margin {gate['margin']}): **{'handed over' if gate['passed'] else 'refused'}** "
        f"(exit code {proc.returncode}). {gate['holdout_rows']} rows: one day is a small sample, so the gate's "
        "margin should be set against its noise.", ""])
    (args.out / "retrain_bench.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
