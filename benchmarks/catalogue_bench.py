"""Item catalogue benchmark (issue 21): how soon an item published on ``items`` is served, and
what registering items costs the worker, on real services (noida-db broker, tritonserver with
``recommend``, ``fold`` and ``encode_items``, SQLite, a real ``persrec worker``).

    .venv/bin/python benchmarks/catalogue_bench.py            # ~5 min on 2 cores
    .venv/bin/python benchmarks/catalogue_bench.py --quick    # small sizes, a smoke run

Model: PerSRec (K=8, recent window 50, folds of 25; the stream benchmark's shape, random
weights) reading items by their text through all-MiniLM-L6-v2 (the ``text`` extra; without it,
the hashing encoder, and the results say so). Phases, each on a fresh broker:

1. drain: a backlog of real ml-latest-small events; its rate R (stream_bench's definition);
2. items under load: events at R/2 for ``--load-s`` seconds while ``--items`` new items are
   published at ``--item-rate``/s. An item is *recommendable* once the worker has applied its
   catalogue row: from then on every request carries the revision that holds it, and Triton
   reads the row before answering. Latency = that moment - the item message's CreateTime (same
   host clock), as the worker measures it for every item (``item_latency`` in ``/status``). A
   probe checks the claim: after the last item, an event of a new user whose only item is that
   new item must be answered from a window that read it.
3. registration cost: an idle worker registers ``--bulk`` items published at once; worker CPU
   seconds (its process group, /proc) minus its idle CPU over the same time, next to the CPU of
   Triton's ``encode_items`` process (the encoder itself).

Results: ``benchmarks/results/catalogue_bench.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import stream_bench as sb  # noqa: E402 - the stream benchmark's helpers

from persrec.embedded._proc import group_members  # noqa: E402
from persrec.embedded.triton import EmbeddedTriton  # noqa: E402
from persrec.memory import SqlCatalogue, migrate  # noqa: E402
from persrec.models.checkpoint import make_checkpoint  # noqa: E402
from persrec.models.config import ModelConfig  # noqa: E402
from persrec.models.data import data_dir  # noqa: E402
from persrec.models.loss import build_model  # noqa: E402
from persrec.models.text import HashingEncoder, MiniLMEncoder, encode_cached, item_texts, movielens_texts  # noqa: E402
from persrec.serving.export import export_repository  # noqa: E402
from persrec.stack import WorkerProcess  # noqa: E402
from persrec.testing.machine import code_commit, cpu_model  # noqa: E402
from persrec.testing.pipeline import publish, whole_topic  # noqa: E402

log = logging.getLogger("catalogue_bench")
GENRES = ["Drama", "Comedy", "Thriller", "Animation", "Documentary", "Romance", "Sci-Fi", "Horror"]


def encoder():
    try:
        return MiniLMEncoder()
    except ImportError:
        log.warning("sentence-transformers not installed: the hashing encoder stands in (pip install '.[text]')")
        return HashingEncoder(384)


def repository(work: Path, wl: sb.Workload, enc) -> tuple[Path, object]:
    texts = item_texts(wl.id_map, movielens_texts(data_dir() / "ml-latest-small" / "movies.csv"))
    emb = encode_cached(texts, enc, sb.ROOT / "runs" / "text-cache")
    cfg = ModelConfig(num_items=wl.id_map.num_items, dim=50, num_layers=2, num_heads=1, head_dim=50, max_len=200,
                      recent_len=50, segment_len=25, num_memory_tokens=8, dropout=0.0, item_repr="text",
                      text_dim=emb.shape[1], text_encoder=enc.name)
    torch.manual_seed(0)
    model = build_model(cfg)
    model.item_emb.set_text(emb)
    ck = make_checkpoint(model, wl.id_map.to_json())
    repo = work / "repo-text"
    export_repository(ck, repo, top_k=10)
    return repo, ck


def new_items(n: int, prefix: str) -> list[tuple[bytes, bytes]]:
    return [(f"{prefix}{i}".encode(),
             json.dumps({"item_id": f"{prefix}{i}", "text": f"A new film number {i} ({2027 + i % 3}) | "
                         f"{GENRES[i % 8]}, {GENRES[(i * 3) % 8]}", "ts": time.time()}).encode()) for i in range(n)]


def publish_paced(bootstrap: str, topic: str, messages: list[tuple[bytes, bytes]], rate: float) -> None:
    start = time.monotonic()
    for k in range(0, len(messages), max(1, int(rate // 10))):  # ten sends a second
        chunk = messages[k:k + max(1, int(rate // 10))]
        publish(bootstrap, topic, chunk)
        ahead = (k + len(chunk)) / rate - (time.monotonic() - start)
        if ahead > 0:
            time.sleep(ahead)


def run(args) -> dict:
    work = Path(tempfile.mkdtemp(prefix="catalogue-bench-")) if args.work_dir is None else args.work_dir
    wl = sb.load_workload(args.events + int(args.load_s * 2000))
    enc = encoder()
    repo, ck = repository(work, wl, enc)
    res: dict = {"machine": {"cpu": cpu_model(), "cores": os.cpu_count(), "python": platform.python_version(),
                             "torch": torch.__version__},
                 "encoder": enc.name, "model": "persrec K=8, recent 50, folds of 25, dim 50, items by text",
                 "code": code_commit()}
    db = work / "catalogue.db"
    db_url = f"sqlite:///{db}"
    migrate(db_url)
    with EmbeddedTriton(repo, ["recommend", "fold", "encode_items"], work / "triton",
                        env={"PERSREC_DATABASE_URL": db_url}) as triton:
        encoder_pid = sb.model_stub(triton.pid, "encode_items")

        def worker_on(kafka, label: str, backlog: list[dict]):
            s = sb.make_settings(work, kafka.bootstrap_servers, triton, repo, label, database_url=db_url)
            sb.topics_for(s)
            if backlog:
                sb.produce(kafka.bootstrap_servers, s.topic_interactions, backlog)
            return s, WorkerProcess(s, work / f"{s.app_id}.log", label).start()

        # 1. drain
        with sb.fresh_broker(work, "drain") as kafka:
            s, worker = worker_on(kafka, "drain", wl.events[:args.events])
            try:
                sb.wait_count(kafka.bootstrap_servers, s.topic_recommendations, s.partitions, args.events, args.limit_s)
                worker.stop()
                rate = sb.drain_rate(whole_topic(kafka.bootstrap_servers, s.topic_recommendations))
            finally:
                worker.stop()
        res["drain_events_per_s"] = round(rate, 1)
        log.info("drain: %.0f events/s", rate)

        # 2. items under load
        target = rate / 2
        events = [dict(e, event_id=f"l-{k}") for k, e in enumerate(wl.events[args.events:][:int(target * args.load_s)])]
        items = new_items(args.items, "new-")
        with sb.fresh_broker(work, "load") as kafka:
            s, worker = worker_on(kafka, "load", [])
            boot = kafka.bootstrap_servers
            try:
                feeder = threading.Thread(target=sb.produce, args=(boot, s.topic_interactions, events, target))
                feeder.start()
                time.sleep(min(3.0, args.load_s / 4))  # the items start once events flow
                publish_paced(boot, s.topic_items, items, args.item_rate)
                feeder.join()
                sb.wait_count(boot, s.topic_recommendations, s.partitions, len(events), 120)
                deadline = time.monotonic() + 60
                while (worker.status().get("catalogue") or {}).get("registered", 0) < args.items and time.monotonic() < deadline:
                    time.sleep(0.5)
                # the probe: a new user whose only item is the last new item
                last = items[-1][0].decode()
                publish(boot, s.topic_interactions, [(b"probe-user", json.dumps(
                    {"user_id": "probe-user", "item_id": last, "ts": time.time(), "event_id": "probe"}).encode())])
                sb.wait_count(boot, s.topic_recommendations, s.partitions, len(events) + 1, 60)
                outs = whole_topic(boot, s.topic_recommendations)
                ins = whole_topic(boot, s.topic_interactions)
                published = len(whole_topic(boot, s.topic_items))
                status = worker.status()
            finally:
                worker.stop()
        rows = {r.item_id for r in SqlCatalogue(db_url).since(ck.model_version)}
        probe = next((json.loads(r.value) for r in outs if json.loads(r.value)["event_id"] == "probe"), None)
        ev_lat = sb.latency_ms(ins, [r for r in outs if json.loads(r.value)["event_id"].startswith("l-")])
        res["items_under_load"] = {
            "events_per_s": round(target, 1), "items": args.items, "item_rate": args.item_rate,
            "published": published, "registered": len(rows),
            "recommendable_ms": status.get("item_latency"),
            "event_latency": sb.quantiles(ev_lat[:, 1]) if len(ev_lat) else {},
            "probe_read_the_new_item": bool(probe and probe["window"] == 1),
            "worker_items_s": status.get("seconds_items"),
        }
        log.info("items under load: %s", res["items_under_load"])

        # 3. registration cost
        with sb.fresh_broker(work, "bulk") as kafka:
            s, worker = worker_on(kafka, "bulk", [])
            try:
                group = group_members(worker.pid)
                time.sleep(2)
                c0, t0 = sb.cpu_seconds(group), time.monotonic()
                time.sleep(5)
                idle_rate = (sb.cpu_seconds(group) - c0) / (time.monotonic() - t0)
                bulk = new_items(args.bulk, "bulk-")
                before = worker.status()["catalogue"]["registered"]
                c0, e0, t0 = sb.cpu_seconds(group), sb.cpu_seconds([encoder_pid]), time.monotonic()
                publish(kafka.bootstrap_servers, s.topic_items, bulk)
                while worker.status()["catalogue"]["registered"] < before + args.bulk and time.monotonic() - t0 < 600:
                    time.sleep(0.2)
                secs = time.monotonic() - t0
                cpu, enc_cpu = sb.cpu_seconds(group) - c0, sb.cpu_seconds([encoder_pid]) - e0
                done = worker.status()["catalogue"]["registered"] - before
            finally:
                worker.stop()
        res["registration"] = {"items": args.bulk, "registered": done, "wall_s": round(secs, 2),
                               "worker_cpu_s": round(cpu, 2), "worker_idle_cpu_s": round(idle_rate * secs, 2),
                               "worker_cpu_s_beyond_idle": round(cpu - idle_rate * secs, 2),
                               "encoder_cpu_s": round(enc_cpu, 2)}
        log.info("registration: %s", res["registration"])
    return res


def markdown(res: dict) -> str:
    u, r = res["items_under_load"], res["registration"]
    q = u["recommendable_ms"]
    return "\n".join([
        "# Item catalogue benchmark", "",
        f"`benchmarks/catalogue_bench.py` on {res['machine']['cpu']} ({res['machine']['cores']} cores), "
        f"encoder {res['encoder']}, model {res['model']}; code {res['code'] or 'unrecorded'}.", "",
        f"Drain rate of the model: {res['drain_events_per_s']} events/s.", "",
        "| measure | value |", "|---|---|",
        f"| events/s during the item phase (half the drain) | {u['events_per_s']} |",
        f"| items published / registered | {u['items']} at {u['item_rate']}/s / {u['registered']} |",
        f"| publish -> recommendable, p50 / p99 | {_ms(q.get('p50_ms'))} / {_ms(q.get('p99_ms'))} ms |",
        f"| event -> recommendation meanwhile, p50 / p99 | {u['event_latency'].get('p50_ms')} / {u['event_latency'].get('p99_ms')} ms |",
        f"| probe: a new user's only item, the newest item, read | {u['probe_read_the_new_item']} |",
        f"| registering {r['items']} items at once: wall | {r['wall_s']} s |",
        f"| ... worker CPU beyond idle (encoder excluded) | {r['worker_cpu_s_beyond_idle']} s ({r['worker_cpu_s']} s, idle {r['worker_idle_cpu_s']} s) |",
        f"| ... encoder CPU (Triton encode_items) | {r['encoder_cpu_s']} s |",
        "",
    ])


def _ms(v) -> str:
    return "-" if v is None else f"{v:.0f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--events", type=int, default=10_000, help="backlog of the drain")
    ap.add_argument("--limit-s", type=float, default=60.0)
    ap.add_argument("--load-s", type=float, default=30.0, help="seconds of events at half the drain rate")
    ap.add_argument("--items", type=int, default=1000, help="items published under load")
    ap.add_argument("--item-rate", type=float, default=50.0)
    ap.add_argument("--bulk", type=int, default=10_000, help="items of the registration-cost phase")
    ap.add_argument("--out", type=Path, default=sb.RESULTS)
    ap.add_argument("--work-dir", type=Path, default=None)
    args = ap.parse_args()
    if args.quick:
        args.events, args.load_s, args.items, args.item_rate, args.bulk = 2000, 10.0, 100, 20.0, 500
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    res = run(args)
    (args.out / "catalogue_bench.json").write_text(json.dumps(res, indent=2))
    md = markdown(res)
    (args.out / "catalogue_bench.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
