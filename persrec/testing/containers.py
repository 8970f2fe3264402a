"""Pytest plugin: persrec's services in Docker containers, started with testcontainers.

    # conftest.py of a suite that tests a service against persrec
    pytest_plugins = ["persrec.testing.containers"]

    def test_my_consumer(kafka_container, postgres_container, triton_container_factory,
                         worker_container_factory, model_repository):
        triton = triton_container_factory(model_repository, ["recommend", "fold"])
        worker = worker_container_factory(Settings(
            kafka_bootstrap=kafka_container.bootstrap_servers, triton_grpc_url=triton.grpc_url,
            database_url=postgres_container.url, model_repository=model_repository))
        ...  # publish to worker.settings.topic_interactions, read recommendations

Fixtures: ``kafka_container``, ``postgres_container``, ``triton_container_factory`` (session),
``worker_container_factory`` (function). With ``--persrec-services=containers`` (or
``PERSREC_TEST_SERVICES=containers``) the fixtures of the embedded services,
``kafka_bootstrap``, ``postgres_url`` and ``triton_factory``, come from these containers too, so
a suite written against the embedded services runs unchanged on containers.

Images, overridable by environment variables; the defaults are the official images and the two
that docker-compose.yml builds from docker/ (a missing image is pulled, so those two must be
built first):

    PERSREC_KAFKA_IMAGE     apache/kafka:3.9.1
    PERSREC_POSTGRES_IMAGE  postgres:16
    PERSREC_TRITON_IMAGE    persrec-triton:latest   (docker/triton.Dockerfile: NGC's + persrec)
    PERSREC_WORKER_IMAGE    persrec-app:latest      (docker/app.Dockerfile)

``PERSREC_TRITON_GPUS=all`` (or a count) hands GPUs to Triton (needs the NVIDIA container
toolkit). Without a reachable Docker daemon the fixtures skip, or fail where
``PERSREC_CONTAINERS_REQUIRED=1``. Where testcontainers' Ryuk image cannot be pulled, set
``TESTCONTAINERS_RYUK_DISABLED=true``: the fixtures remove every container they start.

Networking: each service publishes its ports on the Docker host, and the tests reach it there.
The worker container shares the host's network namespace, so it reaches every service at the
addresses the tests use. Kafka therefore needs a single client listener: it is advertised at the
Docker host's address and published on the same port number inside and out.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, fields
from enum import Enum
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, Self

import pytest

from persrec.embedded._proc import free_port, free_ports, http_ok
from persrec.settings import Settings
from persrec.stack import get_json, settings_env, worker_ready

if TYPE_CHECKING:
    import tritonclient.http as triton_http
    from testcontainers.core.container import DockerContainer

log = logging.getLogger(__name__)

SERVICES_ENV = "PERSREC_TEST_SERVICES"
REQUIRED_ENV = "PERSREC_CONTAINERS_REQUIRED"
GPUS_ENV = "PERSREC_TRITON_GPUS"
MARKER = "containers: needs a Docker daemon and the service images (scripts/containers-test.sh)"


class Services(str, Enum):
    """Where the generic service fixtures (kafka_bootstrap, postgres_url, triton_factory) run."""

    EMBEDDED = "embedded"  # local processes: persrec.testing.kafka / .postgres / .triton
    CONTAINERS = "containers"  # this module


@dataclass(frozen=True)
class ContainerImages:
    kafka: str = "apache/kafka:3.9.1"
    postgres: str = "postgres:16"
    triton: str = "persrec-triton:latest"
    worker: str = "persrec-app:latest"

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> ContainerImages:
        """``PERSREC_<NAME>_IMAGE`` for each field, where set."""
        return cls(**{f.name: env[var] for f in fields(cls)
                      if (var := f"PERSREC_{f.name.upper()}_IMAGE") in env and env[var]})


class ContainerError(RuntimeError):
    """A service container could not be created or did not become ready."""


def docker_host_address() -> str:
    """The address at which this process reaches ports published by the Docker daemon."""
    from testcontainers.core.docker_client import DockerClient

    host = DockerClient().host()
    return "127.0.0.1" if host == "localhost" else host  # no IPv6 detour through ::1


class ServiceContainer:
    """One testcontainers container: created, waited for until ready, stopped gracefully.

    Errors carry the tail of the container's log; a start that fails removes the container.
    """

    def __init__(self, name: str, container: DockerContainer, start_timeout: float) -> None:
        self.name = name
        self.container = container.with_name(f"persrec-{name}-{uuid.uuid4().hex[:8]}")
        self.start_timeout = start_timeout
        self._ports: dict[int, int] = {}

    def start(self) -> Self:
        """Create and start the container; return once it is ready."""
        import docker.errors

        started = time.monotonic()
        try:
            self.container.start()
            self._wait_ready(started + self.start_timeout)
        except docker.errors.ImageNotFound as exc:
            self.stop(timeout=0)
            raise ContainerError(
                f"image {self.container.image} not found and not pullable ({exc.explanation}): "
                "build it (docker compose build, or docker/standin/build.py where no registry "
                "is reachable) or point PERSREC_*_IMAGE at one that exists") from exc
        except BaseException:  # Ctrl-C included: a start either succeeds or leaves nothing
            self.stop(timeout=0)
            raise
        log.info("%s (%s) ready in %.1f s", self.name, self.container.image,
                 time.monotonic() - started)
        return self

    def _wait_ready(self, deadline: float) -> None:
        while True:
            self._raise_if_exited()
            if self._ready():
                return
            if time.monotonic() > deadline:
                raise ContainerError(f"{self.name} not ready after {self.start_timeout:.0f} s; "
                                     f"log:\n{self.log_tail()}")
            time.sleep(0.2)

    def _ready(self) -> bool:
        raise NotImplementedError

    def _raise_if_exited(self) -> None:
        wrapped = self.container.get_wrapped_container()
        wrapped.reload()
        if wrapped.status in ("exited", "dead"):
            code = wrapped.attrs["State"].get("ExitCode")
            raise ContainerError(f"{self.name} exited with code {code}; log:\n{self.log_tail()}")

    @property
    def host(self) -> str:
        """Where this process reaches the container's published ports."""
        host = self.container.get_container_host_ip()
        return "127.0.0.1" if host == "localhost" else host

    def port(self, container_port: int) -> int:
        """The host port published for ``container_port``."""
        if container_port not in self._ports:
            self._ports[container_port] = int(self.container.get_exposed_port(container_port))
        return self._ports[container_port]

    def log_tail(self, lines: int = 40) -> str:
        try:
            return self.container.get_wrapped_container().logs(tail=lines).decode(errors="replace")
        except Exception as exc:  # the container may be gone already
            return f"<no log: {exc}>"

    def stop(self, timeout: float = 15.0) -> None:
        """SIGTERM, up to ``timeout`` s to exit, then SIGKILL; the container is removed."""
        import docker.errors

        if self.container.get_wrapped_container() is None:  # never created
            return
        try:
            self.container.get_wrapped_container().stop(timeout=int(timeout))
        except docker.errors.APIError:
            pass
        try:
            self.container.stop()
        except docker.errors.NotFound:
            pass

    def kill(self) -> None:
        """SIGKILL, as in a crash; the container stays until ``stop()``."""
        self.container.get_wrapped_container().kill()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()


