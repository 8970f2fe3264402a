"""The README's kafka-python snippets, run as written (only the broker address and topic names
are swapped for this test's) against the broker and a real worker."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from persrec.embedded.kafka import create_topics

README = Path(__file__).resolve().parents[2] / "README.md"
pytestmark = [pytest.mark.kafka, pytest.mark.triton]


def snippet(name: str) -> str:
    match = re.search(rf"<!-- snippet: {name} -->\n```python\n(.*?)```", README.read_text(), re.S)
    assert match, f"README has no snippet {name!r}"
    return match.group(1)


def adapt(code: str, settings) -> str:
    return (code.replace("127.0.0.1:9092", settings.kafka_bootstrap)
                .replace('"interactions"', repr(settings.topic_interactions))
                .replace('"recommendations"', repr(settings.topic_recommendations)))


def test_publish_and_consume_snippets(worker_settings, start_worker, tmp_path) -> None:
    settings = worker_settings()
    create_topics(settings.kafka_bootstrap, {settings.topic_interactions: settings.partitions})
    start_worker(settings)
    exec(compile(adapt(snippet("publish"), settings), "README:publish", "exec"), {})
    script = tmp_path / "consume.py"
    script.write_text(adapt(snippet("consume"), settings))
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()  # the consumer loops forever, as in the README
    finally:
        proc.kill()
        proc.wait()
    user, event_id, items = line.split(" ", 2)
    assert (user, event_id) == ("42", "42-1")
    assert len(eval(items)) == 10  # noqa: S307 - the snippet prints a Python list
