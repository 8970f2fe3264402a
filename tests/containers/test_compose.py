"""docker-compose.yml: its structure (no Docker needed), what `docker compose config` makes of
it, and a real `up` of the whole deployment on the stand-in images (containers marker)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
import yaml

from persrec.embedded._proc import free_ports
from persrec.models.checkpoint import save_checkpoint
from persrec.settings import Settings
from persrec.stack import get_json, wait_for

from ..stream import test_end_to_end as e2e

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_FILE = ROOT / "docker-compose.yml"
SERVICES = {"kafka", "postgres", "model-export", "triton", "worker", "api"}
ONE_SHOT = {"model-export"}
APP_SERVICES = {"model-export", "worker", "api"}
TRITON_IMAGE = re.compile(r"^nvcr\.io/nvidia/tritonserver:\d\d\.\d\d-pyt-python-py3$")
# What a deployment sets (README); the values only need to be distinguishable.
ENV = {"POSTGRES_PASSWORD": "pg-secret", "PERSREC_API_TOKEN": "api-secret",
       "PERSREC_CHECKPOINT": "/srv/persrec/best.pt"}


# -- reading the file -----------------------------------------------------------------------

_VAR = re.compile(r"\$\{(\w+)(?:(:?[-?])([^}]*))?\}")


def interpolate(value: Any, env: Mapping[str, str]) -> Any:
    """Compose's ``${VAR}``, ``${VAR:-default}`` and ``${VAR:?error}`` substitution."""
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if not isinstance(value, str):
        return value

    def substitute(m: re.Match) -> str:
        name, op, arg = m.group(1), m.group(2) or "", m.group(3) or ""
        value = env.get(name)
        if value is not None and not (op.startswith(":") and value == ""):
            return value
        if op.endswith("?"):
            raise KeyError(f"{name}: {arg}")
        return arg  # the default; empty for a plain ${VAR}

    return _VAR.sub(substitute, value)


def compose_cli() -> list[str] | None:
    if shutil.which("docker") and subprocess.run(["docker", "compose", "version"],
                                                 capture_output=True).returncode == 0:
        return ["docker", "compose"]
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    return None


