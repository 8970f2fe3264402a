"""A local Triton Inference Server for the demo and the test suite.

The binary comes from the ``nvidia-pytriton`` wheel (the ``local`` extra): Triton 2.51 with the
python backend only, so models run inside a python-backend ``model.py`` on CPU. Production runs
the same model repository in NVIDIA's ``tritonserver`` image; nothing outside this module may
depend on how the local server is assembled.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import sys
import sysconfig
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING

from persrec.embedded._proc import (
    LOOPBACK,
    SETUP_HINT,
    ManagedProcess,
    ServiceBinaryNotFound,
    ServiceError,
    free_ports,
    group_members,
    http_ok,
)

if TYPE_CHECKING:
    import tritonclient.http as triton_http

log = logging.getLogger(__name__)

SHM_DIR = Path("/dev/shm")
_SHM_PREFIX = "triton_python_backend_shm_region_"
# What tritonserver prints when it aborts on the mutex of a python-backend stub that crashed
STUB_ABORT = "boost::interprocess::lock_exception"


def stub_shm_regions(server_pid: int) -> list[Path]:
    """The /dev/shm regions of the python-backend stubs of one server."""
    return _shm_regions(group_members(server_pid))


def _shm_regions(pids: list[int]) -> list[Path]:
    # Each stub gets its region's name on its command line; a stub killed by SIGKILL cannot
    # unlink it, and the regions would pile up in /dev/shm.
    regions = []
    for pid in pids:
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        regions += [SHM_DIR / a.decode() for a in argv if a.startswith(_SHM_PREFIX.encode())]
    return regions


def _site_dir(package: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ServiceBinaryNotFound(f"package {package} is not installed: {SETUP_HINT}")
    return Path(next(iter(spec.submodule_search_locations)))


class TritonInstall:
    """Where the pieces of the Triton build bundled in nvidia-pytriton live."""

    def __init__(self) -> None:
        self.root = _site_dir("pytriton") / "tritonserver"
        # The shared libraries the binary links against sit beside the package (auditwheel).
        self.libs = self.root.parent.parent / "nvidia_pytriton.libs"
        self.binary = self.root / "bin" / "tritonserver"
        python_version = f"{sys.version_info.major}.{sys.version_info.minor}"
        self.backend_files = [
            self.root / "backends" / "python" / "libtriton_python.so",
            self.root / "backends" / "python" / "triton_python_backend_utils.py",
            self.root / "python_backend_stubs" / python_version / "triton_python_backend_stub",
        ]
        missing = [p for p in [self.binary, self.libs, *self.backend_files] if not p.exists()]
        if missing:
            raise ServiceBinaryNotFound(
                f"nvidia-pytriton install incomplete, missing {[str(p) for p in missing]}: "
                f"{SETUP_HINT}"
            )

    def backend_directory(self, work_dir: Path) -> Path:
        """Assemble ``work_dir/backends/python`` once; return ``work_dir/backends``."""
        backends = work_dir / "backends"
        python_dir = backends / "python"
        if all((python_dir / f.name).is_file() for f in self.backend_files):
            return backends
        staging = backends / f".python.{os.getpid()}"  # then renamed: never seen half-copied
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        for f in self.backend_files:
            shutil.copy2(f, staging / f.name)
        shutil.rmtree(python_dir, ignore_errors=True)
        staging.rename(python_dir)
        return backends

    def environment(self) -> dict[str, str]:
        """The server's environment: this interpreter's libpython first, this venv first on PATH.

        Without the interpreter's own LIBDIR the stub can load the system libpython against this
        interpreter's stdlib (model load then fails with ``'_thread.RLock' object has no attribute
        '_recursion_count'``); the stub finds the venv's packages (torch) through PATH.
        """
        env = dict(os.environ)
        libdir = sysconfig.get_config_var("LIBDIR") or ""
        libpython = f"libpython{sys.version_info.major}.{sys.version_info.minor}.so.1.0"
        if not (Path(libdir) / libpython).exists():
            log.warning("%s not in %r (Python built without --enable-shared?): the "
                        "python-backend stub may load another libpython and fail to load models",
                        libpython, libdir)
        lib_dirs = [str(self.libs), libdir]
        env["LD_LIBRARY_PATH"] = _join_path(lib_dirs, env.get("LD_LIBRARY_PATH"))
        env["PATH"] = _join_path([str(Path(sys.prefix) / "bin")], env.get("PATH"))
        return env


def _join_path(first: Iterable[str], rest: str | None) -> str:
    parts = [p for p in first if p] + [p for p in (rest or "").split(os.pathsep) if p]
    return os.pathsep.join(dict.fromkeys(parts))  # drop duplicates, keep order


def _is_table_line(line: str) -> bool:
    # The startup tables (backends, models, options) would crowd the error out of a log tail.
    return line.startswith(("+-", "|"))


class EmbeddedTriton:
    """A tritonserver on loopback serving ``models`` from ``model_repository`` (explicit mode).

    Not started by the constructor: call ``start()`` or use it as a context manager. Ports are
    picked once (when not given) and kept across ``restart()``. ``http_url`` and ``grpc_url`` are
    ``host:port`` without a scheme, the form tritonclient expects.

    ``auto_complete_config`` is off: every model needs a complete ``config.pbtxt``. Turning it on
    makes Triton run each python model once more, in a separate stub, only to ask it for its
    config (about 3 s more per start with a model that imports torch).
    """

    def __init__(self, model_repository: Path, models: Sequence[str], work_dir: Path,
                 http_port: int | None = None, grpc_port: int | None = None,
                 metrics_port: int | None = None, log_path: Path | None = None,
                 extra_args: Sequence[str] = (), start_timeout: float = 120.0,
                 auto_complete_config: bool = False, env: Mapping[str, str] | None = None,
                 stub_abort_retries: int = 2) -> None:
        self.model_repository = Path(model_repository).resolve()
        self.models = list(dict.fromkeys(models))  # loaded at start, kept by load/unload_model
        self.work_dir = Path(work_dir)
        picked = iter(free_ports(3))
        self.http_port = http_port if http_port is not None else next(picked)
        self.grpc_port = grpc_port if grpc_port is not None else next(picked)
        self.metrics_port = metrics_port if metrics_port is not None else next(picked)
        self.log_path = Path(log_path) if log_path is not None else (
            self.work_dir / "tritonserver.log"
        )
        self.extra_args = list(extra_args)
        self.start_timeout = start_timeout
        self.auto_complete_config = auto_complete_config
        self.env = dict(env or {})  # added to the server's environment (e.g. PERSREC_DATABASE_URL)
        self._install = TritonInstall()
        self._proc: ManagedProcess | None = None
        self.stub_abort_retries = stub_abort_retries  # starts made again after a STUB_ABORT, at most
        self.aborted_starts = 0  # starts lost to STUB_ABORT, each followed by one more

    @property
    def http_url(self) -> str:
        return f"{LOOPBACK}:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"{LOOPBACK}:{self.grpc_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://{LOOPBACK}:{self.metrics_port}/metrics"

    def metrics(self, prefix: str = "") -> dict[str, float]:
        """The server's Prometheus metrics whose name starts with ``prefix``, each summed over
        its labels (e.g. the recommend model's ``persrec_window_cache_*``, over versions)."""
        import urllib.request

        from prometheus_client.parser import text_string_to_metric_families

        text = urllib.request.urlopen(self.metrics_url, timeout=10).read().decode()
        out: dict[str, float] = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name.startswith(prefix):
                    out[sample.name] = out.get(sample.name, 0.0) + sample.value
        return out

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.running

    def _argv(self, backends: Path) -> list[str]:
        argv = [
            str(self._install.binary),
            f"--model-repository={self.model_repository}",
            f"--backend-directory={backends}",
            "--model-control-mode=explicit",
            *(f"--load-model={name}" for name in self.models),
            f"--http-address={LOOPBACK}", f"--http-port={self.http_port}",
            f"--grpc-address={LOOPBACK}", f"--grpc-port={self.grpc_port}",
            f"--metrics-address={LOOPBACK}", f"--metrics-port={self.metrics_port}",
            "--log-verbose=0",
            # In-flight requests get this long after SIGTERM (default 30 s); stop() waits longer.
            "--exit-timeout-secs=10",
        ]
        if not self.auto_complete_config:
            argv.append("--disable-auto-complete-config")
        return argv + self.extra_args

    def start(self) -> EmbeddedTriton:
        """Start the server; return once it and every model in ``models`` are ready.

        A server that aborts on ``STUB_ABORT`` while its python-backend stubs start (a stub
        crashed: pytriton 0.7.0's backend, RELIABILITY.md "Known limits") is started again, up
        to ``stub_abort_retries`` times, with a warning; ``aborted_starts`` counts them. Any
        other failure, or one abort more, raises."""
        if not self.model_repository.is_dir():
            raise FileNotFoundError(f"model repository {self.model_repository} does not exist")
        self.work_dir.mkdir(parents=True, exist_ok=True)
        backends = self._install.backend_directory(self.work_dir)
        ready_url = f"http://{self.http_url}/v2/health/ready"
        while True:
            # The model list is read at each start, so the argv is rebuilt (restart after a rollout).
            self._proc = ManagedProcess("tritonserver", self._argv(backends), self.log_path,
                                        env=self._install.environment() | self.env, cwd=self.work_dir,
                                        skip_log_line=_is_table_line, leftover_files=_shm_regions)
            self._proc.start()
            try:
                waited = self._proc.wait_until(lambda: http_ok(ready_url), self.start_timeout, "ready")
                break
            except ServiceError as exc:
                if self.aborted_starts >= self.stub_abort_retries or STUB_ABORT not in str(exc):
                    raise
            self.aborted_starts += 1
            log.warning("tritonserver aborted (%s) while its python-backend stubs started; starting it again "
                        "(%d of %d; log %s)", STUB_ABORT, self.aborted_starts, self.stub_abort_retries, self.log_path)
        log.info("tritonserver ready at http %s / grpc %s with %s in %.2f s",
                 self.http_url, self.grpc_url, self.models, waited)
        return self

    def stop(self, timeout: float = 30.0) -> None:
        """SIGTERM (models unload, in-flight requests get 10 s), SIGKILL after ``timeout`` s."""
        if self._proc is not None:
            self._proc.stop(timeout)

    def kill(self) -> None:
        """SIGKILL the server and its python-backend stubs at once."""
        if self._proc is not None:
            self._proc.kill()

    def restart(self) -> EmbeddedTriton:
        """Stop and start again on the same ports, loading the models loaded now."""
        self.stop()
        return self.start()

    def client(self, network_timeout: float = 120.0) -> triton_http.InferenceServerClient:
        """An HTTP client for this server (the caller closes it)."""
        import tritonclient.http as triton_http  # imports gevent: only when a client is needed

        return triton_http.InferenceServerClient(self.http_url, network_timeout=network_timeout)

    def load_model(self, name: str) -> None:
        """Load (or reload, after the repository changed) ``name`` through the repository API.

        Returns when the model is ready; raises ``InferenceServerException`` if it fails to load.
        """
        client = self.client()
        try:
            client.load_model(name)
        finally:
            client.close()
        if name not in self.models:
            self.models.append(name)
        log.info("model %s loaded", name)

    def unload_model(self, name: str, timeout: float = 60.0) -> None:
        """Unload ``name``; return once its instances are gone (Triton answers before that)."""
        client = self.client()
        try:
            client.unload_model(name)
            deadline = time.monotonic() + timeout
            while any(entry["name"] == name and entry.get("state") == "UNLOADING"
                      for entry in client.get_model_repository_index()):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"model {name} still unloading after {timeout:.0f} s")
                time.sleep(0.05)
        finally:
            client.close()
        if name in self.models:
            self.models.remove(name)
        log.info("model %s unloaded", name)

    def __enter__(self) -> EmbeddedTriton:
        if not self.running:
            self.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()


__all__ = ["EmbeddedTriton", "TritonInstall", "stub_shm_regions"]
