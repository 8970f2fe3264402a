"""A throwaway PostgreSQL server on loopback, for tests and local demos.

It runs Debian's server binaries (`scripts/install-postgres.sh` installs them) on a data
directory of its own: initdb on first use (trust authentication, reachable only from
127.0.0.1 and its own unix socket), then `postgres` as a child process on a free port. Durability
settings are relaxed (fsync off): committed data survives a killed server, not a killed machine.

PostgreSQL refuses to run as root: when this process is root, initdb and the server run as the
`postgres` OS user, which must be able to reach the data directory.
"""

from __future__ import annotations

import atexit
import contextlib
import glob
import logging
import os
import pwd
import shutil
import signal
import socket
import stat
import subprocess
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Self

import psycopg
from psycopg import sql
from sqlalchemy.engine import URL

log = logging.getLogger(__name__)

SETUP_HINT = "Run `scripts/dev setup` (it calls scripts/install-postgres.sh)."
BIN_DIR_ENV = "PERSREC_PG_BINDIR"
# Test-friendly defaults; `settings` overrides any of them. Not synchronous_commit=off: a
# commit would then sit in shared memory for up to 200 ms and kill() would lose it.
DEFAULT_SETTINGS = {"fsync": "off", "full_page_writes": "off"}
_HBA = """\
# Written by persrec EmbeddedPostgres: trust, loopback and unix socket only.
local all all trust
host  all all 127.0.0.1/32 trust
"""


class PostgresError(RuntimeError):
    """The embedded server could not be found, initialised, started or stopped."""


def find_bin_dir(explicit: str | os.PathLike[str] | None = None) -> Path:
    """Directory holding `initdb` and `postgres`: the argument, $PERSREC_PG_BINDIR, the newest
    /usr/lib/postgresql/*/bin (Debian), or the directory of `postgres` on PATH."""
    candidates: list[Path] = []
    if explicit or os.environ.get(BIN_DIR_ENV):
        candidates.append(Path(explicit or os.environ[BIN_DIR_ENV]))
    else:
        debian = glob.glob("/usr/lib/postgresql/*/bin")
        debian.sort(key=lambda p: _version_key(Path(p).parent.name), reverse=True)
        candidates += [Path(p) for p in debian]
        on_path = shutil.which("postgres")
        if on_path:
            candidates.append(Path(on_path).parent)
    for bin_dir in candidates:
        if (bin_dir / "postgres").is_file() and (bin_dir / "initdb").is_file():
            return bin_dir
    looked = ", ".join(map(str, candidates)) or "/usr/lib/postgresql/*/bin and PATH"
    raise PostgresError(f"PostgreSQL server binaries not found (looked in {looked}). {SETUP_HINT}")


