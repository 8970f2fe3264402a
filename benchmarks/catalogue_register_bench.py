"""The worker's own CPU for registering items, in-process (issue 21: < 1 s per 10,000 items).

    .venv/bin/python benchmarks/catalogue_register_bench.py          # ~1 min

What ``stream.registry.ItemRegistry.register_batch`` does per batch besides the encoder and
Faust: parse each message (``parse_item``), hash its text, register the batch in SQLite
(``SqlCatalogue.register``) and read back the rows since the worker's revision
(``SqlCatalogue.since``), for ``--items`` new items in batches of ``--batch`` on a fresh
database, a fixed 384-float embedding each. ``catalogue_bench.py`` measures the same inside a real
worker, where Faust's consumer and the idle worker's own CPU come on top; its subtraction of the
idle CPU is too noisy on a shared 2-core VM to show a few tenths of a second. Process CPU
seconds per phase, the median of ``--rounds`` rounds. Results:
``results/catalogue_register_bench.json`` (``--out``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from persrec.memory import SqlCatalogue, migrate, text_sha256
from persrec.stream.events import parse_item
from persrec.testing.machine import code_commit, cpu_model

RESULTS = Path(__file__).resolve().parent / "results"


def one_round(items: int, batch: int, text_chars: int) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as d:
        url = f"sqlite:///{d}/catalogue.db"
        migrate(url)
        store = SqlCatalogue(url)
        pad = "x" * max(0, text_chars - 40)
        messages = [json.dumps({"item_id": f"new-{i}", "text": f"Item {i} (2026) | Drama|Comedy {pad}",
                                "ts": 1.7e9}).encode() for i in range(items)]
        vector = np.random.default_rng(0).standard_normal(384).astype(np.float32)
        cpu = dict(parse=0.0, register=0.0, since=0.0)
        revision = 0
        for start in range(0, items, batch):
            t0 = time.process_time()
            parsed = [parse_item(m, now=1.8e9) for m in messages[start:start + batch]]
            rows = [(p.item_id, text_sha256(p.text), vector) for p in parsed]
            t1 = time.process_time()
            store.register("bench", 9724, rows, {})
            t2 = time.process_time()
            got = store.since("bench", revision, embeddings=False)
            t3 = time.process_time()
            revision = max([revision, *(r.revision for r in got)])
            cpu["parse"] += t1 - t0
            cpu["register"] += t2 - t1
            cpu["since"] += t3 - t2
        store.close()
    return cpu


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--items", type=int, default=10_000)
    ap.add_argument("--batch", type=int, default=256, help="the worker's PERSREC_ITEM_BATCH")
    ap.add_argument("--text-chars", type=int, default=200, help="characters of each item's text")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--out", type=Path, default=RESULTS / "catalogue_register_bench.json")
    args = ap.parse_args()
    rounds = [one_round(args.items, args.batch, args.text_chars) for _ in range(args.rounds)]
    median = {k: round(statistics.median(r[k] for r in rounds), 3) for k in rounds[0]}
    total = round(statistics.median(sum(r.values()) for r in rounds), 3)
    res = {"items": args.items, "batch": args.batch, "text_chars": args.text_chars,
           "cpu_s_median": median, "cpu_s_total_median": total,
           "rounds": [{k: round(v, 3) for k, v in r.items()} for r in rounds],
           "machine": f"{cpu_model()}, one process", "date": time.strftime("%Y-%m-%d %H:%M"),
           "code": code_commit("memory", "stream"), "command": "benchmarks/catalogue_register_bench.py"}
    print(f"{args.items} items: {total:.2f} CPU s ({', '.join(f'{k} {v:.2f}' for k, v in median.items())})")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=2) + "\n")


if __name__ == "__main__":
    main()