class KafkaContainer(ServiceContainer):
    """One KRaft broker, configured by the apache/kafka image's ``KAFKA_*`` variables."""

    CLUSTER_ID = "4L6g3nShT-eMCtK--X86sw"

    def __init__(self, image: str, port: int | None = None, start_timeout: float = 120.0) -> None:
        from testcontainers.core.container import DockerContainer

        self.client_port = port or free_port("0.0.0.0")
        self.advertised_host = docker_host_address()
        env = {
            "CLUSTER_ID": self.CLUSTER_ID,
            "KAFKA_NODE_ID": "1",
            "KAFKA_PROCESS_ROLES": "broker,controller",
            "KAFKA_LISTENERS": f"PLAINTEXT://:{self.client_port},CONTROLLER://:9093",
            "KAFKA_ADVERTISED_LISTENERS": f"PLAINTEXT://{self.advertised_host}:{self.client_port}",
            "KAFKA_LISTENER_SECURITY_PROTOCOL_MAP": "PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
            "KAFKA_CONTROLLER_LISTENER_NAMES": "CONTROLLER",
            "KAFKA_INTER_BROKER_LISTENER_NAME": "PLAINTEXT",
            "KAFKA_CONTROLLER_QUORUM_VOTERS": "1@localhost:9093",
            "KAFKA_OFFSETS_TOPIC_REPLICATION_FACTOR": "1",
            "KAFKA_TRANSACTION_STATE_LOG_REPLICATION_FACTOR": "1",
            "KAFKA_TRANSACTION_STATE_LOG_MIN_ISR": "1",
            "KAFKA_GROUP_INITIAL_REBALANCE_DELAY_MS": "0",
        }
        # Same number inside and out: the advertised address must work from every client.
        container = DockerContainer(image, env=env).with_bind_ports(self.client_port,
                                                                    self.client_port)
        super().__init__("kafka", container, start_timeout)

    @property
    def bootstrap_servers(self) -> str:
        return f"{self.advertised_host}:{self.client_port}"

    def _ready(self) -> bool:
        from persrec.embedded.kafka import metadata_ok

        return metadata_ok(self.bootstrap_servers)