class EmbeddedPostgres:
    """One PostgreSQL server with one application database.

    `with EmbeddedPostgres(dir) as pg:` starts it (initdb first if `dir` is new) and stops it
    on exit; `pg.url` is a SQLAlchemy URL string for `database`.
    """

    def __init__(
        self,
        data_dir: str | os.PathLike[str],
        port: int | None = None,
        *,
        database: str = "persrec",
        user: str = "postgres",
        bin_dir: str | os.PathLike[str] | None = None,
        settings: Mapping[str, str] | None = None,
        startup_timeout: float = 60.0,
        stop_timeout: float = 10.0,
    ) -> None:
        self.data_dir = Path(data_dir).absolute()
        self.port = port
        self.database = database
        self.user = user
        self.bin_dir = find_bin_dir(bin_dir)
        self.settings = {**DEFAULT_SETTINGS, **(settings or {})}
        self.startup_timeout = startup_timeout
        self.stop_timeout = stop_timeout
        self.log_path = self.data_dir / "server.log"
        self._fixed_port = port is not None
        self._proc: subprocess.Popen[bytes] | None = None
        self._socket_dir: Path | None = None
        self._log_start = 0  # log offset where the current start's output begins
        self._run_as = _os_user_for_server()

    # -- public API ----------------------------------------------------------------------

    @property
    def url(self) -> str:
        """SQLAlchemy URL of the application database (psycopg 3 driver)."""
        return self.url_for(self.database)

    def url_for(self, database: str) -> str:
        if self.port is None:
            raise PostgresError("the server has not been started")
        return URL.create(
            "postgresql+psycopg",
            username=self.user,
            host="127.0.0.1",
            port=self.port,
            database=database,
        ).render_as_string(hide_password=False)

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self) -> EmbeddedPostgres:
        """initdb if needed, start the server, wait until it accepts connections, and create
        the application database if missing. Raises PostgresError with the log's tail."""
        if self.running:
            return self
        self._prepare_data_dir()
        if not (self.data_dir / "PG_VERSION").exists():
            self._initdb()
        for attempt in range(3):
            if not self._fixed_port and (attempt > 0 or self.port is None):
                self.port = _free_port()
            self._spawn()
            try:
                self._wait_ready()
                break
            except PostgresError:
                port_taken = "could not bind" in self.log_tail()
                self._reap(signal.SIGKILL, 5.0)
                if not port_taken or self._fixed_port or attempt == 2:
                    raise
                log.warning("port %s was taken, retrying on another", self.port)
        atexit.register(self.stop)
        self.create_database(self.database, exist_ok=True)
        log.info("PostgreSQL ready at %s (data %s)", self.url, self.data_dir)
        return self

    def stop(self) -> None:
        """Fast shutdown (SIGINT: abort transactions, checkpoint), escalating to immediate
        shutdown and then SIGKILL if it takes longer than `stop_timeout`."""
        if self._proc is None:
            return
        if not self._signal_and_wait(signal.SIGINT, self.stop_timeout):
            log.warning(
                "PostgreSQL did not stop within %.0fs; immediate shutdown", self.stop_timeout
            )
            self._signal_and_wait(signal.SIGQUIT, 5.0)
        self._reap(signal.SIGKILL, 5.0)  # leftovers of the group, if any; cleans up

    def kill(self) -> None:
        """SIGKILL the server and its backends, like a crash; the next start recovers."""
        self._reap(signal.SIGKILL, 5.0)

    def restart(self) -> EmbeddedPostgres:
        self.stop()
        return self.start()

    def create_database(self, name: str, exist_ok: bool = False) -> None:
        with self._admin() as conn:
            exists = conn.execute(
                "SELECT 1 FROM pg_database WHERE datname = %s", (name,)
            ).fetchone()
            if exists and not exist_ok:
                raise PostgresError(f"database {name!r} already exists")
            if not exists:
                conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))

    def drop_database(self, name: str) -> None:
        """Drop `name`, disconnecting its sessions; no error if it does not exist."""
        with self._admin() as conn:
            conn.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )

    def log_tail(self, lines: int = 30) -> str:
        """The last `lines` the server logged since it was last started."""
        try:
            with open(self.log_path, "rb") as f:
                f.seek(self._log_start)
                return _tail(f.read().decode(errors="replace"), lines)
        except OSError:
            return "(no server log)"

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = f"running on port {self.port}" if self.running else "stopped"
        return f"EmbeddedPostgres({str(self.data_dir)!r}, {state})"

    # -- steps -----------------------------------------------------------------------------

    def _prepare_data_dir(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        if self._run_as is not None:
            os.chown(self.data_dir, self._run_as.pw_uid, self._run_as.pw_gid)
            _check_reachable(self.data_dir, self._run_as)
        self.data_dir.chmod(0o700)

    def _initdb(self) -> None:
        if any(self.data_dir.iterdir()):
            raise PostgresError(f"{self.data_dir} is neither empty nor a PostgreSQL data dir")
        cmd = [
            str(self.bin_dir / "initdb"),
            "-D",
            str(self.data_dir),
            "-U",
            self.user,
            "--auth=trust",
            "--encoding=UTF8",
            "--locale=C",
            "--no-sync",
            "--no-instructions",
        ]
        out = subprocess.run(
            cmd, check=False, capture_output=True, text=True, timeout=120, **self._child_kwargs()
        )
        if out.returncode != 0:
            raise PostgresError(
                f"initdb failed ({out.returncode}):\n{_tail(out.stdout + out.stderr)}"
            )
        (self.data_dir / "pg_hba.conf").write_text(_HBA)

    def _spawn(self) -> None:
        self._socket_dir = Path(tempfile.mkdtemp(prefix="persrec-pgsock-"))  # short: 107-byte limit
        if self._run_as is not None:
            os.chown(self._socket_dir, self._run_as.pw_uid, self._run_as.pw_gid)
        cmd = [
            str(self.bin_dir / "postgres"),
            "-D",
            str(self.data_dir),
            "-p",
            str(self.port),
            "-k",
            str(self._socket_dir),
            "-c",
            "listen_addresses=127.0.0.1",
        ]
        for key, value in self.settings.items():
            cmd += ["-c", f"{key}={value}"]
        with open(self.log_path, "ab") as log_file:
            self._log_start = log_file.tell()
            self._proc = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group: kill() reaches the backends
                **self._child_kwargs(),
            )

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.startup_timeout
        while True:
            assert self._proc is not None
            code = self._proc.poll()
            if code is not None:
                raise PostgresError(
                    f"postgres exited with code {code} during startup; log {self.log_path}:\n"
                    f"{self.log_tail()}"
                )
            try:
                with self._admin(connect_timeout=2):
                    return
            except psycopg.OperationalError:
                # Refused, or "the database system is starting up" (crash recovery).
                if time.monotonic() > deadline:
                    raise PostgresError(
                        f"postgres not accepting connections after {self.startup_timeout:.0f}s;"
                        f" log {self.log_path}:\n{self.log_tail()}"
                    ) from None
                time.sleep(0.05)

    def _signal_and_wait(self, sig: signal.Signals, timeout: float) -> bool:
        """Send `sig` to the server's process group; True once the server has exited."""
        assert self._proc is not None
        if self._proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self._proc.pid, sig)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._proc.wait(timeout)
        return self._proc.poll() is not None

    def _reap(self, sig: signal.Signals, timeout: float) -> None:
        """Signal the server's process group, wait for the server, forget it."""
        if self._proc is not None:
            if not self._signal_and_wait(sig, timeout):
                raise PostgresError(f"postgres (pid {self._proc.pid}) ignored {sig.name}")
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self._proc.pid, signal.SIGKILL)  # backends the postmaster left
            self._proc = None
            atexit.unregister(self.stop)
        if self._socket_dir is not None:
            shutil.rmtree(self._socket_dir, ignore_errors=True)
            self._socket_dir = None

    def _admin(self, connect_timeout: int = 10) -> psycopg.Connection[Any]:
        return psycopg.connect(
            host="127.0.0.1",
            port=self.port,
            user=self.user,
            dbname="postgres",
            autocommit=True,
            connect_timeout=connect_timeout,
        )

    def _child_kwargs(self) -> dict[str, Any]:
        kwargs: dict[str, Any] = {"cwd": self.data_dir}
        if self._run_as is not None:
            kwargs |= {
                "user": self._run_as.pw_uid,
                "group": self._run_as.pw_gid,
                "extra_groups": [],
            }
        return kwargs


