"""Streaming benchmark (issue 6): the pipeline against the pass-through limit and against
full-history serving, measured side by side in one run on real services (noida-db broker,
tritonserver, SQLite, real ``persrec worker`` processes).

    .venv/bin/python benchmarks/stream_bench.py                  # everything (~15 min on 2 cores)
    .venv/bin/python benchmarks/stream_bench.py --quick          # small sizes, a smoke run
    .venv/bin/python benchmarks/stream_bench.py --profile        # + py-spy of the worker

Phases, each on its own topics and consumer group:
1. pass-through: a Faust app configured like the worker (``stream.pipeline.create_app``) whose agent
   reads ``interactions`` and writes one message per event;
2. PerSRec pipeline (memory K=8 + recent window 50, recompress policy): max events/s, then
   event -> recommendation latency at 25/50/90% of that max, fold throughput and backlog;
3. full-history baseline: the same pipeline serving an HSTU without memory that reads the
   user's whole history (the last L events, L = 200 / 1,000 / 2,000) for every event;
4. pairs: PerSRec and L=200 drains back to back, ``--pairs`` times, for the ratio of each pair
   (the machine's speed drifts over a full run; phases 2 and 3 are minutes apart);
5. cache (only when named in ``--phases``): PerSRec drains without and with the recommend
   model's window cache (``serving.window_cache``), back to back, ``--pairs`` times.

Workload: real ml-latest-small events in time order (all 610 users). Before each pipeline
phase every user is given L prior events (items drawn from the catalogue by popularity), as
state restored from the window table's changelog, and for PerSRec a memory of them in the DB,
computed with the served model: so both pipelines start in the steady state of users with
long histories. Models have random weights (cost does not depend on them) with the published
ML-1M shape (2 blocks, width 50). Throughput = events answered per second while a backlog is
drained (rate between the 10th and 90th percentile of output times); latency = output record
time - input record time (both CreateTime on this host) for events produced at a fixed rate.

Results: ``benchmarks/results/stream_bench.{json,md,png}``.
"""

from __future__ import annotations

import argparse
import collections
import json
import logging
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
import uuid
import zlib
from dataclasses import dataclass
from pathlib import Path

import confluent_kafka
import numpy as np
import torch
from kafka import KafkaConsumer, KafkaProducer, TopicPartition

from persrec.embedded._proc import free_ports, group_members
from persrec.embedded.kafka import EmbeddedKafka, create_topics
from persrec.embedded.triton import EmbeddedTriton
from persrec.memory import MemoryRecord, SqlMemoryStore, migrate
from persrec.models.inputs import ModelInputs
from persrec.serving import window_cache
from persrec.models.checkpoint import make_checkpoint
from persrec.models.config import ModelConfig
from persrec.models.data import build_sequences, data_dir
from persrec.models.logs import load_interactions
from persrec.models.loss import build_model
from persrec.replay import events_in_time_order
from persrec.serving.export import export_repository
from persrec.serving.inference import ModelRunner
from persrec.settings import Settings
from persrec.stack import WorkerProcess, get_json, settings_env
from persrec.stream.window import Window
from persrec.stream.window import encode as encode_window
from persrec.testing.machine import cpu_model
from persrec.testing.pipeline import whole_topic

log = logging.getLogger("stream_bench")
ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
DEFAULT_LENGTHS = "200,1000,2000"
WARM_S = 3.0  # seconds of traffic at a load level's rate before its latencies count


# ----------------------------------------------------------------------------- workload
@dataclass
class Workload:
    events: list[dict]  # real events, time order
    users: list[str]
    popular: np.ndarray  # original item ids, sampled by popularity for seeded histories
    weights: np.ndarray
    first_ts: int
    id_map: object

    def history(self, user: str, length: int) -> tuple[list[str], list[int]]:
        """``length`` prior items for ``user`` (deterministic per user), older than every event."""
        rng = np.random.default_rng(zlib.crc32(user.encode()))
        items = rng.choice(self.popular, size=length, p=self.weights).tolist()
        ts = [self.first_ts - 60 * (length - i) for i in range(length)]
        return items, ts


def load_workload(n_events: int) -> Workload:
    inter = load_interactions(data_dir() / "ml-latest-small" / "ratings.csv")
    _, id_map = build_sequences(inter)
    events = list(events_in_time_order(inter, n_events))
    items, counts = np.unique(inter.items.astype(str), return_counts=True)
    return Workload(events, sorted({str(u) for u in inter.users}), items, counts / counts.sum(),
                    min(e["ts"] for e in events), id_map)


def model_repository(work: Path, wl: Workload, *, memory: bool, max_len: int,
                     window_cache_mb: float = 256) -> tuple[Path, object]:
    cfg = ModelConfig(num_items=wl.id_map.num_items, dim=50, num_layers=2, num_heads=1, head_dim=50,
                      max_len=max_len, recent_len=50, segment_len=25, num_memory_tokens=8 if memory else 0,
                      dropout=0.0)  # folds of 25: windows of 50-74 items
    torch.manual_seed(0)
    ck = make_checkpoint(build_model(cfg), wl.id_map.to_json())
    repo = work / f"repo-{'persrec' if memory else f'full{max_len}'}-cache{window_cache_mb:g}"
    manifest = export_repository(ck, repo, top_k=10, window_cache_mb=window_cache_mb, window_cache_metrics=True)
    return repo, (ck, manifest)


