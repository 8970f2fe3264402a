"""Local processes of the system (a worker, the status API) started from settings: used by the
demo and by the end-to-end tests, which run the real ``persrec worker`` command."""

from __future__ import annotations

import json
import os
import sys
import time
import urllib.request
from pathlib import Path

from persrec.embedded._proc import ManagedProcess, ServiceError
from persrec.settings import Settings


def settings_env(settings: Settings) -> dict[str, str]:
    """``PERSREC_*`` variables that reproduce ``settings`` in a child process."""
    env = {}
    for name, value in settings.model_dump().items():
        if value is None:
            continue
        if hasattr(value, "get_secret_value"):
            value = value.get_secret_value()
        env[f"PERSREC_{name.upper()}"] = str(value)
    return env


def get_json(url: str, timeout: float = 2.0) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


def worker_ready(api: str) -> bool:
    """A worker is ready once its status API answers with the runtime's counters."""
    try:
        code, body = get_json(api + "/status")
    except OSError:
        return False
    return code == 200 and "events_in" in body


def _is_access_line(line: str) -> bool:
    """aiohttp's access log: the tests poll /status several times a second, which would fill the
    log tail shown in errors."""
    return '" 200 ' in line and '"GET /' in line


class WorkerProcess:
    """``persrec worker`` in its own process group, ready once its status API reports a runtime."""

    def __init__(self, settings: Settings, log_path: Path, name: str = "worker") -> None:
        self.settings = settings
        env = dict(os.environ) | settings_env(settings)
        self._proc = ManagedProcess(name, [sys.executable, "-m", "persrec.cli", "worker"], log_path, env=env,
                                    skip_log_line=_is_access_line)

    @property
    def api(self) -> str:
        return f"http://{self.settings.api_host}:{self.settings.api_port}"

    @property
    def log_path(self) -> Path:
        return self._proc.log_path

    @property
    def pid(self) -> int | None:
        return self._proc.pid

    @property
    def running(self) -> bool:
        return self._proc.running

    @property
    def returncode(self) -> int | None:
        return self._proc.returncode

    def start(self, timeout: float = 120.0) -> "WorkerProcess":
        self._proc.start()
        self._proc.wait_until(lambda: worker_ready(self.api), timeout, "worker status API")
        return self

    def stop(self, timeout: float = 30.0) -> None:
        self._proc.stop(timeout)

    def kill(self) -> None:
        self._proc.kill()

    def log_tail(self, lines: int = 40) -> str:
        return self._proc.log_tail(lines)

    def status(self) -> dict:
        return get_json(self.api + "/status")[1]


def wait_for(predicate, timeout: float, what: str, interval: float = 0.2):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise ServiceError(f"timed out after {timeout:.0f}s waiting for {what}")
