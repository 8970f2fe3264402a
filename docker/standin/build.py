"""Build the images the containers suite runs on, on a machine that reaches no image registry.

    .venv/bin/python docker/standin/build.py        # prints `export PERSREC_*_IMAGE=...` lines

Stand-ins, each a tree of this machine's files (rootfs.py) imported with ``docker import`` and
configured by the Dockerfile beside this script:

    persrec-standin/python:3.11             for python:3.11-slim
    persrec-standin/kafka:noida-0.2.2       for apache/kafka (noida-db speaks the Kafka protocol)
    persrec-standin/postgres:15             for postgres (Debian's PostgreSQL 15)
    persrec-standin/tritonserver:2.51-python  for nvcr.io/nvidia/tritonserver:<yy.mm>-pyt-python-py3

Then the project's own Dockerfiles, unchanged, FROM those stand-ins:

    persrec-app:standin      docker/app.Dockerfile     (PERSREC_WORKER_IMAGE)
    persrec-triton:standin   docker/triton.Dockerfile  (PERSREC_TRITON_IMAGE)

A stand-in is imported again only when its fingerprint (paths, modes and sizes of its files,
plus its Dockerfile) differs from the label on the existing image, so a reused machine skips the
big python tree, even with a fresh checkout and venv. The project images always go through
``docker build``, whose layer cache skips the steps whose inputs did not change.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import subprocess
import sys
import sysconfig
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

sys.path.insert(0, str(Path(__file__).resolve().parent))
from rootfs import Rootfs  # noqa: E402  (a sibling script, not a package)

log = logging.getLogger("standin")

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
CACHE = ROOT / "build" / "containers"  # gitignored (build/)
LABEL = "persrec.standin.fingerprint"
OWNED = "persrec.standin=1"  # on every image built here, so that cleanup() touches only those
# Offline: every dependency is already in the stand-in python image.
OFFLINE_PIP = "--no-index --no-build-isolation"
PROJECT_FILES = ["pyproject.toml", "README.md"]
PROJECT_DIRS = ["persrec", "models", "memory", "stream", "serving", "triton_models"]
POSTGRES_UID = 999


@dataclass(frozen=True)
class Tags:
    python: str = "persrec-standin/python:3.11"
    kafka: str = "persrec-standin/kafka:noida-0.2.2"
    postgres: str = "persrec-standin/postgres:15"
    tritonserver: str = "persrec-standin/tritonserver:2.51-python"
    app: str = "persrec-app:standin"
    triton: str = "persrec-triton:standin"


# -- the trees ------------------------------------------------------------------------------

def _site_packages() -> Path:
    return Path(sysconfig.get_paths()["purelib"])


def python_rootfs() -> Rootfs:
    """CPython at /usr/local (from this interpreter's base install) + the venv's packages."""
    base = Path(sys.base_prefix)
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    fs = Rootfs()
    fs.base()
    fs.file("/usr/bin/bash", "usr/bin/bash")  # Triton's python backend starts its stub with bash
    fs.file(base / "bin" / version, f"usr/local/bin/{version}")
    fs.symlink("usr/local/bin/python3", version)
    fs.symlink("usr/local/bin/python", version)
    fs.text("usr/local/bin/pip", f"#!/usr/local/bin/{version}\nimport sys\n"
            "from pip._internal.cli.main import main\nsys.exit(main())\n", mode=0o755)
    fs.symlink("usr/local/bin/pip3", "pip")
    for lib in (base / "lib").glob("libpython3*.so*"):
        if lib.is_symlink():
            fs.symlink(f"usr/local/lib/{lib.name}", os.readlink(lib))
        else:
            fs.file(lib, f"usr/local/lib/{lib.name}")
    unneeded = {"test", "site-packages", "idlelib", "tkinter", "turtledemo", "ensurepip"}
    fs.tree(base / "lib" / version, f"usr/local/lib/{version}",
            skip=lambda rel: rel.parts[0] in unneeded or rel.suffix == ".a")
    # The project itself is installed by docker/app.Dockerfile; here only its dependencies.
    fs.tree(_site_packages(), f"usr/local/lib/{version}/site-packages", skip=_project_install)
    fs.library_path = [base / "lib"]  # its own libpython, not the system's
    return fs


def _project_install(rel: PurePosixPath) -> bool:
    name = rel.parts[0]
    return name.startswith(("__editable__", "persrec-"))


def kafka_rootfs() -> Rootfs:
    import noida_db  # the `local` extra

    fs = Rootfs()
    fs.base()
    fs.file(Path(noida_db.__file__).parent / "noida-db", "opt/noida/noida-db", mode=0o755)
    fs.dir("var/lib/kafka/data")
    return fs


def postgres_rootfs() -> Rootfs:
    fs = Rootfs()
    fs.base(users=[("postgres", POSTGRES_UID)])
    bin_dir = Path("/usr/lib/postgresql/15/bin")
    if not (bin_dir / "postgres").is_file():
        raise SystemExit("PostgreSQL 15 server not installed: run scripts/install-postgres.sh")
    for name in ("postgres", "initdb", "pg_ctl", "pg_isready", "psql"):
        fs.file(bin_dir / name)
    fs.tree("/usr/lib/postgresql/15/lib", "usr/lib/postgresql/15/lib")
    fs.tree("/usr/share/postgresql/15", "usr/share/postgresql/15")
    fs.tree("/usr/share/zoneinfo", "usr/share/zoneinfo")
    fs.dir("var/lib/postgresql", 0o755, POSTGRES_UID, POSTGRES_UID)
    fs.dir("var/lib/postgresql/data", 0o700, POSTGRES_UID, POSTGRES_UID)
    fs.dir("var/run/postgresql", 0o2775, POSTGRES_UID, POSTGRES_UID)
    return fs


def tritonserver_context(dest: Path) -> None:
    """NGC's layout as symlinks into the stand-in python image's site-packages."""
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    pytriton = f"/usr/local/lib/{version}/site-packages/pytriton/tritonserver"
    links = {
        "opt/tritonserver/bin/tritonserver": f"{pytriton}/bin/tritonserver",
        "opt/tritonserver/backends/python/libtriton_python.so":
            f"{pytriton}/backends/python/libtriton_python.so",
        "opt/tritonserver/backends/python/triton_python_backend_utils.py":
            f"{pytriton}/backends/python/triton_python_backend_utils.py",
        "opt/tritonserver/backends/python/triton_python_backend_stub":
            f"{pytriton}/python_backend_stubs/{sys.version_info.major}.{sys.version_info.minor}"
            "/triton_python_backend_stub",
    }
    shutil.rmtree(dest, ignore_errors=True)
    for path, target in links.items():
        (dest / path).parent.mkdir(parents=True, exist_ok=True)
        (dest / path).symlink_to(target)


def project_context(dest: Path) -> None:
    """The files docker/app.Dockerfile and docker/triton.Dockerfile copy, as at the repo root."""
    shutil.rmtree(dest, ignore_errors=True)
    dest.mkdir(parents=True)
    for name in PROJECT_FILES:
        shutil.copy2(ROOT / name, dest / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in PROJECT_DIRS:
        shutil.copytree(ROOT / name, dest / name, ignore=ignore)


# -- docker ---------------------------------------------------------------------------------

def docker(*args: str) -> str:
    # The classic builder: it needs no buildx plugin and resolves FROM from local images only.
    env = dict(os.environ, DOCKER_BUILDKIT="0")
    done = subprocess.run(["docker", *args], env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"docker {' '.join(args[:2])} failed:\n"
                         f"{done.stdout[-4000:]}{done.stderr[-4000:]}")
    return done.stdout


def label_of(tag: str) -> str | None:
    template = f'{{{{index .Config.Labels "{LABEL}"}}}}'
    done = subprocess.run(["docker", "image", "inspect", "-f", template, tag],
                          capture_output=True, text=True)
    return done.stdout.strip() if done.returncode == 0 else None


def build(tag: str, dockerfile: Path, context: Path, args: dict[str, str], label: str = "") -> None:
    argv = ["build", "--force-rm", "-t", tag, "-f", str(dockerfile)]
    for key, value in args.items():
        argv += ["--build-arg", f"{key}={value}"]
    argv += ["--label", OWNED]
    if label:
        argv += ["--label", f"{LABEL}={label}"]
    docker(*argv, str(context))


def import_rootfs(fs: Rootfs, tag: str) -> None:
    proc = subprocess.Popen(["docker", "import", "-", tag], stdin=subprocess.PIPE,
                            stdout=subprocess.DEVNULL)
    try:
        fs.write(proc.stdin)
    finally:
        proc.stdin.close()
    if proc.wait() != 0:
        raise SystemExit(f"docker import of {tag} failed")


def standin(name: str, tag: str, make: Callable[[], Rootfs], dockerfile: Path,
            extra: tuple[Path, ...] = (), force: bool = False) -> None:
    """Import and configure one stand-in, unless an image with the same fingerprint exists."""
    fs = make()
    fp = fs.fingerprint(dockerfile, *extra)
    if not force and label_of(tag) == fp:
        log.info("%-10s %s is up to date (%s)", name, tag, fp)
        return
    rootfs_tag = f"persrec-standin/rootfs-{name}:{fp}"
    started = time.monotonic()
    # Unresolved names are mostly libraries found at run time through their users' RPATH.
    missing = fs.libraries(fs.library_path)
    log.debug("%s: names ldd did not resolve: %s", name, ", ".join(missing))
    import_rootfs(fs, rootfs_tag)
    build(tag, dockerfile, HERE, {"ROOTFS": rootfs_tag}, label=fp)
    log.info("%-10s %s built in %.0f s (%.0f MB of host files)", name, tag,
             time.monotonic() - started, fs.size() / 1e6)


def cleanup(tags: Tags) -> None:
    """Remove what earlier builds left: untagged images of ours, and superseded rootfs tags."""
    docker("image", "prune", "-f", "--filter", f"label={OWNED}")
    keep = {tags.python, tags.kafka, tags.postgres}
    used = {label_of(tag) for tag in keep}
    listed = docker("image", "ls", "--format", "{{.Repository}}:{{.Tag}}",
                    "persrec-standin/rootfs-*").split()
    stale = [ref for ref in listed if ref.rsplit(":", 1)[1] not in used]
    if stale:
        docker("image", "rm", *stale)
        log.info("removed superseded stand-in trees: %s", ", ".join(stale))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--force", action="store_true", help="rebuild the stand-ins")
    opts = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s",
                        stream=sys.stderr)
    tags = Tags()
    started = time.monotonic()
    standin("python", tags.python, python_rootfs, HERE / "python.Dockerfile", force=opts.force)
    standin("kafka", tags.kafka, kafka_rootfs, HERE / "kafka.Dockerfile",
            (HERE / "kafka-entrypoint.sh",), force=opts.force)
    standin("postgres", tags.postgres, postgres_rootfs, HERE / "postgres.Dockerfile",
            (HERE / "postgres-entrypoint.sh",), force=opts.force)

    step = time.monotonic()
    tritonserver_context(CACHE / "context-tritonserver")
    build(tags.tritonserver, HERE / "tritonserver.Dockerfile", CACHE / "context-tritonserver",
          {"PYTHON_IMAGE": tags.python})
    project_context(CACHE / "context-project")
    build(tags.app, ROOT / "docker" / "app.Dockerfile", CACHE / "context-project",
          {"PYTHON_IMAGE": tags.python, "PIP_INSTALL_ARGS": OFFLINE_PIP})
    build(tags.triton, ROOT / "docker" / "triton.Dockerfile", CACHE / "context-project",
          {"TRITON_IMAGE": tags.tritonserver, "PIP_INSTALL_ARGS": OFFLINE_PIP})
    log.info("project images %s, %s built in %.0f s", tags.app, tags.triton,
             time.monotonic() - step)
    cleanup(tags)
    log.info("all images ready in %.0f s", time.monotonic() - started)

    print(f"export PERSREC_KAFKA_IMAGE={tags.kafka}")
    print(f"export PERSREC_POSTGRES_IMAGE={tags.postgres}")
    print(f"export PERSREC_TRITON_IMAGE={tags.triton}")
    print(f"export PERSREC_WORKER_IMAGE={tags.app}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