# ------------------------------------------------------------------------------ helpers
def produce(bootstrap: str, topic: str, events: list[dict], rate: float | None = None) -> float:
    """Publish events keyed by user id (at ``rate``/s, or as fast as possible); returns seconds.

    librdkafka (confluent-kafka), not kafka-python: the load generator shares the two cores with
    the pipeline, and kafka-python's paced producer used 0.11-0.19 CPU ms per event, a fifth of
    what the whole pipeline used at the 50% level. ``murmur2_random`` is the Java client's (and
    kafka-python's) partitioner, so each user's events land where ``seed_state`` put the user's
    window. Paced events leave on 1 ms ticks (the ones due by then), so the generator does not
    wake once per event."""
    producer = confluent_kafka.Producer({"bootstrap.servers": bootstrap, "acks": "all", "linger.ms": 5,
                                         "partitioner": "murmur2_random", "log_level": 3})
    failed: list[str] = []

    def delivered(err, _msg) -> None:
        if err is not None:
            failed.append(str(err))

    messages = [(e["user_id"].encode(), json.dumps(e).encode()) for e in events]
    start = time.monotonic()
    for k, (key, value) in enumerate(messages):
        while True:
            try:
                producer.produce(topic, value=value, key=key, on_delivery=delivered)
                break
            except BufferError:  # librdkafka's queue is full: let it send
                producer.poll(0.01)
        if rate:
            ahead = (k + 1) / rate - (time.monotonic() - start)
            if ahead > 0.001:
                producer.poll(0)
                time.sleep(ahead)
    if producer.flush(60) or failed:
        raise RuntimeError(f"events not delivered to {topic}: {len(producer)} queued, {failed[:3]}")
    return time.monotonic() - start


def end_offsets(bootstrap: str, topic: str, partitions: int) -> int:
    c = KafkaConsumer(bootstrap_servers=bootstrap)
    try:
        return sum(c.end_offsets([TopicPartition(topic, p) for p in range(partitions)]).values())
    finally:
        c.close()


def wait_count(bootstrap: str, topic: str, partitions: int, target: int, limit_s: float,
               sample=None) -> float:
    """Wait until ``topic`` holds ``target`` messages or ``limit_s`` passed; returns seconds.
    ``sample(count)`` is called with the topic's message count at every poll."""
    start = time.monotonic()
    while time.monotonic() - start < limit_s:
        count = end_offsets(bootstrap, topic, partitions)
        if sample is not None:
            sample(count)
        if count >= target:
            break
        time.sleep(0.5)
    return time.monotonic() - start


def drain_rate(records: list) -> float:
    """Messages per second between the 10th and the 90th percentile of their record times."""
    ts = np.sort(np.array([r.timestamp for r in records], float)) / 1000
    if len(ts) < 20:
        return float("nan")
    lo, hi = np.percentile(ts, [10, 90])
    inside = np.count_nonzero((ts >= lo) & (ts <= hi))
    return inside / max(hi - lo, 1e-9)


def latency_ms(inputs: list, outputs: list) -> np.ndarray:
    """[n, 2]: input record time (ms) and its latency, per output message."""
    created = {(r.partition, r.offset): r.timestamp for r in inputs}
    lat = []
    for r in outputs:
        src = json.loads(r.value)["event"]
        t0 = created.get((src["partition"], src["offset"]))
        if t0 is not None:
            lat.append((t0, r.timestamp - t0))
    return np.array(lat, float).reshape(-1, 2)


def quantiles(a: np.ndarray) -> dict:
    if not len(a):
        return {}
    p = np.percentile(a, [50, 95, 99])
    return {"p50_ms": round(p[0], 1), "p95_ms": round(p[1], 1), "p99_ms": round(p[2], 1), "n": int(len(a))}


def rss_mb(pid: int | None) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except (OSError, TypeError):
        return None
    return None


