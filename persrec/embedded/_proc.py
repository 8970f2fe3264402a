"""Process plumbing shared by the embedded services: ports, readiness polling, start and stop.

Every service runs in its own session (``setsid``) so that stopping it reaches the whole process
tree (Triton's python-backend stubs included) and a Ctrl-C in the terminal does not kill it
behind the owner's back. Stops are always bounded: SIGTERM, a timed wait, then SIGKILL to the
whole group. Processes still alive when the interpreter exits are stopped by an ``atexit`` hook,
the last resort after fixture finalizers and context managers.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import signal
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

log = logging.getLogger(__name__)

LOOPBACK = "127.0.0.1"
SETUP_HINT = "run `scripts/dev setup` (installs the `local` extra: noida-db, nvidia-pytriton)"


class ServiceError(RuntimeError):
    """An embedded service could not be found, started or stopped."""


class ServiceBinaryNotFound(ServiceError):
    """The binary of an embedded service is not installed."""


def free_ports(count: int = 1, host: str = LOOPBACK) -> list[int]:
    """Return ``count`` distinct ports that were free a moment ago.

    All sockets stay bound until every port is picked, so the ports differ from each other; another
    process can still take one before the service binds it (the start then fails loudly).
    """
    with contextlib.ExitStack() as stack:
        ports = []
        for _ in range(count):
            sock = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
            sock.bind((host, 0))
            ports.append(sock.getsockname()[1])
        return ports


def free_port(host: str = LOOPBACK) -> int:
    return free_ports(1, host)[0]


def port_open(host: str, port: int, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


# Probes go straight to loopback even where HTTP_PROXY is set without a NO_PROXY for it.
_direct = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def http_ok(url: str, timeout: float = 1.0) -> bool:
    """True when ``GET url`` answers 200."""
    try:
        with _direct.open(url, timeout=timeout) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False


def tail(path: Path, max_lines: int = 40, start: int = 0,
         skip_line: Callable[[str], bool] | None = None) -> str:
    """The last ``max_lines`` lines of a log file from byte offset ``start``, minus skipped ones."""
    try:
        with open(path, "rb") as f:
            f.seek(start)
            data = f.read()
    except OSError as exc:
        return f"<log {path} unreadable: {exc}>"
    lines = data.decode("utf-8", errors="replace").splitlines()
    if skip_line is not None:
        lines = [line for line in lines if not skip_line(line)]
    return "\n".join(lines[-max_lines:])


class ManagedProcess:
    """One service process started in its own session, its output appended to a log file."""

    def __init__(self, name: str, argv: Sequence[str], log_path: Path,
                 env: Mapping[str, str] | None = None, cwd: Path | None = None,
                 skip_log_line: Callable[[str], bool] | None = None,
                 leftover_files: Callable[[list[int]], list[Path]] | None = None) -> None:
        self.name = name
        self.argv = [str(a) for a in argv]
        self.log_path = log_path
        self.env = dict(env) if env is not None else None
        self.cwd = cwd
        self.skip_log_line = skip_log_line  # drops noise from the log tail shown in errors
        # Given the group's pids: files those processes remove on a clean exit but leave behind
        # when killed; removed after every stop or kill.
        self.leftover_files = leftover_files
        self._popen: subprocess.Popen[bytes] | None = None
        self._log_offset = 0  # where this run's output starts in the (appended) log file

    @property
    def pid(self) -> int | None:
        return self._popen.pid if self._popen is not None else None

    @property
    def running(self) -> bool:
        return self._popen is not None and self._popen.poll() is None

    @property
    def returncode(self) -> int | None:
        return None if self._popen is None else self._popen.poll()

    def start(self) -> None:
        if self.running:
            raise ServiceError(f"{self.name} is already running (pid {self.pid})")
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log_file:
            self._log_offset = log_file.tell()
            log.debug("starting %s: %s", self.name, " ".join(self.argv))
            self._popen = subprocess.Popen(
                self.argv, stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT,
                env=self.env, cwd=self.cwd, start_new_session=True,
            )
        _live.add(self)
        log.info("%s started (pid %d, log %s)", self.name, self._popen.pid, self.log_path)

    def log_tail(self, max_lines: int = 40) -> str:
        return tail(self.log_path, max_lines, self._log_offset, self.skip_log_line)

    def wait_until(self, ready: Callable[[], bool], timeout: float, what: str,
                   interval: float = 0.05) -> float:
        """Poll ``ready`` until it holds; return the seconds waited.

        Raises ``ServiceError`` with the log tail if the process exits or ``timeout`` passes. On
        any error the process group is killed, so that a failed start leaves nothing behind.
        """
        started = time.monotonic()
        deadline = started + timeout
        try:
            while True:
                if not self.running:
                    code = self._popen.returncode if self._popen is not None else None
                    raise ServiceError(
                        f"{self.name} exited with code {code} before {what}; "
                        f"log {self.log_path}:\n{self.log_tail()}"
                    )
                if ready():
                    return time.monotonic() - started
                if time.monotonic() > deadline:
                    raise ServiceError(
                        f"{self.name} not {what} after {timeout:.0f} s; "
                        f"log {self.log_path}:\n{self.log_tail()}"
                    )
                time.sleep(interval)
        except BaseException:  # Ctrl-C included: a start either succeeds or leaves nothing
            self.kill()
            raise

    def stop(self, timeout: float = 15.0) -> None:
        """SIGTERM the service, wait up to ``timeout`` s, then SIGKILL its whole process group."""
        popen = self._popen
        if popen is None:
            return
        leftovers = self._leftovers()
        if popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                popen.send_signal(signal.SIGTERM)
            try:
                popen.wait(timeout)
            except subprocess.TimeoutExpired:
                log.warning("%s (pid %d) ignored SIGTERM for %.0f s: killing it",
                            self.name, popen.pid, timeout)
        self._kill_group(popen, leftovers)
        log.info("%s stopped (pid %d, exit code %s)", self.name, popen.pid, popen.returncode)

    def kill(self) -> None:
        """SIGKILL the whole process group at once (no chance to save anything)."""
        if self._popen is not None:
            self._kill_group(self._popen, self._leftovers())

    def _leftovers(self) -> list[Path]:
        if self.leftover_files is None or self._popen is None:
            return []
        return self.leftover_files(group_members(self._popen.pid))

    def _kill_group(self, popen: subprocess.Popen[bytes], leftovers: list[Path]) -> None:
        # The group id is the leader's pid (start_new_session); it also reaches children the
        # leader left behind. The kernel does not hand out a pid still used as a group id.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(popen.pid, signal.SIGKILL)
        try:
            popen.wait(5.0)
        except subprocess.TimeoutExpired:
            log.error("%s (pid %d) survived SIGKILL", self.name, popen.pid)
        _wait_group_gone(popen.pid, 5.0)
        for path in leftovers:
            path.unlink(missing_ok=True)
        _live.discard(self)


def group_members(pgid: int) -> list[int]:
    """Pids of the live (non-zombie) processes in group ``pgid``, read from /proc."""
    members = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            # The command name (field 2) may hold spaces: split after its closing parenthesis.
            fields = stat.read_text().rpartition(")")[2].split()
        except OSError:
            continue
        state, pgrp = fields[0], int(fields[2])
        if pgrp == pgid and state not in ("Z", "X"):
            members.append(int(stat.parent.name))
    return members


def _wait_group_gone(pgid: int, timeout: float) -> None:
    # Zombies do not count: an orphan's zombie lingers when the container's init does not reap.
    deadline = time.monotonic() + timeout
    while members := group_members(pgid):
        if time.monotonic() > deadline:
            log.error("processes %s of group %d alive %.0f s after SIGKILL", members, pgid, timeout)
            return
        time.sleep(0.02)


class _LiveSet:
    """Processes started and not yet stopped, for the exit hook."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._items: set[ManagedProcess] = set()

    def add(self, proc: ManagedProcess) -> None:
        with self._lock:
            self._items.add(proc)

    def discard(self, proc: ManagedProcess) -> None:
        with self._lock:
            self._items.discard(proc)

    def snapshot(self) -> list[ManagedProcess]:
        with self._lock:
            return list(self._items)


_live = _LiveSet()


@atexit.register
def _stop_leftovers() -> None:
    for proc in _live.snapshot():
        log.warning("stopping %s (pid %s) left running at exit", proc.name, proc.pid)
        proc.stop(timeout=5.0)
