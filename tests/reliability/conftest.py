"""The reliability suite (issue 5). Each scenario runs in two sizes:

- ``short`` (default; part of ``.ci/run``): the same checks on a small scale;
- ``long`` (``pytest tests/reliability --reliability=long``, or ``benchmarks/reliability.py``):
  the sizes RELIABILITY.md reports (>= 100,000 events, 30-minute soak, ...).

Scenarios record their measured figures with the ``figures`` fixture; they are merged into
``PERSREC_RELIABILITY_RESULTS`` (default: ``benchmarks/results/reliability.json`` for the long
scale, ``var/reliability-short.json`` (untracked) for the short one).
"""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path

import pytest

from persrec.testing.machine import code_commit

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def scale(request) -> str:
    return request.config.getoption("--reliability")


def pick(scale: str, short, long):
    """The short or the long value of a scenario parameter."""
    return long if scale == "long" else short


class Figures:
    """Measured figures of one scenario, written into the results file as they are recorded:
    the run's first record replaces the scenario's row (no figure of an earlier run survives
    in it), later ones add to it."""

    def __init__(self, path: Path, scenario: str, scale: str) -> None:
        self.path, self.scenario, self.scale = path, scenario, scale
        self._fresh = True

    def record(self, **values) -> None:
        data = json.loads(self.path.read_text()) if self.path.is_file() else {}
        if self._fresh:
            data[self.scenario], self._fresh = {}, False
        row = data.setdefault(self.scenario, {})
        row.update(values)
        row.update(scale=self.scale, recorded_at=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                   machine=f"{platform.machine()}, {os.cpu_count()} cores", code=code_commit("stream", "serving", "memory"),
                   load_average=[round(x, 2) for x in os.getloadavg()])  # what else used the cores
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


@pytest.fixture
def figures(request, scale) -> Figures:
    default = (ROOT / "benchmarks" / "results" / "reliability.json" if scale == "long"
               else ROOT / "var" / "reliability-short.json")
    path = Path(os.environ.get("PERSREC_RELIABILITY_RESULTS", default))
    return Figures(path, request.node.name, scale)
