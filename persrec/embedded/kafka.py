"""A local Kafka-protocol broker (noida-db) for the demo and the test suite, and topic creation.

noida-db is a single binary shipped in the ``noida_db`` wheel (the ``local`` extra). Production
runs Apache Kafka; nothing outside this module may depend on noida specifics.
"""

from __future__ import annotations

import importlib.util
import logging
import stat
from pathlib import Path
from types import TracebackType

from kafka import KafkaAdminClient
from kafka.errors import KafkaError

from persrec.stream.topics import create_topics  # noqa: F401 - re-exported for the tests' and users' harnesses

from persrec.embedded._proc import (
    LOOPBACK,
    SETUP_HINT,
    ManagedProcess,
    ServiceBinaryNotFound,
    free_port,
    port_open,
)

log = logging.getLogger(__name__)


def noida_binary() -> Path:
    """Path of the noida-db binary inside the installed ``noida_db`` package, made executable."""
    spec = importlib.util.find_spec("noida_db")
    if spec is None or not spec.submodule_search_locations:
        raise ServiceBinaryNotFound(f"package noida_db is not installed: {SETUP_HINT}")
    binary = Path(next(iter(spec.submodule_search_locations))) / "noida-db"
    if not binary.is_file():
        raise ServiceBinaryNotFound(f"noida-db binary missing at {binary}: {SETUP_HINT}")
    mode = binary.stat().st_mode
    if not mode & stat.S_IXUSR:
        # Wheels do not always keep the run bit of data files.
        binary.chmod(mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return binary


def _admin(bootstrap: str, timeout_s: float) -> KafkaAdminClient:
    timeout_ms = int(timeout_s * 1000)
    return KafkaAdminClient(
        bootstrap_servers=bootstrap, client_id="persrec-embedded",
        bootstrap_timeout_ms=timeout_ms, request_timeout_ms=timeout_ms,
    )


def metadata_ok(bootstrap: str, timeout_s: float = 2.0) -> bool:
    """True when the broker answers a Kafka metadata request."""
    try:
        admin = _admin(bootstrap, timeout_s)
    except KafkaError:
        return False
    try:
        admin.list_topics()
        return True
    except KafkaError:
        return False
    finally:
        admin.close()


class EmbeddedKafka:
    """A noida-db broker (Kafka protocol only) on loopback, its data in ``data_dir``.

    Not started by the constructor: call ``start()`` or use it as a context manager. The port is
    picked once (when not given) and kept across ``restart()``.

        with EmbeddedKafka(tmp_path / "kafka") as kafka:
            producer = KafkaProducer(bootstrap_servers=kafka.bootstrap_servers)
    """

    def __init__(self, data_dir: Path, port: int | None = None,
                 log_path: Path | None = None, start_timeout: float = 30.0) -> None:
        self.data_dir = Path(data_dir)
        self.port = port if port is not None else free_port()
        self.log_path = Path(log_path) if log_path is not None else (
            self.data_dir.parent / f"{self.data_dir.name}.noida-db.log"
        )
        self.start_timeout = start_timeout
        self._proc = ManagedProcess(
            "noida-db", [
                noida_binary(), "start", "--only", "kafka", "--host", LOOPBACK,
                "--kafka-port", str(self.port), "--data-dir", self.data_dir,
            ],
            log_path=self.log_path,
        )

    @property
    def bootstrap_servers(self) -> str:
        return f"{LOOPBACK}:{self.port}"

    @property
    def pid(self) -> int | None:
        return self._proc.pid

    @property
    def running(self) -> bool:
        return self._proc.running

    def start(self) -> EmbeddedKafka:
        """Start the broker and wait until it answers a metadata request."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self._proc.start()
        waited = self._proc.wait_until(self._ready, self.start_timeout, "answering metadata")
        log.info("kafka broker ready at %s in %.2f s", self.bootstrap_servers, waited)
        return self

    def _ready(self) -> bool:
        return port_open(LOOPBACK, self.port) and metadata_ok(self.bootstrap_servers)

    def stop(self, timeout: float = 15.0) -> None:
        """SIGTERM (the broker saves its data), SIGKILL after ``timeout`` s."""
        self._proc.stop(timeout)

    def kill(self) -> None:
        """SIGKILL, as in a crash: roughly the last 2 s of writes are lost."""
        self._proc.kill()

    def restart(self) -> EmbeddedKafka:
        """Stop (gracefully) and start again on the same port and data dir."""
        self.stop()
        return self.start()

    def __enter__(self) -> EmbeddedKafka:
        if not self.running:
            self.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()


__all__ = ["EmbeddedKafka", "create_topics", "metadata_ok", "noida_binary"]

