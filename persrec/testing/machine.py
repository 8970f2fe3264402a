"""What the benchmarks record of the machine they ran on (sessions get different CPUs)."""

from __future__ import annotations

import platform
from pathlib import Path


def cpu_model() -> str:
    """The CPU's model name (Linux: /proc/cpuinfo), else what ``platform`` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def code_commit(*paths: str) -> str:
    """The code a result came from: ``$PERSREC_CODE_COMMIT`` when set (a job started from a
    commit that has moved on since), else the checkout's short HEAD, with ``+uncommitted`` when
    any of ``paths`` (relative to the repository) has changes; ``unknown`` outside a checkout."""
    import os
    import subprocess

    if commit := os.environ.get("PERSREC_CODE_COMMIT"):
        return commit
    root = Path(__file__).resolve().parents[2]
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=root, check=True).stdout.strip()
        dirty = paths and subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", *paths],
                                         capture_output=True, text=True, cwd=root, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + ("+uncommitted" if dirty else "")