class PostgresContainer(ServiceContainer):
    """A PostgreSQL server (the postgres image's variables) with one database, ``persrec``."""

    USER = PASSWORD = DATABASE = "persrec"
    PORT = 5432

    def __init__(self, image: str, start_timeout: float = 90.0) -> None:
        from testcontainers.core.container import DockerContainer

        container = (
            DockerContainer(image, env={"POSTGRES_USER": self.USER,
                                        "POSTGRES_PASSWORD": self.PASSWORD,
                                        "POSTGRES_DB": self.DATABASE})
            .with_exposed_ports(self.PORT)
            # Durability off, as for the embedded server: a test database dies with the test.
            .with_command(["postgres", "-c", "fsync=off", "-c", "full_page_writes=off"])
        )
        super().__init__("postgres", container, start_timeout)

    @property
    def url(self) -> str:
        return self.url_for(self.DATABASE)

    def url_for(self, database: str) -> str:
        """SQLAlchemy URL (psycopg 3 driver) of ``database`` on this server."""
        from sqlalchemy.engine import URL

        return URL.create("postgresql+psycopg", username=self.USER, password=self.PASSWORD,
                          host=self.host, port=self.port(self.PORT),
                          database=database).render_as_string(hide_password=False)

    def _connect(self, database: str = "postgres"):
        import psycopg

        return psycopg.connect(host=self.host, port=self.port(self.PORT), user=self.USER,
                               password=self.PASSWORD, dbname=database, connect_timeout=3,
                               autocommit=True)

    def _ready(self) -> bool:
        import psycopg

        try:
            with self._connect(self.DATABASE):
                return True
        except psycopg.OperationalError:
            return False

    def create_database(self, name: str) -> None:
        from psycopg import sql

        with self._connect() as conn:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))

    def drop_database(self, name: str) -> None:
        from psycopg import sql

        with self._connect() as conn:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)")
                         .format(sql.Identifier(name)))

    @contextlib.contextmanager
    def fresh_database(self) -> Iterator[str]:
        """The URL of a new, empty database, dropped on exit: tests never see each other's rows."""
        name = f"test_{os.getpid()}_{uuid.uuid4().hex[:12]}"
        self.create_database(name)
        try:
            yield self.url_for(name)
        finally:
            self.drop_database(name)


