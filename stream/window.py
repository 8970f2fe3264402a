"""A user's recent window, as kept in the worker's changelog-backed table. Pure functions.

State (JSON in the table): ``seq`` = number of valid events this user has ever had;
``items``/``ts`` = the last ``len(items)`` of them as original item ids (their seq numbers are
``seq-len+1 .. seq``), so the window does not depend on any model's id map;
``recent_ids`` = the last event ids applied (a replayed event changes nothing).

The memory in the database says how many events it has folded (its ``watermark``). The window
the model reads is the part after the watermark; items at or below it are dropped lazily, the
next time the user's state is written. A crash between writing a memory and trimming the
window therefore loses nothing and folds nothing twice.
"""

from __future__ import annotations

from dataclasses import dataclass, field

RECENT_IDS = 64  # replays of the same event id within this many events are recognised


@dataclass
class Window:
    seq: int = 0
    items: list[str] = field(default_factory=list)
    ts: list[int] = field(default_factory=list)
    recent_ids: list[str] = field(default_factory=list)
    # [topic, partition, offset] of the input message of the last event applied
    source: list | None = None

    @classmethod
    def from_json(cls, d: dict | None) -> "Window":
        return cls(**d) if d else cls()

    def to_json(self) -> dict:
        return {"seq": self.seq, "items": self.items, "ts": self.ts, "recent_ids": self.recent_ids,
                "source": self.source}

    @property
    def base(self) -> int:
        """seq number of the event just before ``items[0]``."""
        return self.seq - len(self.items)


def seen(w: Window, event_id: str, source: tuple[str, int, int] | None = None) -> bool:
    """An event already applied: its id is among the last ``RECENT_IDS``, or its input message
    (topic, partition, offset) is at or before the last one applied from that partition. The
    second rule catches redeliveries after a crash or rebalance: the table's changelog can run
    ahead of the committed offsets by any number of one user's events. (It assumes offsets of
    the input topic never go back, i.e. the topic is not recreated under a live changelog.)"""
    if event_id in w.recent_ids:
        return True
    last = w.source
    return (source is not None and last is not None
            and (last[0], last[1]) == (source[0], source[1]) and source[2] <= last[2])


def append(w: Window, event_id: str, item: str, ts: int,
           source: tuple[str, int, int] | None = None) -> Window:
    """The window after one new event (read from input message ``source``)."""
    ids = (w.recent_ids + [event_id])[-RECENT_IDS:]
    last = list(source) if source is not None else w.source
    return Window(w.seq + 1, w.items + [item], w.ts + [ts], ids, last)


def trim(w: Window, watermark: int) -> Window:
    """Drop items already folded into a memory with this watermark."""
    cut = min(max(watermark - w.base, 0), len(w.items))
    if cut == 0:
        return w
    return Window(w.seq, w.items[cut:], w.ts[cut:], w.recent_ids, w.source)


def effective(w: Window, watermark: int) -> tuple[list[str], list[int]]:
    """Items and times after the watermark: what the model reads with the memory."""
    t = trim(w, watermark)
    return t.items, t.ts


def fold_segment(
    w: Window, watermark: int, recent_len: int, max_watermark: int | None = None,
) -> tuple[list[str], list[int], int]:
    """The oldest items to fold so that ``recent_len`` stay (and the watermark does not pass
    ``max_watermark``), and the watermark after folding."""
    items, ts = effective(w, watermark)
    start = max(watermark, w.base)  # a memory may lag the window (e.g. lost in a model change)
    n = max(len(items) - recent_len, 0)
    if max_watermark is not None:
        n = max(min(n, max_watermark - start), 0)
    return items[:n], ts[:n], start + n
