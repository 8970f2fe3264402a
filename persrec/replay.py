"""Publish a dataset as interaction events, in time order, with kafka-python (as users do)."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import numpy as np
from kafka import KafkaProducer

from persrec.models.logs import Interactions, load_interactions


def events_in_time_order(inter: Interactions, limit: int | None = None) -> Iterator[dict]:
    """One event dict per interaction, oldest first (file order among equal times). Event ids
    ``r<k>`` number the events in that order, so a replay of the same file repeats its ids."""
    if inter.timestamps is None:  # order-only data: one second apart, in file order
        order = np.arange(len(inter))
        ts = 1_000_000_000 + np.arange(len(inter))
    else:
        order = np.argsort(inter.timestamps, kind="stable")
        ts = inter.timestamps
    if limit is not None:
        order = order[:limit]
    for k, i in enumerate(order):
        yield {"user_id": str(inter.users[i]), "item_id": str(inter.items[i]), "ts": int(ts[i]), "event_id": f"r{k}"}


def replay(
    path: str | Path, bootstrap: str, topic: str, *, rate: float | None = None,
    limit: int | None = None, fmt: str = "auto", on_progress: Callable[[int], None] | None = None,
    stop: threading.Event | None = None, columns: Mapping[str, str] | None = None,
) -> int:
    """Publish up to ``limit`` events at ``rate`` events/s (None = as fast as possible), keyed by
    user id; returns how many were sent (all acknowledged by the broker). Setting ``stop`` ends it
    early. ``columns``: ``load_interactions``' column names (``models.logs.parse_columns``)."""
    events = events_in_time_order(load_interactions(path, fmt, **(columns or {})), limit)
    producer = KafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=5)
    sent, start = 0, time.monotonic()
    try:
        for event in events:
            if stop is not None and stop.is_set():
                break
            producer.send(topic, key=event["user_id"].encode(), value=json.dumps(event).encode())
            sent += 1
            if rate:
                ahead = sent / rate - (time.monotonic() - start)
                if ahead > 0:
                    time.sleep(ahead)
            if on_progress is not None and sent % 1000 == 0:
                on_progress(sent)
        producer.flush()
    finally:
        producer.close()
    if on_progress is not None:
        on_progress(sent)
    return sent
