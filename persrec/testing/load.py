"""Traffic for long-running checks on a live pipeline (reliability soak and rollout scenarios):
a producer thread publishing events at a fixed rate, a consumer thread collecting every
recommendation, and the resident memory of a process group read from /proc."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from kafka import KafkaConsumer, KafkaProducer

from persrec.embedded._proc import group_members
from persrec.stack import wait_for


class PacedProducer(threading.Thread):
    """Publishes ``events`` (dicts with ``user_id``), keyed by user id, at ``rate`` events/s
    (after the first ``burst``, sent at once) until they run out, ``limit`` are sent or
    ``stop()`` is called. With ``hold_at``, it waits after that many events until ``release()``
    (then goes on at ``rate``): a test that must act while events still flow keeps some for
    after its action, however slow the machine. ``sent`` counts events the broker acknowledged
    once ``join()`` returns; ``error`` holds what stopped it early."""

    def __init__(self, bootstrap: str, topic: str, events: Iterator[dict], rate: float,
                 limit: int | None = None, burst: int = 0, hold_at: int | None = None) -> None:
        super().__init__(daemon=True)
        self.bootstrap, self.topic, self.events, self.rate, self.limit = bootstrap, topic, events, rate, limit
        self.burst, self.hold_at = burst, hold_at
        self.sent = 0
        self.last_event: dict | None = None
        self.error: BaseException | None = None
        self.held = False  # waiting at ``hold_at`` now
        self.held_s = 0.0  # how long it waited there
        self._halt = threading.Event()
        self._released = threading.Event()

    def stop(self) -> None:
        self._halt.set()
        self._released.set()

    def release(self) -> None:
        self._released.set()

    def run(self) -> None:
        producer = KafkaProducer(bootstrap_servers=self.bootstrap, acks="all", linger_ms=5)
        start = time.monotonic()
        try:
            for event in self.events:
                if self._halt.is_set() or (self.limit is not None and self.sent >= self.limit):
                    break
                producer.send(self.topic, key=event["user_id"].encode(), value=json.dumps(event).encode())
                self.sent += 1
                self.last_event = event
                if self.sent == self.hold_at:
                    self.held = True
                    waited = time.monotonic()
                    self._released.wait()
                    self.held = False
                    self.held_s = time.monotonic() - waited
                    start += self.held_s  # then on at ``rate``, not in a burst
                ahead = (self.sent - self.burst) / self.rate - (time.monotonic() - start)
                if ahead > 0:
                    time.sleep(ahead)
            producer.flush()
        except BaseException as exc:  # noqa: BLE001 - reported by the test thread
            self.error = exc
        finally:
            producer.close()


class Collector(threading.Thread):
    """Reads a recommendations topic from the start in a background thread: the set of
    answered event ids, the message count and (``keep_bodies``) every message body."""

    def __init__(self, bootstrap: str, topic: str, keep_bodies: bool = False) -> None:
        super().__init__(daemon=True)
        self.bootstrap, self.topic, self.keep_bodies = bootstrap, topic, keep_bodies
        self.answered: set[str] = set()
        self.messages = 0
        self.duplicates_flagged = 0
        self.bodies: list[dict] = []
        self.lock = threading.Lock()
        self._done = threading.Event()

    def run(self) -> None:
        consumer = KafkaConsumer(self.topic, bootstrap_servers=self.bootstrap, auto_offset_reset="earliest",
                                 enable_auto_commit=False, consumer_timeout_ms=200)
        try:
            while not self._done.is_set():
                for message in consumer:
                    body = json.loads(message.value)
                    with self.lock:
                        self.messages += 1
                        self.duplicates_flagged += bool(body["duplicate"])
                        self.answered.add(body["event_id"])
                        if self.keep_bodies:
                            self.bodies.append(body | {"_key": message.key.decode()})
        finally:
            consumer.close()

    def count(self) -> int:
        with self.lock:
            return len(self.answered)

    def close(self) -> None:
        self._done.set()
        self.join(10)


def rss_mb(pids: list[int]) -> float:
    """Sum of VmRSS of ``pids`` in MB (processes that are gone count 0)."""
    total_kb = 0
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total_kb += int(line.split()[1])
                    break
        except OSError:
            continue
    return total_kb / 1024


def group_rss_mb(pgid: int) -> float:
    """Resident memory of a service started in its own session, its children included."""
    return rss_mb(group_members(pgid))


def running(pid: int | None) -> bool:
    """The process exists and is not a zombie."""
    try:
        return pid is not None and Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] not in "ZX"
    except OSError:
        return False


def wait_alive(predicate: Callable[[], object], pids: dict[str, int | None], timeout: float, what: str) -> None:
    """``wait_for(predicate)``, failing at once if one of the named processes exits."""
    def check() -> object:
        dead = [name for name, pid in pids.items() if not running(pid)]
        assert not dead, f"{dead} exited while waiting for {what}"
        return predicate()

    wait_for(check, timeout, what)