class TritonContainer(ServiceContainer):
    """tritonserver serving ``models`` of a host model repository, mounted read-only at /models.

    ``http_url`` and ``grpc_url`` are ``host:port`` without a scheme, as for ``EmbeddedTriton``.
    """

    HTTP, GRPC, METRICS = 8000, 8001, 8002

    def __init__(self, image: str, model_repository: Path, models: Sequence[str],
                 extra_args: Sequence[str] = (), gpus: str | None = None,
                 start_timeout: float = 180.0, env: Mapping[str, str] | None = None,
                 host_network: bool = False) -> None:
        """``env``: added to the server's environment. ``host_network``: the container runs in
        the host's network namespace on free ports, as the worker containers do, so it reaches
        what they reach (e.g. a database named by ``PERSREC_DATABASE_URL`` for the catalogue)."""
        from testcontainers.core.container import DockerContainer

        self.model_repository = Path(model_repository).resolve()
        if not self.model_repository.is_dir():
            raise FileNotFoundError(f"model repository {self.model_repository} does not exist")
        self.models = list(dict.fromkeys(models))
        command = [
            "tritonserver", "--model-repository=/models", "--model-control-mode=explicit",
            *(f"--load-model={name}" for name in self.models),
            "--disable-auto-complete-config", "--exit-timeout-secs=10", "--log-verbose=0",
            *extra_args,
        ]
        self._host_ports: dict[int, int] = {}
        if host_network:
            self._host_ports = dict(zip((self.HTTP, self.GRPC, self.METRICS), free_ports(3)))
            command += [f"--http-port={self._host_ports[self.HTTP]}", f"--grpc-port={self._host_ports[self.GRPC]}",
                        f"--metrics-port={self._host_ports[self.METRICS]}"]
        # The python backend keeps tensors in /dev/shm: Docker's default 64 MB is too small.
        run_options: dict[str, Any] = {"shm_size": "1g"}
        if gpus:
            from docker.types import DeviceRequest

            count = -1 if gpus == "all" else int(gpus)
            run_options["device_requests"] = [DeviceRequest(count=count, capabilities=[["gpu"]])]
        container = (
            DockerContainer(image, env=dict(env or {}))
            .with_command(command)
            .with_volume_mapping(str(self.model_repository), "/models", "ro")
        )
        if host_network:
            run_options["network_mode"] = "host"
        else:
            container = container.with_exposed_ports(self.HTTP, self.GRPC, self.METRICS)
        container = container.with_kwargs(**run_options)
        super().__init__("triton", container, start_timeout)

    @property
    def host(self) -> str:
        return docker_host_address() if self._host_ports else super().host

    def port(self, container_port: int) -> int:
        return self._host_ports.get(container_port) or super().port(container_port)

    @property
    def http_url(self) -> str:
        return f"{self.host}:{self.port(self.HTTP)}"

    @property
    def grpc_url(self) -> str:
        return f"{self.host}:{self.port(self.GRPC)}"

    @property
    def metrics_url(self) -> str:
        return f"http://{self.host}:{self.port(self.METRICS)}/metrics"

    def _ready(self) -> bool:
        return http_ok(f"http://{self.http_url}/v2/health/ready")

    def client(self, network_timeout: float = 120.0) -> triton_http.InferenceServerClient:
        """An HTTP client for this server (the caller closes it)."""
        import tritonclient.http as triton_http

        return triton_http.InferenceServerClient(self.http_url, network_timeout=network_timeout)


class WorkerContainer(ServiceContainer):
    """``persrec worker`` in the app image, configured by ``settings`` (as PERSREC_* variables).

    It runs in the host's network namespace, so ``settings`` holds the addresses the tests use.
    The model repository is mounted read-only at its own path; the work dir (and the SQLite
    file, when ``database_url`` is empty) stays inside the container. Same interface as
    ``persrec.stack.WorkerProcess``: ``api``, ``status()``, ``stop()``, ``kill()``.
    """

    WORK_DIR = "/var/lib/persrec"

    def __init__(self, image: str, settings: Settings, name: str = "worker",
                 start_timeout: float = 120.0) -> None:
        from testcontainers.core.container import DockerContainer

        self.settings = settings
        # No published ports: the API listens on the Docker host's own interfaces.
        self._host = docker_host_address()
        repository = str(Path(settings.model_repository).resolve())
        env = settings_env(settings) | {"PERSREC_WORK_DIR": self.WORK_DIR,
                                        "PERSREC_MODEL_REPOSITORY": repository,
                                        "PERSREC_API_HOST": "0.0.0.0"}
        container = (
            DockerContainer(image, env=env)
            .with_command(["worker"])
            .with_volume_mapping(repository, repository, "ro")
            .with_kwargs(network_mode="host")
        )
        super().__init__(name, container, start_timeout)

    @property
    def host(self) -> str:
        return self._host

    @property
    def api(self) -> str:
        return f"http://{self.host}:{self.settings.api_port}"

    def status(self) -> dict:
        return get_json(self.api + "/status")[1]

    def _ready(self) -> bool:
        return worker_ready(self.api)


