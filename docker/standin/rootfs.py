"""A root filesystem assembled from this machine's own files and streamed to ``docker import``.

No base image can be pulled here, so every stand-in image starts as a tar of host files: the
programs it runs, the shared libraries they load (found with ``ldd``), a shell, and a few files
in /etc. The layout is Debian's merged /usr, the same as the host's, so copied libraries keep
the paths their loaders expect.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import re
import stat
import subprocess
import tarfile
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import IO

log = logging.getLogger(__name__)

MULTIARCH = "usr/lib/x86_64-linux-gnu"
LOADER = "ld-linux-x86-64.so.2"
# `libname => /path (0x...)`, or the loader line `/lib64/ld-linux-x86-64.so.2 (0x...)`.
_LDD_LINE = re.compile(r"^\s*(?:(\S+) => )?(/\S+) \(0x[0-9a-f]+\)$")
_LDD_MISSING = re.compile(r"^\s*(\S+) => not found$")


@dataclass(frozen=True)
class Entry:
    kind: str  # "file", "text", "dir" or "symlink"
    source: Path | None = None  # kind "file": the host file
    data: bytes = b""  # kind "text"
    target: str = ""  # kind "symlink"
    mode: int = 0o644
    uid: int = 0
    gid: int = 0


class Rootfs:
    """Image path -> entry; parent directories are added on write."""

    def __init__(self) -> None:
        self.entries: dict[str, Entry] = {}
        self.library_path: list[str | Path] = []  # for libraries(): searched before the system

    # -- adding files ---------------------------------------------------------------------

    def dir(self, path: str, mode: int = 0o755, uid: int = 0, gid: int = 0) -> None:
        self.entries[_norm(path)] = Entry("dir", mode=mode, uid=uid, gid=gid)

    def symlink(self, path: str, target: str) -> None:
        self.entries[_norm(path)] = Entry("symlink", target=target, mode=0o777)

    def text(self, path: str, text: str, mode: int = 0o644) -> None:
        self.entries[_norm(path)] = Entry("text", data=text.encode(), mode=mode)

    def file(self, source: str | Path, path: str | None = None, mode: int | None = None) -> None:
        """A host file (symlinks followed) at ``path`` (default: the same path)."""
        real = Path(os.path.realpath(source))
        if not real.is_file():
            raise FileNotFoundError(f"{source} is not a file")
        mode = stat.S_IMODE(real.stat().st_mode) if mode is None else mode
        self.entries[_norm(path or str(source))] = Entry("file", source=real, mode=mode)

    def tree(self, source: str | Path, path: str,
             skip: Callable[[PurePosixPath], bool] = lambda rel: False) -> None:
        """A host directory, recursively; symlinks stay symlinks. ``skip`` sees relative paths."""
        source = Path(source)
        for dirpath, dirnames, filenames in os.walk(source):
            rel_dir = PurePosixPath(Path(dirpath).relative_to(source).as_posix())
            dirnames[:] = [d for d in dirnames if not skip(rel_dir / d)]
            for name in dirnames + filenames:
                rel = rel_dir / name
                if name in filenames and skip(rel):
                    continue
                host = Path(dirpath) / name
                dest = f"{path}/{rel}"
                if host.is_symlink():
                    self.symlink(dest, os.readlink(host))
                elif host.is_dir():
                    self.dir(dest, stat.S_IMODE(host.stat().st_mode))
                elif host.is_file():
                    self.entries[_norm(dest)] = Entry(
                        "file", source=host, mode=stat.S_IMODE(host.stat().st_mode))

    def base(self, users: Iterable[tuple[str, int]] = ()) -> None:
        """Merged /usr, /tmp, a shell (dash), ldconfig, and /etc/passwd + /etc/group."""
        for d in ("usr/bin", "usr/sbin", MULTIARCH, "usr/lib64", "usr/local/bin", "etc", "root",
                  "var/tmp"):
            self.dir(d)
        self.dir("tmp", 0o1777)
        for link in ("bin", "sbin", "lib", "lib64"):
            self.symlink(link, f"usr/{link}")
        self.file("/usr/bin/dash", "usr/bin/dash")
        self.symlink("usr/bin/sh", "dash")
        self.file("/usr/sbin/ldconfig", "usr/sbin/ldconfig")  # static: no libraries needed
        passwd = ["root:x:0:0:root:/root:/bin/sh"]
        group = ["root:x:0:"]
        for name, uid in users:
            passwd.append(f"{name}:x:{uid}:{uid}:{name}:/var/lib/{name}:/bin/sh")
            group.append(f"{name}:x:{uid}:")
        passwd.append("nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin")
        group.append("nogroup:x:65534:")
        self.text("etc/passwd", "\n".join(passwd) + "\n")
        self.text("etc/group", "\n".join(group) + "\n")
        self.text("etc/nsswitch.conf", "passwd: files\ngroup: files\nhosts: files dns\n")
        self.text("etc/ld.so.conf", "/usr/local/lib\n/usr/lib/x86_64-linux-gnu\n")

    def libraries(self, search_path: Iterable[str | Path] = ()) -> list[str]:
        """Add every host shared library that an ELF file of this rootfs loads; return the
        names ``ldd`` could not resolve (usually optional GPU libraries).

        ``search_path`` goes to ``LD_LIBRARY_PATH`` while resolving, so that a library shipped
        inside the rootfs (e.g. its own libpython) wins over a same-named system one.
        """
        files = [e.source for e in self.entries.values() if e.kind == "file"]
        inside = {Path(os.path.realpath(f)) for f in files}
        elves = sorted(f for f in files if _is_elf(f))
        env = dict(os.environ, LD_LIBRARY_PATH=os.pathsep.join(map(str, search_path)))
        with ThreadPoolExecutor(2) as pool:
            outputs = list(pool.map(lambda p: _ldd(p, env), elves))
        missing: set[str] = set()
        for out in outputs:
            for line in out.splitlines():
                if m := _LDD_MISSING.match(line):
                    missing.add(m.group(1))
                elif m := _LDD_LINE.match(line):
                    name, resolved = m.group(1) or Path(m.group(2)).name, Path(m.group(2))
                    if Path(os.path.realpath(resolved)) not in inside:
                        self.file(resolved, f"{MULTIARCH}/{name}")
        if f"{MULTIARCH}/{LOADER}" in self.entries:
            self.symlink(f"usr/lib64/{LOADER}", f"../lib/x86_64-linux-gnu/{LOADER}")
        return sorted(missing)

    # -- output ---------------------------------------------------------------------------

    def fingerprint(self, *extra: str | Path) -> str:
        """Changes when an entry or an ``extra`` file (e.g. the Dockerfile) changes.

        Host files count by image path, mode and size, not mtime: a venv set up again from the
        same pins (a fresh CI checkout on a reused machine) keeps the fingerprint.
        """
        h = hashlib.sha256()
        for path, e in sorted(self.entries.items()):
            h.update(f"{path}|{e.kind}|{e.mode:o}|{e.uid}|{e.gid}|{e.target}|".encode())
            if e.source is not None:
                h.update(f"{e.source.stat().st_size}|".encode())
            h.update(e.data)
        for f in extra:
            if Path(f).is_file():
                h.update(Path(f).read_bytes())
            else:
                h.update(str(f).encode())
        return h.hexdigest()[:16]

    def size(self) -> int:
        return sum(e.source.stat().st_size if e.source else len(e.data)
                   for e in self.entries.values())

    def write(self, stream: IO[bytes]) -> None:
        """An uncompressed tar stream of the whole tree, parents before children."""
        paths = set(self.entries)
        for path in list(paths):
            parent = PurePosixPath(path).parent
            while str(parent) != "." and str(parent) not in paths:
                paths.add(str(parent))
                self.entries.setdefault(str(parent), Entry("dir", mode=0o755))
                parent = parent.parent
        with tarfile.open(fileobj=stream, mode="w|", format=tarfile.GNU_FORMAT) as tar:
            for path in sorted(paths, key=lambda p: (p.count("/"), p)):
                e = self.entries[path]
                info = tarfile.TarInfo(path)
                info.mode, info.uid, info.gid = e.mode, e.uid, e.gid
                if e.kind == "dir":
                    info.type = tarfile.DIRTYPE
                    tar.addfile(info)
                elif e.kind == "symlink":
                    info.type, info.linkname = tarfile.SYMTYPE, e.target
                    tar.addfile(info)
                elif e.kind == "text":
                    info.size = len(e.data)
                    tar.addfile(info, io.BytesIO(e.data))
                else:
                    info.size = e.source.stat().st_size
                    info.mtime = int(e.source.stat().st_mtime)
                    with open(e.source, "rb") as f:
                        tar.addfile(info, f)


def _norm(path: str) -> str:
    return str(PurePosixPath("/", path).relative_to("/"))


def _is_elf(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(4) == b"\x7fELF"
    except OSError:
        return False


def _ldd(path: Path, env: dict[str, str]) -> str:
    # ldd exits non-zero on static binaries ("not a dynamic executable"): nothing to add then.
    return subprocess.run(["ldd", str(path)], capture_output=True, text=True, env=env).stdout
