"""A guard against brokers that answer an empty fetch at once instead of waiting.

Kafka holds a fetch with no data for up to ``fetch.max.wait.ms``; some Kafka-protocol brokers
(noida-db 0.2.2, used for local runs and CI) answer immediately, and aiokafka then re-fetches in
a tight loop: an idle worker burns a whole core. This wraps aiokafka's per-node fetch so that a
fetch which brought nothing and came back faster than ``backoff_s`` waits out the rest before
that node is asked again. Against a real Kafka broker an empty fetch already took
``fetch.max.wait.ms``, so the guard never sleeps. Idempotent.
"""

from __future__ import annotations

import asyncio
import functools
import time

from aiokafka.consumer import fetcher

_ORIGINAL = fetcher.Fetcher._proc_fetch_request


def install_idle_fetch_backoff(backoff_s: float) -> None:
    if backoff_s <= 0:
        fetcher.Fetcher._proc_fetch_request = _ORIGINAL
        return

    @functools.wraps(_ORIGINAL)
    async def proc_fetch_request(self, assignment, node_id, request):
        started = time.monotonic()
        has_data = await _ORIGINAL(self, assignment, node_id, request)
        if not has_data:
            rest = backoff_s - (time.monotonic() - started)
            if rest > 0:
                try:
                    await asyncio.sleep(rest)
                except asyncio.CancelledError:  # the fetcher is closing: end quietly, as aiokafka does
                    pass
        return has_data

    fetcher.Fetcher._proc_fetch_request = proc_fetch_request