# -- pytest ---------------------------------------------------------------------------------

def pytest_addoption(parser: pytest.Parser) -> None:
    parser.getgroup("persrec").addoption(
        "--persrec-services", choices=[s.value for s in Services], default=None,
        help=f"where kafka_bootstrap, postgres_url and triton_factory run (default: "
             f"${SERVICES_ENV}, else embedded)")


def services(config: pytest.Config) -> Services:
    chosen = config.getoption("persrec_services", default=None) or os.environ.get(SERVICES_ENV)
    return Services(chosen or Services.EMBEDDED.value)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", MARKER)
    if services(config) is Services.CONTAINERS and not config.pluginmanager.has_plugin(
            ContainerServices.NAME):
        # Registered last, so these definitions override the embedded fixtures of the same name.
        config.pluginmanager.register(ContainerServices(), ContainerServices.NAME)


class ContainerServices:
    """The generic service fixtures, backed by containers (``--persrec-services=containers``)."""

    NAME = "persrec-container-services"

    @pytest.fixture(scope="session")
    def kafka_bootstrap(self, kafka_container: KafkaContainer) -> str:
        return kafka_container.bootstrap_servers

    @pytest.fixture
    def postgres_url(self, postgres_container: PostgresContainer) -> Iterator[str]:
        with postgres_container.fresh_database() as url:
            yield url

    @pytest.fixture(scope="session")
    def triton_factory(self, triton_container_factory: TritonFactory) -> TritonFactory:
        return triton_container_factory


TritonFactory = Callable[..., TritonContainer]
WorkerFactory = Callable[..., WorkerContainer]


@pytest.fixture(scope="session")
def container_images() -> ContainerImages:
    return ContainerImages.from_env()


@pytest.fixture(scope="session")
def docker_daemon() -> None:
    """Skips (or fails, where PERSREC_CONTAINERS_REQUIRED=1) without a reachable daemon."""
    try:
        from testcontainers.core.docker_client import DockerClient

        DockerClient().client.ping()
    except Exception as exc:  # docker.errors.DockerException, or a connection error
        message = (f"no Docker daemon reachable ({type(exc).__name__}: {exc}); "
                   "scripts/containers-test.sh starts one")
        if os.environ.get(REQUIRED_ENV) == "1":
            pytest.fail(message, pytrace=False)
        pytest.skip(message)


@pytest.fixture(scope="session")
def kafka_container(docker_daemon: None, container_images: ContainerImages
                    ) -> Iterator[KafkaContainer]:
    with KafkaContainer(container_images.kafka) as kafka:
        yield kafka


@pytest.fixture(scope="session")
def postgres_container(docker_daemon: None, container_images: ContainerImages
                       ) -> Iterator[PostgresContainer]:
    with PostgresContainer(container_images.postgres) as postgres:
        yield postgres


@pytest.fixture(scope="session")
def triton_container_factory(docker_daemon: None, container_images: ContainerImages
                             ) -> Iterator[TritonFactory]:
    """``start(model_repository, models, extra_args=(), **kw) -> TritonContainer``, ready;
    every server is removed at the end of the session (or earlier with ``stop()``)."""
    started: list[TritonContainer] = []

    def start(model_repository: Path, models: Sequence[str], **kwargs: Any) -> TritonContainer:
        kwargs.setdefault("gpus", os.environ.get(GPUS_ENV) or None)
        server = TritonContainer(container_images.triton, model_repository, models, **kwargs)
        started.append(server)
        return server.start()

    try:
        yield start
    finally:
        for server in reversed(started):
            server.stop()


@pytest.fixture
def worker_container_factory(docker_daemon: None, container_images: ContainerImages
                             ) -> Iterator[WorkerFactory]:
    """``start(settings, name="worker") -> WorkerContainer``, ready; removed after the test."""
    started: list[WorkerContainer] = []

    def start(settings: Settings, name: str = "worker") -> WorkerContainer:
        worker = WorkerContainer(container_images.worker, settings, name)
        started.append(worker)
        return worker.start()

    try:
        yield start
    finally:
        for worker in reversed(started):
            worker.stop()