class Profiler:
    """py-spy on a process for a while (raw collapsed stacks); summarised by own time."""

    def __init__(self, pid: int, seconds: float, out: Path) -> None:
        self.out = out
        self.proc = subprocess.Popen(
            [str(Path(sys.executable).parent / "py-spy"), "record", "--pid", str(pid), "--duration",
             str(int(seconds)), "--rate", "200", "--format", "raw", "--output", str(out), "--nonblocking"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def summary(self, top: int = 25) -> list[tuple[str, float]]:
        self.proc.wait(timeout=120)
        own, total = collections.Counter(), 0
        for line in self.out.read_text().splitlines() if self.out.is_file() else []:
            stack, _, count = line.rpartition(" ")
            n = int(count)
            total += n
            own[stack.split(";")[-1]] += n
        return [(frame, round(100 * n / total, 1)) for frame, n in own.most_common(top)]


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU seconds the live processes ``pids`` have used so far."""
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15 of stat)
    return total / os.sysconf("SC_CLK_TCK")


class CpuMeter:
    """CPU seconds per process group, sampled with the output count during a drain; reports
    CPU milliseconds per output message between the 10% and 90% marks (startup excluded)."""

    def __init__(self, groups: dict[str, list[int]]) -> None:
        self.groups = groups
        self.samples: list[tuple[float, int, dict[str, float]]] = []

    def sample(self, count: int) -> None:
        self.samples.append((time.monotonic(), count, {k: cpu_seconds(v) for k, v in self.groups.items()}))

    def per_event_ms(self, target: int, lo: float = 0.1, hi: float = 0.9) -> dict[str, float] | None:
        inside = [s for s in self.samples if lo * target <= s[1] <= hi * target]
        if len(inside) < 2 or inside[-1][1] == inside[0][1]:
            return None
        (t0, n0, c0), (t1, n1, c1) = inside[0], inside[-1]
        out = {k: round(1000 * (c1[k] - c0[k]) / (n1 - n0), 3) for k in self.groups}
        out["all"] = round(sum(out.values()), 3)
        out["cores_busy"] = round(sum(c1[k] - c0[k] for k in self.groups) / (t1 - t0), 2)
        return out


def window_cache_metrics(triton: EmbeddedTriton) -> dict[str, float]:
    """The recommend model's window cache counters (serving.window_cache)."""
    return window_cache.metrics_stats(triton.metrics(window_cache.METRICS))


def model_stub(server_pid: int, model: str) -> int:
    """pid of the python-backend process that runs ``model`` for this tritonserver."""
    for pid in group_members(server_pid):
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        if any(f"/{model}/".encode() in a and a.endswith(b"/model.py") for a in argv):
            return pid
    raise RuntimeError(f"no python-backend process for {model} under tritonserver {server_pid}")


# ---------------------------------------------------------------------------- seeding
def seed_state(settings: Settings, wl: Workload, history_len: int, ck, manifest) -> None:
    """Give every user ``history_len`` prior events: the window table's changelog (what a
    worker restores its table from) and, for a memory model, the memory of all but the last
    ``recent_len`` of them in the database (as the pipeline's own folds would leave it)."""
    changelog = f"{settings.app_id}-windows-changelog"
    create_topics(settings.kafka_bootstrap, {changelog: settings.partitions})
    migrate(settings.resolved_database_url)
    keep = manifest.recent_len if manifest.has_memory else manifest.window_len
    producer = KafkaProducer(bootstrap_servers=settings.kafka_bootstrap, acks="all", linger_ms=20)
    records = []
    runner = ModelRunner(ck, "cpu") if manifest.has_memory else None
    for start in range(0, len(wl.users), 128):
        chunk = wl.users[start:start + 128]
        hist = [wl.history(u, history_len) for u in chunk]
        for u, (items, ts) in zip(chunk, hist):
            window = Window(history_len, items[-keep:], ts[-keep:])
            producer.send(changelog, key=u.encode(), value=encode_window(window))
        if runner is None:
            continue
        folded = [items[: history_len - keep] for items, _ in hist]
        dense = [wl.id_map.encode(f[-manifest.history_len:]).astype(np.int64) for f in folded]
        mem = runner.fold(ModelInputs.of_rows(dense, memory=np.zeros((len(dense), *manifest.memory_shape), np.float32),
                                              has_memory=np.zeros(len(dense), bool)))
        records += [MemoryRecord(u, manifest.model_version, mem[i], history_len - keep, history_len - keep, dense[i])
                    for i, u in enumerate(chunk)]
    producer.flush()
    producer.close()
    if records:
        SqlMemoryStore(settings.resolved_database_url, storage_dtype=settings.storage_dtype).put_many(records)


def state_bytes(settings: Settings, manifest, tail: int = 200) -> dict:
    """Mean stored bytes per user: window (latest changelog value per user, read from the last
    ``tail`` records of each changelog partition: the whole log can exceed a fetch, as the
    broker returns it in one frame) and memory row payload."""
    changelog = f"{settings.app_id}-windows-changelog"
    c = KafkaConsumer(bootstrap_servers=settings.kafka_bootstrap, enable_auto_commit=False,
                      consumer_timeout_ms=2000)
    latest: dict = {}
    try:
        parts = [TopicPartition(changelog, p) for p in range(settings.partitions)]
        c.assign(parts)
        ends = c.end_offsets(parts)
        for tp in parts:
            c.seek(tp, max(ends[tp] - tail, 0))
        for r in c:
            latest[r.key] = len(r.value or b"")
            if all(c.position(tp) >= ends[tp] for tp in parts):
                break
    finally:
        c.close()
    out = {"window_bytes": round(float(np.mean(list(latest.values()))), 1) if latest else None}
    if manifest.has_memory:
        stats = SqlMemoryStore(settings.resolved_database_url).stats()
        out["memory_bytes"] = round(stats.bytes / max(stats.rows, 1), 1)
    out["total_bytes"] = round(sum(v for v in out.values() if v), 1)
    return out


# ----------------------------------------------------------------------------- phases
def make_settings(work: Path, bootstrap: str, triton: EmbeddedTriton | None, repo: Path | None,
                  name: str, **overrides) -> Settings:
    tag = f"{name}-{uuid.uuid4().hex[:6]}"
    api_port, web_port = free_ports(2)
    base = dict(app_id=f"bench-{tag}", kafka_bootstrap=bootstrap, topic_interactions=f"in-{tag}",
                topic_recommendations=f"out-{tag}", topic_dlq=f"dlq-{tag}", partitions=4,
                work_dir=work / tag, api_port=api_port, worker_web_port=web_port)
    if triton is not None:
        base |= dict(triton_grpc_url=triton.grpc_url, model_repository=repo)
    return Settings(**(base | overrides))


def topics_for(s: Settings) -> None:
    create_topics(s.kafka_bootstrap, {s.topic_interactions: s.partitions,
                                      s.topic_recommendations: s.partitions, s.topic_dlq: s.partitions})


def fresh_broker(work: Path, label: str) -> EmbeddedKafka:
    """A new broker for one measurement. noida-db spends CPU in the background in proportion to
    the data it holds (idle: 0.15 / 0.29 / 0.41 cores with 25 / 50 / 75 MB written), so on one
    broker each phase and load level would pay for the messages of all before it."""
    return EmbeddedKafka(work / f"kafka-{label}")


def phase_passthrough(work: Path, wl: Workload, n: int, limit_s: float) -> dict:
    with fresh_broker(work, "pass") as kafka:
        return _passthrough(work, kafka.bootstrap_servers, kafka.pid, wl, n, limit_s)


def _passthrough(work: Path, bootstrap: str, kafka_pid: int, wl: Workload, n: int, limit_s: float) -> dict:
    s = make_settings(work, bootstrap, None, None, "pass")
    s.work_dir.mkdir(parents=True)
    topics_for(s)
    produce(bootstrap, s.topic_interactions, wl.events[:n])
    env = dict(os.environ) | settings_env(s)
    logf = open(work / f"{s.app_id}.log", "w")
    proc = subprocess.Popen([sys.executable, __file__, "passthrough-worker"], env=env, stdout=logf,
                            stderr=subprocess.STDOUT, start_new_session=True)
    try:
        meter = CpuMeter({"faust app": group_members(proc.pid), "broker": group_members(kafka_pid),
                          "bench": [os.getpid()]})
        secs = wait_count(bootstrap, s.topic_recommendations, s.partitions, n, limit_s, meter.sample)
        out = whole_topic(bootstrap, s.topic_recommendations)
    finally:
        proc.terminate()
        proc.wait(60)
        logf.close()
    rate = drain_rate(out)
    cpu = meter.per_event_ms(n)
    log.info("pass-through: %d/%d messages, %.0f msg/s, CPU ms/event %s", len(out), n, rate, cpu)
    return {"events": len(out), "events_per_s": round(rate, 1), "wall_s": round(secs, 1), "cpu_ms_per_event": cpu}


def phase_pipeline(work: Path, wl: Workload, *, memory: bool, max_len: int, history_len: int, n: int,
                   limit_s: float, loads: list[float], load_s: float, profile: bool,
                   load_base: float | None = None, window_cache_mb: float = 256) -> dict:
    """The drain, then each load level, each on a fresh broker with freshly seeded state (see
    ``fresh_broker``), all against one Triton. ``window_cache_mb``: the recommend model's window
    cache (``serving.window_cache``; PerSRec only), 0 = off."""
    repo, (ck, manifest) = model_repository(work, wl, memory=memory, max_len=max_len, window_cache_mb=window_cache_mb)
    name = ("persrec" if memory else f"full{max_len}") + ("" if window_cache_mb or not memory else "-nocache")
    models = ["recommend", "fold"] if memory else ["recommend"]
    # a batch holds at most ~51,200 items, so long histories do not blow up attention memory
    max_batch = max(8, min(256, 51_200 // manifest.window_len))
    row: dict = {"history": history_len, "max_batch": max_batch, "window_len": manifest.window_len}
    with EmbeddedTriton(repo, models, work / f"triton-{name}") as triton:
        stubs = {m: model_stub(triton.pid, m) for m in models}

        def pipeline(kafka: EmbeddedKafka, label: str, backlog: list[dict]):
            s = make_settings(work, kafka.bootstrap_servers, triton, repo, f"{name}-{label}", max_batch=max_batch)
            topics_for(s)
            seed_state(s, wl, history_len, ck, manifest)
            produce(kafka.bootstrap_servers, s.topic_interactions, backlog)
            worker = WorkerProcess(s, work / f"{s.app_id}.log", name)
            worker.start()
            meter = CpuMeter({"worker": group_members(worker.pid), "triton server": [triton.pid],
                              **{f"triton {m} model": [pid] for m, pid in stubs.items()},
                              "broker": group_members(kafka.pid), "bench": [os.getpid()]})
            return s, worker, meter

        with fresh_broker(work, f"{name}-drain") as kafka:
            bootstrap = kafka.bootstrap_servers
            s, worker, meter = pipeline(kafka, "drain", wl.events[:n])
            try:
                samples = []

                def sample(count: int) -> None:
                    meter.sample(count)
                    st = worker.status()
                    samples.append((time.monotonic(), st.get("folds", 0), st.get("fold_backlog", 0)))

                prof = stub = None
                if profile:
                    prof = Profiler(worker.pid, min(limit_s, 20), work / f"profile-{name}.txt")
                    stub = Profiler(stubs["recommend"], min(limit_s, 12), work / f"profile-{name}-triton.txt")
                secs = wait_count(bootstrap, s.topic_recommendations, s.partitions, n, limit_s, sample)
                st = worker.status()
                row["status"] = {k: st.get(k) for k in ("batches", "seconds_model", "seconds_publish", "folds",
                                                        "offset_rewinds", "duplicates")}
                row["rss_mb"] = {"worker": rss_mb(worker.pid), "triton": rss_mb(triton.pid)}
                if memory:  # the recommend model's window cache over the drain (serving.window_cache)
                    row["window_cache"] = window_cache_metrics(triton)
                # Stopped before its output is read back: a long-history pipeline is still draining
                # after limit_s, and the reader would take a core from it (the rate counts the
                # output times of what was answered).
                worker.stop()
                out = whole_topic(bootstrap, s.topic_recommendations)
                rate = drain_rate(out)
                row |= {"events": len(out), "events_per_s": round(rate, 1), "wall_s": round(secs, 1),
                        "cpu_ms_per_event": meter.per_event_ms(n)}
                read = np.array([json.loads(r.value)["window"] for r in out])
                if len(read):  # items the model read beside the memory (folds lagging make it longer)
                    row["window_read"] = {"p50": float(np.percentile(read, 50)), "p99": float(np.percentile(read, 99)),
                                          "max": int(read.max())}
                if prof is not None:
                    row["profile_own_pct"] = prof.summary()
                    row["profile_triton_recommend_own_pct"] = stub.summary()
                if memory and len(samples) > 2:
                    t, f, b = map(np.array, zip(*samples))
                    row["folds_per_s"] = round(float((f[-1] - f[0]) / max(t[-1] - t[0], 1e-9)), 1)
                    row["fold_backlog_max"] = int(b.max())
                log.info("%s: %d/%d events, %.0f ev/s, CPU ms/event %s", name, len(out), n, rate, row["cpu_ms_per_event"])
            finally:
                worker.stop()
            row["state"] = state_bytes(s, manifest)

        # Latency at fixed fractions of the measured maximum: real events after the drained ones,
        # after WARM_S of the same rate (a fresh worker's first batches load every memory).
        extra, offset, lat_rows = (wl.events[n:] + wl.events[:n]) * 3, 0, []
        for frac in loads:
            target = (load_base or rate) * frac
            warm, count = int(target * WARM_S), int(target * load_s)
            chunk = extra[offset:offset + warm + count]
            offset += warm + count
            evs = [dict(e, event_id=f"{'w' if k < warm else 'l'}{frac}-{k}") for k, e in enumerate(chunk)]
            with fresh_broker(work, f"{name}-{frac}") as kafka:
                bootstrap = kafka.bootstrap_servers
                s, worker, meter = pipeline(kafka, f"l{frac}", [])
                try:
                    produce(bootstrap, s.topic_interactions, evs[:warm], rate=target)
                    wait_count(bootstrap, s.topic_recommendations, s.partitions, warm, 60)
                    prof = (Profiler(worker.pid, min(load_s, 20), work / f"profile-{name}-{frac}.txt")
                            if profile and frac == 0.5 else None)
                    meter.sample(0)  # "bench" now includes the paced producer
                    produce(bootstrap, s.topic_interactions, evs[warm:], rate=target)
                    wait_count(bootstrap, s.topic_recommendations, s.partitions, warm + count, 120)
                    meter.sample(count)
                    outs = [r for r in whole_topic(bootstrap, s.topic_recommendations)
                            if json.loads(r.value)["event_id"].startswith(f"l{frac}-")]
                    ins = whole_topic(bootstrap, s.topic_interactions)
                finally:
                    worker.stop()
            lat = latency_ms(ins, outs)
            np.save(work / f"latency-{name}-{frac}.npy", lat)
            q = quantiles(lat[:, 1])
            lat_rows.append({"load": frac, "rate": round(target, 1), **q,
                             "cpu_ms_per_event": meter.per_event_ms(count, 0.0, 1.0)})
            if prof is not None:
                lat_rows[-1]["profile_own_pct"] = prof.summary()
            if memory:  # counted since the Triton started (the drain's, and earlier levels', included)
                lat_rows[-1]["window_cache_so_far"] = window_cache_metrics(triton)
            log.info("%s at %.0f%% (%.0f ev/s): %s; CPU ms/event %s", name, 100 * frac, target, q,
                     lat_rows[-1]["cpu_ms_per_event"])
        if lat_rows:
            row["latency"] = lat_rows
    return row


# -------------------------------------------------------------------------- reporting
def markdown(res: dict) -> str:
    if "passthrough" not in res or "persrec" not in res:
        return "Partial run: the table needs the passthrough and persrec phases (see the JSON).\n"
    p, m = res["passthrough"], res["persrec"]
    lines = [
        f"Machine: {res['machine']}; {res['date']}; command: `{res['command']}`", "",
        "| pipeline | events/s | vs pass-through | vs full-history | bytes/user |",
        "|---|---|---|---|---|",
        f"| pass-through (read + write one message) | {p['events_per_s']:,.0f} | 1.00 | | |",
        f"| PerSRec (K=8 memory + window 50) | {m['events_per_s']:,.0f} | {m['events_per_s'] / p['events_per_s']:.2f} | | "
        f"{m['state']['total_bytes']:,.0f} |",
    ]
    for L in res["lengths"]:
        f = res.get(f"full{L}")
        if f is None:
            continue
        lines.append(f"| full-history HSTU, L={L:,} | {f['events_per_s']:,.1f} | {f['events_per_s'] / p['events_per_s']:.3f} | "
                     f"PerSRec {m['events_per_s'] / f['events_per_s']:.1f}x | {f['state']['total_bytes']:,.0f} |")
    lines += ["", "| PerSRec load | events/s | p50 ms | p95 ms | p99 ms | events | CPU ms/event | cores busy |",
              "|---|---|---|---|---|---|---|---|"]
    for r in m.get("latency", []):
        cpu = r.get("cpu_ms_per_event") or {}
        lines.append(f"| {100 * r['load']:.0f}% | {r['rate']:,.0f} | {r.get('p50_ms')} | {r.get('p95_ms')} | {r.get('p99_ms')} | "
                     f"{r.get('n')} | {cpu.get('all')} | {cpu.get('cores_busy')} |")
    lines += ["", "CPU milliseconds per event by process (drains between the 10% and 90% marks; load levels "
              "over the level, the paced producer in `bench`):", ""]
    rows = [("pass-through drain", p), ("PerSRec drain", m)]
    rows += [(f"PerSRec {100 * r['load']:.0f}% load", r) for r in m.get("latency", [])]
    rows += [(f"full history L={L:,} drain", res[f"full{L}"]) for L in res["lengths"] if f"full{L}" in res]
    procs = list(dict.fromkeys(k for _, r in rows for k in (r.get("cpu_ms_per_event") or {})
                               if k not in ("all", "cores_busy"))) + ["all", "cores_busy"]
    lines += ["| run | " + " | ".join(procs) + " |", "|---" * (len(procs) + 1) + "|"]
    for label, r in rows:
        cpu = r.get("cpu_ms_per_event") or {}
        lines.append(f"| {label} | " + " | ".join(str(cpu.get(k, "")) for k in procs) + " |")
    lines += ["", f"Folds: {m.get('folds_per_s')} memories/s during the drain, backlog at most {m.get('fold_backlog_max')} users."]
    read = m.get("window_read")
    if read:
        lines.append(f"Items read beside the memory per request during the drain: p50 {read['p50']:.0f}, "
                     f"p99 {read['p99']:.0f}, max {read['max']} (recent_len 50, fold every 25).")
    if pairs := res.get("pairs"):
        each = []
        for r in pairs["runs"]:
            rewinds = f" with {r['persrec_rewinds']} PerSRec rewinds" if r.get("persrec_rewinds") else ""
            each.append(f"{r['persrec']:,.0f} / {r['full200']:,.0f} = {r['ratio']:.2f}x{rewinds}")
        command = f"; `{pairs['command']}`, {pairs['date']}" if "command" in pairs else ""
        lines.append(f"PerSRec / full history at L=200 over {len(each)} back-to-back pairs of drains: "
                     f"median {pairs['median_ratio']:.2f}x ({', '.join(each)}{command}).")
    if cache := res.get("cache"):
        def hit_rate(r: dict) -> str:
            c = r.get("window_cache") or {}
            return f", {c['hits'] / max(c['hits'] + c['misses'], 1):.0%} hits" if "hits" in c else ""

        each = [f"{r['off']:,.0f} -> {r['on']:,.0f} ev/s ({r['ratio']:.2f}x; recommend model "
                f"{r['recommend_cpu_ms_off']} -> {r['recommend_cpu_ms_on']} CPU ms/event, all "
                f"{r['cpu_ms_off']} -> {r['cpu_ms_on']}{hit_rate(r)})" for r in cache["runs"]]
        lines.append(f"PerSRec drains without -> with the window cache, {len(each)} back-to-back pairs: median "
                     f"{cache['median_ratio']:.2f}x ({'; '.join(each)}; `{cache.get('command')}`, {cache.get('date')}).")
    rewinds = {k: res[k]["status"].get("offset_rewinds") for k in ["persrec"] + [f"full{L}" for L in res["lengths"]]
               if (res.get(k) or {}).get("status", {}).get("offset_rewinds")}
    if rewinds:  # Faust's startup race (BENCHMARKS.md): the drain re-read what it lost, at a cost
        lines.append(f"Offset rewinds during the drain (the worker re-read partitions it lost events of): {rewinds}.")
    apart = [f"{k} (`{res[k]['command']}`, {res[k]['date']})" for k in ["passthrough", "persrec"] +
             [f"full{L}" for L in res["lengths"]] if res.get(k, {}).get("command", res["command"]) != res["command"]]
    if apart:
        lines.append("Run separately: " + "; ".join(apart) + ".")
    st = m.get("state", {})
    lines.append(f"PerSRec state per user: window {st.get('window_bytes')} B (changelog value) + "
                 f"memory row {st.get('memory_bytes')} B.")
    return "\n".join(lines) + "\n"


def plot(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    m = res["persrec"]
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    lat = m.get("latency", [])
    if lat:
        a.plot([r["rate"] for r in lat], [r["p99_ms"] for r in lat], "o-", label="p99")
        a.plot([r["rate"] for r in lat], [r["p50_ms"] for r in lat], "s--", label="p50")
        a.set_xlabel("offered load (events/s)")
        a.set_ylabel("event -> recommendation (ms)")
        a.set_title(f"PerSRec pipeline (max {m['events_per_s']:,.0f} ev/s)")
        a.legend()
    Ls = [L for L in res["lengths"] if f"full{L}" in res]
    b.plot(Ls, [res[f"full{L}"]["events_per_s"] for L in Ls], "o-", label="full-history HSTU")
    b.plot(Ls, [m["events_per_s"]] * len(Ls), "s--", label="PerSRec (memory + recent)")
    b.axhline(res["passthrough"]["events_per_s"], color="grey", lw=0.8, label="pass-through")
    b.set_xlabel("user history length")
    b.set_ylabel("events/s (one recommendation each)")
    b.set_yscale("log")
    b.set_title("Throughput vs history length")
    b.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


# ------------------------------------------------------------------------------ main
def passthrough_worker() -> None:
    """The pass-through Faust app (run in its own process by phase 1)."""
    import faust

    from persrec.stream.pipeline import create_app
    from persrec.stream.faust_adapter import install_idle_fetch_backoff
    from persrec.stream.worker import freeze_startup_objects

    s = Settings()
    install_idle_fetch_backoff(s.kafka_idle_fetch_backoff_ms / 1000)
    app = create_app(s)
    src = app.topic(s.topic_interactions, key_serializer="raw", value_serializer="raw", partitions=s.partitions)
    dst = app.topic(s.topic_recommendations, key_serializer="raw", value_serializer="raw")

    @app.agent(src)
    async def forward(stream):
        async for event in stream.events():
            await dst.send(key=event.key, value=event.value)

    freeze_startup_objects()  # as stream.worker.run_worker does
    faust.Worker(app, loglevel="warning").execute_from_commandline()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("mode", nargs="?", default="run", choices=["run", "report", "passthrough-worker"],
                    help="report: write the table and plot again from the results JSON")
    ap.add_argument("--quick", action="store_true", help="small sizes (smoke run)")
    ap.add_argument("--events", type=int, default=30_000, help="backlog drained per throughput phase")
    ap.add_argument("--limit-s", type=float, default=60.0, help="longest drain per phase")
    ap.add_argument("--load-s", type=float, default=20.0, help="seconds per latency load level")
    ap.add_argument("--lengths", default=DEFAULT_LENGTHS, help="history lengths of the full-history phase")
    ap.add_argument("--history", type=int, default=2000, help="prior events per user for PerSRec")
    ap.add_argument("--phases", default="passthrough,persrec,full,pairs")
    ap.add_argument("--pairs", type=int, default=3,
                    help="'pairs' phase: PerSRec and full-history L=200 drains back to back, this many times")
    ap.add_argument("--load-base", type=float, default=None,
                    help="events/s the --loads fractions are of (default: this run's PerSRec drain rate)")
    ap.add_argument("--loads", default="0.25,0.5,0.9",
                    help="fractions of the PerSRec drain rate to measure latency at ('' = drain only)")
    ap.add_argument("--profile", action="store_true", help="py-spy the PerSRec worker while it drains and at 50%% load, and Triton's recommend model while it drains")
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--work-dir", type=Path, default=None)
    args = ap.parse_args()
    if args.mode == "passthrough-worker":
        return passthrough_worker()
    if args.mode == "report":
        return report(json.loads((args.out / "stream_bench.json").read_text()), args.out)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("kafka").setLevel(logging.WARNING)
    if args.quick:
        args.events, args.limit_s, args.load_s = 3000, 30.0, 5.0
        args.lengths = args.lengths if args.lengths != DEFAULT_LENGTHS else "200,1000"
    lengths = [int(x) for x in args.lengths.split(",")]
    phases = set(args.phases.split(","))
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="stream-bench-"))
    wl = load_workload(None)
    stamp = {"date": time.strftime("%Y-%m-%d %H:%M"), "command": "benchmarks/stream_bench.py " + " ".join(sys.argv[1:])}
    res: dict = {"machine": f"{platform.machine()} {cpu_model()}, {os.cpu_count()} cores, no GPU"
                 if not torch.cuda.is_available() else torch.cuda.get_device_name(0),
                 "lengths": lengths, "events": args.events} | stamp
    out_json = args.out / "stream_bench.json"
    if out_json.is_file() and not {"passthrough", "persrec"} <= phases:
        # A partial run: the other phases keep their figures, and the table its command and date;
        # each phase records its own (``stamp``).
        old = json.loads(out_json.read_text())
        res = old | {"lengths": sorted(set(old.get("lengths", [])) | set(lengths)) if "full" in phases
                     else old.get("lengths", lengths)}
    if "passthrough" in phases:
        res["passthrough"] = phase_passthrough(work, wl, args.events, args.limit_s) | stamp
    if "persrec" in phases:
        res["persrec"] = phase_pipeline(work, wl, memory=True, max_len=200, history_len=args.history,
                                        n=args.events, limit_s=args.limit_s,
                                        loads=[float(x) for x in args.loads.split(",") if x],
                                        load_base=args.load_base, load_s=args.load_s, profile=args.profile) | stamp
    if "full" in phases:
        for L in lengths:
            res[f"full{L}"] = phase_pipeline(work, wl, memory=False, max_len=L, history_len=L, n=args.events,
                                             limit_s=args.limit_s, loads=[], load_s=0, profile=False) | stamp
    if "pairs" in phases and args.pairs:
        res["pairs"] = phase_pairs(work, wl, args) | stamp
    if "cache" in phases and args.pairs:
        res["cache"] = phase_cache(work, wl, args) | stamp
    args.out.mkdir(parents=True, exist_ok=True)
    out_json.write_text(json.dumps(res, indent=2) + "\n")
    report(res, args.out)


def phase_pairs(work: Path, wl: Workload, args) -> dict:
    """The L=200 ratio again from drains run back to back: the machine's speed drifts over a
    full run (this one's PerSRec and L=200 drains are minutes apart), less over one pair."""
    rows = []
    for _ in range(args.pairs):
        p, f = (phase_pipeline(work, wl, memory=memory, max_len=200, history_len=history, n=args.events,
                               limit_s=args.limit_s, loads=[], load_s=0, profile=False)
                for memory, history in ((True, args.history), (False, 200)))
        rows.append({"persrec": p["events_per_s"], "full200": f["events_per_s"],
                     "ratio": round(p["events_per_s"] / f["events_per_s"], 2),
                     "persrec_rewinds": p["status"].get("offset_rewinds"), "full200_rewinds": f["status"].get("offset_rewinds")})
        log.info("pair %d: %s", len(rows), rows[-1])
    ratios = sorted(r["ratio"] for r in rows)
    return {"runs": rows, "median_ratio": ratios[len(ratios) // 2]}


def phase_cache(work: Path, wl: Workload, args) -> dict:
    """PerSRec drains without and with the recommend model's window cache, back to back,
    ``--pairs`` times: events/s and CPU ms per event (the recommend model's, and in all); with
    ``--loads``, each also at those fractions of ``--load-base`` (the same rate for both)."""
    rows = []
    loads = [float(x) for x in args.loads.split(",") if x] if args.load_base else []
    for _ in range(args.pairs):
        off, on = (phase_pipeline(work, wl, memory=True, max_len=200, history_len=args.history, n=args.events,
                                  limit_s=args.limit_s, loads=loads, load_base=args.load_base, load_s=args.load_s,
                                  profile=False, window_cache_mb=mb)
                   for mb in (0, 256))
        cpu = lambda r, k: (r.get("cpu_ms_per_event") or {}).get(k)  # noqa: E731
        rows.append({"off": off["events_per_s"], "on": on["events_per_s"], "ratio": round(on["events_per_s"] / off["events_per_s"], 2),
                     "recommend_cpu_ms_off": cpu(off, "triton recommend model"), "recommend_cpu_ms_on": cpu(on, "triton recommend model"),
                     "cpu_ms_off": cpu(off, "all"), "cpu_ms_on": cpu(on, "all"),
                     "window_read_p50": (on.get("window_read") or {}).get("p50"), "window_cache": on.get("window_cache"),
                     "latency_off": off.get("latency"), "latency_on": on.get("latency")})
        log.info("cache pair %d: %s", len(rows), rows[-1])
    ratios = sorted(r["ratio"] for r in rows)
    return {"runs": rows, "median_ratio": ratios[len(ratios) // 2]}


def report(res: dict, out: Path) -> None:
    md = markdown(res)
    (out / "stream_bench.md").write_text(md)
    if "passthrough" in res and "persrec" in res:
        plot(res, out / "stream_bench.png")
    print(md)


if __name__ == "__main__":
    main()
