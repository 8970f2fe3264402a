"""``persrec demo``: the whole system on one machine with embedded defaults.

1. train a small PerSRec on the dataset for a short budget (or reuse ``--checkpoint``);
2. export it to a Triton model repository;
3. start, in a fresh ``$PERSREC_WORK_DIR/demo``, a local Kafka-protocol broker (noida-db), tritonserver and one ``persrec worker``
   (SQLite memory store, status API on ``PERSREC_API_PORT``);
4. replay the dataset as events in time order while printing a live summary and sample
   recommendations; stop everything on Ctrl-C (or after ``duration`` seconds).
"""

from __future__ import annotations

import json
import shutil
import signal
import threading
import time
from pathlib import Path

from kafka import KafkaConsumer, TopicPartition
from rich.console import Console
from rich.live import Live
from rich.table import Table

from persrec.embedded.kafka import EmbeddedKafka
from persrec.embedded.triton import EmbeddedTriton
from persrec.replay import replay
from persrec.settings import Settings
from persrec.stack import WorkerProcess


def _summary(status: dict, samples: list[dict], sent: int, started: float) -> Table:
    t = Table(title=f"persrec demo — {time.monotonic() - started:.0f}s (Ctrl-C stops)")
    t.add_column("metric")
    t.add_column("value", justify="right")
    lat = status.get("latency") or {}
    rows = [
        ("events published", sent), ("events processed", status.get("events_in", 0)),
        ("recommendations", status.get("recs_out", 0)), ("dead letters", status.get("dlq", 0)),
        ("memories folded", status.get("folds", 0)), ("fold backlog", status.get("fold_backlog", 0)),
        ("lag", sum((status.get("lag") or {}).values())),
        ("latency p50 / p99 ms", f"{lat.get('p50_ms') or 0:.0f} / {lat.get('p99_ms') or 0:.0f}"),
        ("events answered (all workers)", status.get("answered", 0)), ("worker restarts", status.get("restarts", 0)),
    ]
    for k, v in rows:
        t.add_row(k, str(v))
    for s in samples[-3:]:
        t.add_row(f"user {s['user_id']} (memory {s['memory_version']} ev, window {s['window']})",
                  ", ".join(r["item_id"] for r in s["items"][:5]))
    return t


def _stop_on_sigterm():
    """SIGTERM (``kill``, ``timeout``, a supervisor) stops the demo as Ctrl-C does, so the
    broker, Triton and the worker stop with it instead of living on; the previous handler, or
    None off the main thread (where no handler can be set)."""
    if threading.current_thread() is not threading.main_thread():
        return None

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    return signal.signal(signal.SIGTERM, interrupt)


def run_demo(settings: Settings, data: Path, checkpoint: Path, *, rate: float, duration: float | None,
             console: Console) -> dict:
    """Serve ``checkpoint`` on a local broker, Triton and worker and replay ``data`` through them
    until ``duration`` or Ctrl-C / SIGTERM; the final counters."""
    previous = _stop_on_sigterm()
    try:
        return _serve_and_replay(settings, data, checkpoint, rate=rate, duration=duration, console=console)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _serve_and_replay(settings: Settings, data: Path, checkpoint: Path, *, rate: float, duration: float | None,
                      console: Console) -> dict:
    from persrec.serving.export import export_repository

    work = (settings.work_dir / "demo").resolve()
    if work.exists():  # every demo starts from an empty broker, table and memory store
        shutil.rmtree(work)
    repo = work / "model_repository"
    manifest = export_repository(checkpoint, repo, top_k=settings.top_k)
    console.print(f"model {manifest.model_version} exported to {repo}")
    result: dict = {}
    db_url = f"sqlite:///{work / 'persrec.db'}"  # the worker's memories, and the item catalogue Triton reads
    with EmbeddedKafka(work / "kafka") as kafka, \
            EmbeddedTriton(repo, manifest.triton_models, work / "triton", env={"PERSREC_DATABASE_URL": db_url}) as triton:
        s = settings.model_copy(update={"kafka_bootstrap": kafka.bootstrap_servers, "triton_grpc_url": triton.grpc_url,
                                        "model_repository": repo, "work_dir": work, "database_url": db_url})
        worker = WorkerProcess(s, work / "worker.log").start()
        console.print(f"broker {kafka.bootstrap_servers}, Triton {triton.grpc_url}, status API {worker.api}/status")
        sent, stop = [0], threading.Event()
        replayer = threading.Thread(
            target=lambda: replay(data, s.kafka_bootstrap, s.topic_interactions, rate=rate, stop=stop,
                                  on_progress=lambda n: sent.__setitem__(0, n)), daemon=True)
        replayer.start()
        # every partition from its first offset: every answer is counted, whichever worker sent it
        consumer = KafkaConsumer(bootstrap_servers=s.kafka_bootstrap, consumer_timeout_ms=200)
        consumer.assign([TopicPartition(s.topic_recommendations, p) for p in range(s.partitions)])
        consumer.seek_to_beginning()
        samples: list[dict] = []
        started = time.monotonic()
        first_rec = None
        answered: set[str] = set()  # event ids with a recommendation, whatever worker sent it
        status: dict = {}
        restarts = 0
        interrupted = False
        try:
            with Live(console=console, refresh_per_second=2) as live:
                def running() -> bool:
                    return duration is None or time.monotonic() - started < duration

                while running():
                    for m in consumer:  # ends after 200 ms without a message, or when time is up
                        rec = json.loads(m.value)
                        answered.add(rec["event_id"])
                        if first_rec is None:
                            first_rec = time.monotonic() - started
                        if rec["items"] and (not samples or rec["memory_version"] > 0):
                            samples.append(rec)
                            samples = samples[-10:]
                        if not running():  # after counting it: the consumer has moved past it
                            break
                    if not worker.running:  # supervise: a dead worker is restarted, nothing lost
                        restarts += 1
                        live.console.print(f"[yellow]the worker exited (code {worker.returncode}); "
                                           f"restarting it (restart {restarts}, log {work / 'worker.log'})[/]")
                        worker.start()
                    status = _status(worker) or status
                    live.update(_summary(status | {"restarts": restarts, "answered": len(answered)},
                                         samples, sent[0], started))
        except KeyboardInterrupt:
            console.print("stopping...")
            interrupted = True
        finally:
            stop.set()
            replayer.join(timeout=10)
            deadline = time.monotonic() + 30
            while not interrupted and len(answered) < sent[0] and time.monotonic() < deadline:
                answered.update(json.loads(m.value)["event_id"] for m in consumer)  # what is still in flight
            result = (_status(worker) or status) | {
                "events_published": sent[0], "first_recommendation_s": first_rec, "worker_restarts": restarts,
                "events_answered": len(answered)}
            consumer.close()
            worker.stop()
    console.print("stopped broker, Triton and worker")
    return result


def _status(worker: WorkerProcess) -> dict | None:
    """The worker's status, or None while it does not answer (restarting)."""
    try:
        return worker.status()
    except OSError:  # urllib's URLError too: the API is down with its worker
        return None