def _os_user_for_server() -> pwd.struct_passwd | None:
    """The OS user to run the server as: `postgres` when we are root, else ourselves (None)."""
    if os.geteuid() != 0:
        return None
    try:
        return pwd.getpwnam("postgres")
    except KeyError:
        raise PostgresError(
            f"running as root, but there is no `postgres` OS user to run the server. {SETUP_HINT}"
        ) from None


def _check_reachable(path: Path, user: pwd.struct_passwd) -> None:
    """Fail early, and clearly, if `user` cannot traverse every parent of `path`."""
    groups = set(os.getgrouplist(user.pw_name, user.pw_gid))
    for parent in path.parents:
        st = parent.stat()
        if st.st_uid == user.pw_uid:
            ok = st.st_mode & stat.S_IXUSR
        elif st.st_gid in groups:
            ok = st.st_mode & stat.S_IXGRP
        else:
            ok = st.st_mode & stat.S_IXOTH
        if not ok:
            raise PostgresError(
                f"the {user.pw_name!r} OS user cannot reach {path}: {parent} is mode "
                f"{stat.filemode(st.st_mode)}; choose a data dir under a world-traversable "
                "directory (e.g. one made with tempfile.mkdtemp() and chmod 0o755)"
            )


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _version_key(name: str) -> tuple[int, ...]:
    return tuple(int(p) for p in name.split(".") if p.isdigit())


def _tail(text: str, lines: int = 30) -> str:
    return "\n".join(text.splitlines()[-lines:])
