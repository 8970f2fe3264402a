"""A user's recent window, as kept in the worker's changelog-backed table. Pure functions.

State: ``seq`` = number of valid events this user has ever had; ``items``/``ts`` = the last
``len(items)`` of them as original item ids (their seq numbers are ``seq-len+1 .. seq``), so the
window does not depend on any model's id map; ``recent`` = 64-bit digests of the last event ids
applied (a replayed event changes nothing); ``source`` = where the last event was read.

The memory in the database says how many events it has folded (its ``watermark``). The window
the model reads is the part after the watermark; items at or below it are dropped lazily, the
next time the user's state is written. A crash between writing a memory and trimming the
window therefore loses nothing and folds nothing twice.

In the changelog a window is MessagePack (``encode``/``decode``): times as differences, event
ids as 8-byte digests. It is written for every user on every batch, so its size is what the
broker pays for (the JSON of earlier releases was about twice as large; ``decode`` still reads it).
"""

from __future__ import annotations

import hashlib
import itertools
import json
from dataclasses import dataclass, field

import msgpack
import numpy as np

RECENT_IDS = 64  # replays of the same event id within this many events are recognised
FORMAT = 1  # first element of an encoded window


def id_digest(event_id: str) -> int:
    """64-bit digest of an event id. A new id matches one of the 64 digests a window keeps with
    probability 64 / 2^64 = 2^-58 per event (an event wrongly taken for a replay): never in practice."""
    return int.from_bytes(hashlib.blake2b(event_id.encode(), digest_size=8).digest(), "little")


@dataclass
class Window:
    seq: int = 0
    items: list[str] = field(default_factory=list)
    ts: list[int] = field(default_factory=list)
    recent: list[int] = field(default_factory=list)  # id_digest of the last RECENT_IDS event ids
    # [topic, partition, offset] of the input message of the last event applied
    source: list | None = None

    @property
    def base(self) -> int:
        """seq number of the event just before ``items[0]``."""
        return self.seq - len(self.items)


def encode(w: Window) -> bytes:
    deltas = [b - a for a, b in zip([0] + w.ts, w.ts)]
    return msgpack.packb([FORMAT, w.seq, w.items, deltas, np.asarray(w.recent, "<u8").tobytes(), w.source])


def decode(data: bytes | None) -> Window:
    """A window from ``encode``, from the JSON of earlier releases, or empty for None."""
    if not data:
        return Window()
    if data[:1] == b"{":
        d = json.loads(data)
        return Window(d["seq"], d["items"], d["ts"], [id_digest(e) for e in d.get("recent_ids", [])],
                      d.get("source"))
    fmt, seq, items, dts, recent, source = msgpack.unpackb(data)
    if fmt != FORMAT:
        raise ValueError(f"window format {fmt} is not {FORMAT} (written by a newer release?)")
    return Window(seq, items, list(itertools.accumulate(dts)), np.frombuffer(recent, "<u8").tolist(), source)


def seen(w: Window, event_id: str, source: tuple[str, int, int] | None = None) -> bool:
    """An event already applied: its id is among the last ``RECENT_IDS``, or its input message
    (topic, partition, offset) is at or before the last one applied from that partition. The
    second rule catches redeliveries after a crash or rebalance: the table's changelog can run
    ahead of the committed offsets by any number of one user's events. (It assumes offsets of
    the input topic never go back, i.e. the topic is not recreated under a live changelog.)"""
    if id_digest(event_id) in w.recent:
        return True
    last = w.source
    return (source is not None and last is not None
            and (last[0], last[1]) == (source[0], source[1]) and source[2] <= last[2])


def append(w: Window, event_id: str, item: str, ts: int,
           source: tuple[str, int, int] | None = None) -> Window:
    """The window after one new event (read from input message ``source``)."""
    recent = (w.recent + [id_digest(event_id)])[-RECENT_IDS:]
    last = list(source) if source is not None else w.source
    return Window(w.seq + 1, w.items + [item], w.ts + [ts], recent, last)


def trim(w: Window, watermark: int) -> Window:
    """Drop items already folded into a memory with this watermark."""
    cut = min(max(watermark - w.base, 0), len(w.items))
    if cut == 0:
        return w
    return Window(w.seq, w.items[cut:], w.ts[cut:], w.recent, w.source)


def effective(w: Window, watermark: int) -> tuple[list[str], list[int]]:
    """Items and times after the watermark: what the model reads with the memory."""
    t = trim(w, watermark)
    return t.items, t.ts


def read_start(n: int, cap: int) -> int:
    """Where to start reading ``n`` items when at most ``cap`` may be read: 0 if they fit, else
    the first multiple of ``cap // 4`` that leaves at most ``cap`` (so between 3/4 of ``cap``
    and ``cap`` are read). Aligned, not simply ``n - cap``: a user's consecutive events
    (``n``, ``n + 1``, ...) then read from the same start, each row is a prefix of the next, and
    one model pass answers them all (``serving.inference.shared_prefixes``). Starting at
    ``n - cap`` made every event of an overflowing burst a row of its own: in the streaming
    bench's drain, 71% of the model's rows and 92% of its attention work."""
    if n <= cap:
        return 0
    step = max(cap // 4, 1)
    return -(-(n - cap) // step) * step


def fold_segment(
    w: Window, watermark: int, recent_len: int, segment_len: int, max_watermark: int | None = None,
    max_segments: int | None = None,
) -> tuple[list[str], list[int], int]:
    """The oldest items to fold, and the watermark after folding them: whole segments of
    ``segment_len`` (the model's fold cadence; at most ``max_segments``), so that at least
    ``recent_len`` stay and the watermark does not pass ``max_watermark``. Whole segments make
    a user's folds depend on their events only, never on when the folds ran."""
    items, ts = effective(w, watermark)
    start = max(watermark, w.base)  # a memory may lag the window (e.g. lost in a model change)
    n = max(len(items) - recent_len, 0)
    if max_watermark is not None:
        n = max(min(n, max_watermark - start), 0)
    segments = n // segment_len if max_segments is None else min(n // segment_len, max_segments)
    n = segments * segment_len
    return items[:n], ts[:n], start + n