@pytest.fixture(scope="module", params=["yaml", "compose config"])
def spec(request) -> dict:
    """The file as this test reads it, and as `docker compose config` normalises it."""
    if request.param == "yaml":
        return interpolate(yaml.safe_load(COMPOSE_FILE.read_text()), ENV)
    cli = compose_cli()
    if cli is None:
        pytest.skip("neither `docker compose` nor docker-compose is installed "
                    "(scripts/containers-test.sh installs Debian's docker-compose)")
    # Only ENV: variables of this process (the stand-in images of containers-test.sh) must not
    # leak into the file's defaults.
    referenced = {m.group(1) for m in _VAR.finditer(COMPOSE_FILE.read_text())}
    env = {k: v for k, v in os.environ.items() if k not in referenced} | ENV
    done = subprocess.run([*cli, "-f", str(COMPOSE_FILE), "config"], capture_output=True,
                          text=True, env=env, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    return yaml.safe_load(done.stdout)


def env_of(service: dict) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {k: str(v) for k, v in env.items()}


def volumes_of(service: dict) -> list[tuple[str, str, bool]]:
    """(source, target, read_only) in either the short or the long syntax."""
    out = []
    for v in service.get("volumes") or []:
        if isinstance(v, str):
            parts = v.split(":")
            out.append((parts[0], parts[1], len(parts) > 2 and "ro" in parts[2].split(",")))
        else:
            out.append((v["source"], v["target"], bool(v.get("read_only"))))
    return out


def published_ports(service: dict) -> dict[int, int]:
    return {int(p["target"]): int(p["published"]) for p in service.get("ports") or []}


def depends_on(service: dict) -> dict[str, str]:
    deps = service.get("depends_on") or {}
    if isinstance(deps, list):
        return {name: "service_started" for name in deps}
    return {name: d.get("condition", "service_started") for name, d in deps.items()}


# -- structure ------------------------------------------------------------------------------

def test_services_and_images(spec):
    services = spec["services"]
    assert set(services) == SERVICES
    assert services["kafka"]["image"].startswith("apache/kafka:")
    assert services["postgres"]["image"].startswith("postgres:")
    for name in APP_SERVICES:
        assert services[name]["image"] == "persrec-app:latest", name
        assert Path(services[name]["build"]["dockerfile"]).name == "app.Dockerfile"
    triton = services["triton"]
    assert triton["image"] == "persrec-triton:latest"
    assert Path(triton["build"]["dockerfile"]).name == "triton.Dockerfile"
    assert TRITON_IMAGE.match(triton["build"]["args"]["TRITON_IMAGE"])
    for service in services.values():
        if "build" in service:
            assert (ROOT / service["build"]["dockerfile"]).is_file()


def test_long_running_services_have_healthchecks_and_restart(spec):
    for name, service in spec["services"].items():
        if name in ONE_SHOT:
            assert "healthcheck" not in service and service["restart"] == "no"
            continue
        test = service["healthcheck"]["test"]
        assert test[0] in ("CMD", "CMD-SHELL") and len(test) > 1, name
        assert service["restart"] == "unless-stopped", name


def test_every_persrec_variable_is_a_setting_and_parses(spec, monkeypatch):
    for name, service in spec["services"].items():
        variables = {k: v for k, v in env_of(service).items() if k.startswith("PERSREC_")}
        unknown = {k for k in variables if k.removeprefix("PERSREC_").lower()
                   not in Settings.model_fields}
        assert not unknown, f"{name}: {unknown} are not fields of persrec.settings.Settings"
        if name in APP_SERVICES:
            for key in [k for k in os.environ if k.startswith("PERSREC_")]:
                monkeypatch.delenv(key)
            for key, value in variables.items():
                monkeypatch.setenv(key, value)
            Settings()  # raises on a value of the wrong type or range


def test_services_reach_each_other_where_they_listen(spec):
    services = spec["services"]
    kafka_env, pg_env = env_of(services["kafka"]), env_of(services["postgres"])
    for name in APP_SERVICES:
        s = Settings(**{k.removeprefix("PERSREC_").lower(): v
                        for k, v in env_of(services[name]).items() if k.startswith("PERSREC_")})
        assert f"PLAINTEXT://{s.kafka_bootstrap}" in kafka_env["KAFKA_ADVERTISED_LISTENERS"]
        assert s.triton_grpc_url == "triton:8001" and s.triton_http_url == "triton:8000"
        url = s.database_url
        assert url == (f"postgresql+psycopg://{pg_env['POSTGRES_USER']}:"
                       f"{pg_env['POSTGRES_PASSWORD']}@postgres:5432/{pg_env['POSTGRES_DB']}")
        assert str(s.model_repository) == "/models"
        assert ("models", "/models", name != "model-export") in volumes_of(services[name])
    # the fold cadence is the model's (its segment_len, in the exported manifest): no knob of
    # the workers' can disagree with the exporter's
    assert not any("FOLD_EVERY" in k for name in services for k in env_of(services[name]))


def test_kafka_runs_kraft_with_a_host_listener(spec):
    env = env_of(spec["services"]["kafka"])
    assert set(env["KAFKA_PROCESS_ROLES"].split(",")) == {"broker", "controller"}
    assert not any("ZOOKEEPER" in k for k in env)
    assert "EXTERNAL://" in env["KAFKA_ADVERTISED_LISTENERS"]
    assert published_ports(spec["services"]["kafka"]) == {9094: 9094}


def test_triton_gets_a_gpu_shared_memory_and_the_exported_repository(spec):
    services = spec["services"]
    triton = services["triton"]
    devices = triton["deploy"]["resources"]["reservations"]["devices"]
    assert [d["driver"] for d in devices] == ["nvidia"]
    assert devices[0]["capabilities"] == ["gpu"]
    assert str(triton["shm_size"]).lower() in ("1g", "1gb", str(2**30))
    assert ("models", "/models", True) in volumes_of(triton)
    assert triton["command"][0] == "tritonserver"
    assert "--model-repository=/models" in triton["command"]
    assert depends_on(triton) == {"model-export": "service_completed_successfully"}
    export = services["model-export"]
    assert export["command"][:1] == ["export"]
    assert export["command"][export["command"].index("--out") + 1] == "/models"
    assert export["command"][export["command"].index("--kind") + 1] == "KIND_GPU"
    assert (ENV["PERSREC_CHECKPOINT"], "/checkpoint.pt", True) in volumes_of(export)


def test_workers_and_api_wait_for_healthy_services(spec):
    services = spec["services"]
    healthy = {"kafka": "service_healthy", "postgres": "service_healthy"}
    assert depends_on(services["worker"]) == healthy | {"triton": "service_healthy"}
    assert depends_on(services["api"]) == healthy
    assert "ports" not in services["worker"]  # scaled with --scale: no fixed host port
    assert published_ports(services["api"]) == {8080: 8080}
    assert env_of(services["api"])["PERSREC_API_TOKEN"] == ENV["PERSREC_API_TOKEN"]


def test_secrets_are_required_not_defaulted():
    raw = yaml.safe_load(COMPOSE_FILE.read_text())
    for missing in ENV:
        with pytest.raises(KeyError, match=missing):
            interpolate(raw, {k: v for k, v in ENV.items() if k != missing})


# -- a real deployment on the stand-in images -------------------------------------------------

def standin_compose(spec: dict, images: Mapping[str, str], api_port: int, kafka_port: int) -> dict:
    """docker-compose.yml with only what cannot run here replaced:

    - the persrec images: the stand-in builds of docker/*.Dockerfile, not built by compose;
    - triton: no GPU reservation (there is no GPU), so model-export writes KIND_CPU models, and
      no memlock ulimit (this machine forbids raising RLIMIT_MEMLOCK: "operation not permitted");
    - kafka: a healthcheck its stand-in can run (the noida-db image has no Kafka CLI);
    - free host ports, and 2 s healthcheck intervals to save time.
    Kafka and PostgreSQL take their stand-ins through the file's own PERSREC_*_IMAGE variables.
    """
    spec = json.loads(json.dumps(spec))
    services = spec["services"]
    for name in APP_SERVICES:
        services[name]["image"] = images["worker"]
        services[name].pop("build")
    services["triton"]["image"] = images["triton"]
    services["triton"].pop("build")
    services["triton"].pop("deploy")
    services["triton"]["ulimits"].pop("memlock")
    kind = services["model-export"]["command"]
    kind[kind.index("--kind") + 1] = "KIND_CPU"
    services["kafka"]["healthcheck"]["test"] = ["CMD", "/opt/noida/noida-db", "version"]
    services["kafka"]["ports"][0]["published"] = kafka_port
    services["api"]["ports"][0]["published"] = api_port
    for service in services.values():
        if "healthcheck" in service:
            service["healthcheck"] |= {"interval": "2s", "start_period": "120s"}
    return spec


def _answers(url: str) -> bool:
    try:
        return get_json(url)[0] == 200
    except OSError:
        return False


class ComposeWorker:
    """A compose worker container, reached at its address on the compose network (a Linux
    Docker host routes to its bridge networks; the worker publishes no port)."""

    def __init__(self, address: str) -> None:
        self.api = f"http://{address}:8080"

    def status(self) -> dict:
        try:
            return get_json(self.api + "/status")[1]
        except OSError:
            return {}


@pytest.mark.containers
@pytest.mark.slow
@pytest.mark.usefixtures("docker_daemon")
def test_compose_up_on_standin_images(tmp_path, container_images, served_model, monkeypatch):
    """`docker compose up` of docker-compose.yml: Kafka, PostgreSQL, model-export, Triton, a
    worker and the API start in order on their healthchecks; then events go through the
    deployment and the end-to-end checks hold (recommendations, DLQ, folds, offline parity)."""
    cli = compose_cli()
    if cli is None:
        pytest.fail("no docker compose CLI: scripts/containers-test.sh installs docker-compose")
    images = {"worker": container_images.worker, "triton": container_images.triton}
    checkpoint = save_checkpoint(served_model.checkpoint, tmp_path / "best.pt")
    api_port, kafka_port = free_ports(2, "0.0.0.0")
    env = os.environ | ENV | {
        # float32 memories, as in tests/stream: the parity check compares exact rankings.
        "PERSREC_CHECKPOINT": str(checkpoint),
        "PERSREC_STORAGE_DTYPE": "float32",
        "PERSREC_PARTITIONS": "4", "PERSREC_KAFKA_IMAGE": container_images.kafka,
        "PERSREC_POSTGRES_IMAGE": container_images.postgres,
    }
    raw = interpolate(yaml.safe_load(COMPOSE_FILE.read_text()), env)
    compose_file = tmp_path / "docker-compose.yml"
    compose_file.write_text(yaml.safe_dump(standin_compose(raw, images, api_port, kafka_port)))
    project = f"persrec-test-{uuid.uuid4().hex[:8]}"
    compose = [*cli, "-p", project, "-f", str(compose_file)]

    def run(*args: str, timeout: float = 300) -> str:
        done = subprocess.run([*compose, *args], capture_output=True, text=True, env=env,
                              timeout=timeout)
        assert done.returncode == 0, f"{' '.join(args)}:\n{done.stderr[-4000:]}\n{logs()}"
        return done.stdout

    def logs() -> str:
        done = subprocess.run([*compose, "logs", "--no-color", "--tail", "30"],
                              capture_output=True, text=True, env=env, timeout=60)
        return done.stdout[-8000:]

    def inspect(service: str, template: str) -> str:
        container = run("ps", "-a", "-q", service).split()[0]
        return subprocess.run(["docker", "inspect", "-f", template, container],
                              capture_output=True, text=True, check=True).stdout.strip()

    def address(service: str) -> str:
        return inspect(service, "{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}")

    try:
        run("up", "-d", "--no-build")
        # The API's readiness covers Kafka, PostgreSQL, Triton and the exported model.
        wait_for(lambda: _answers(f"http://127.0.0.1:{api_port}/readyz"), 180, "the API's /readyz")
        assert inspect("model-export", "{{.State.ExitCode}}") == "0"
        worker = ComposeWorker(address("worker"))
        wait_for(lambda: "events_in" in worker.status(), 120, "the worker's status API")

        # Events through the deployment: Kafka's PLAINTEXT listener at its compose address.
        monkeypatch.setattr(e2e, "N_EVENTS", 1500)
        bootstrap = f"{address('kafka')}:9092"
        settings = Settings(topic_interactions="interactions",
                            topic_recommendations="recommendations",
                            topic_dlq="interactions.dlq", kafka_bootstrap=bootstrap)
        workers = [worker]
        messages, valid, bad = e2e.build_traffic(served_model)
        e2e.publish(bootstrap, settings.topic_interactions, messages)
        e2e.check_pipeline(served_model, settings, bootstrap, workers, valid, bad)
    finally:
        subprocess.run([*compose, "down", "-v", "--remove-orphans", "-t", "10"],
                       capture_output=True, env=env, timeout=180)
