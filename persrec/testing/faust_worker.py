"""A test's own Faust worker, run as a script in its own process against a topic filled
beforehand (tests/stream/test_rewind.py, test_stalls.py): the script's worker writes a JSON
report to ``$WORKER_REPORT`` and exits."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any


def run_on_filled_topic(script: str, tmp_path: Path, bootstrap: str, partitions: int, per_partition: int,
                        env: dict[str, str] | None = None, timeout_s: float = 180) -> tuple[dict[str, Any], str]:
    """Fill a fresh topic with ``per_partition`` records in each of ``partitions``, run ``script``
    as that topic's worker (``PERSREC_*`` settings of its own group and work dir), and return its
    report and log. Fails with the log's tail when no report came."""
    from confluent_kafka import Producer

    from persrec.embedded._proc import free_ports
    from persrec.embedded.kafka import create_topics

    tag = f"{Path(script).stem}-{os.getpid()}-{int(time.time())}"
    topic = f"in-{tag}"
    create_topics(bootstrap, {topic: partitions})
    producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 20})
    for _ in range(per_partition):
        for p in range(partitions):
            producer.produce(topic, key=b"u", value=b"x" * 100, partition=p)
        producer.poll(0)
    assert producer.flush(30) == 0
    out = tmp_path / "report.json"
    (tmp_path / "work").mkdir()
    env = dict(os.environ, PERSREC_APP_ID=tag, PERSREC_KAFKA_BOOTSTRAP=bootstrap, PERSREC_TOPIC_INTERACTIONS=topic,
               PERSREC_PARTITIONS=str(partitions), PERSREC_WORK_DIR=str(tmp_path / "work"),
               PERSREC_WORKER_WEB_PORT=str(free_ports(1)[0]), WORKER_REPORT=str(out), **(env or {}))
    with open(tmp_path / "worker.log", "w") as log:
        try:
            proc = subprocess.run([sys.executable, script], env=env, stdout=log, stderr=subprocess.STDOUT,
                                  timeout=timeout_s, check=False)
            how = f"exited {proc.returncode}"
        except subprocess.TimeoutExpired:
            how = f"ran {timeout_s:.0f} s without a report"
    worker_log = (tmp_path / "worker.log").read_text()
    assert out.is_file(), f"worker {how}: {worker_log[-3000:]}"
    return json.loads(out.read_text()), worker_log
