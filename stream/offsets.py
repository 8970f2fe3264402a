"""Every offset of an input partition reaches the agent, or the partition is read again from it.

After a broker restart (noida-db 0.2.2 under faust-streaming 0.15.3) the first event written to
a partition after the restart sometimes never reached the agent: the committed offset was n,
the stream's first event of that partition after the rebalance was n + 1, and the next commit
passed n (tests/reliability/test_outages.py::test_broker_restart, about one run in three).
Faust logged no skipped or dropped message, and giving it a new consumer generation at every
rebalance (noida-db numbers them from 1 again after a restart) did not stop it. Kafka input
topics have no holes unless the broker made them (transaction markers, compaction), so the agent
checks each event against the offset it needs next: the committed offset when the partition is
(re)assigned, then one past each event it handled. An event beyond it means something went
missing: the agent drops it and the worker seeks the partition back (earlier offsets are
redeliveries, which the window recognises). A hole the broker really has answers every seek
with the same later offset: after ``confirmations`` such answers the guard takes it as real.

The same guard catches a startup race in faust-streaming 0.15.3: after a rebalance its recovery
resumes the stream partitions before it seeks them to the committed offsets
(``tables/recovery.py``), so under a backlog records flow during the seek, and some partitions'
first events reach the agent past the committed offset. A seek back alone lost to the records
still in flight (below, ``ReadBarrier``): the worker re-read for 3-13 s, with 39-94 seeks, in 7
of 25 benchmark drains.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Hashable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Literal

from faust.transport.utils import DefaultSchedulingStrategy

Verdict = Literal["process", "drop"] | int  # an int: drop the event, seek the partition to it


@dataclass
class _Rewind:
    to: int  # the offset sought
    at: float  # when the partition was last sought
    early: float  # when an event past ``to`` last came (one fetched before the seek)
    began: float | None = None  # when the latest seek's re-read began (ReadBarrier)
    answer: int | None = None  # where it began, when not at ``to``
    last_answer: int | None = None
    seeks: int = 0  # consecutive re-reads that began at ``last_answer``


class OffsetGuard:
    """``admit`` each event; seek where it says; call ``due`` now and then and seek those too.

    Events fetched before a seek keep coming for a while (Faust's stream buffer holds thousands
    under load): they are dropped, and the ReadBarrier in front of Faust's consumer keeps them
    from spoiling the re-read. ``reread`` hears where each re-read began: at the sought offset,
    or later (a hole the broker has; or a start lost), and then the partition is sought again.
    ``due`` seeks again a rewind whose re-read began but never reached the agent within
    ``hold_s`` (nor any early event), or never began within ``stuck_s``."""

    def __init__(self, confirmations: int = 3, hold_s: float = 1.0, stuck_s: float = 10.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.confirmations, self.hold_s, self.stuck_s, self._clock = confirmations, hold_s, stuck_s, clock
        self._next: dict[Hashable, int] = {}
        self._rewinds: dict[Hashable, _Rewind] = {}
        self.holes_accepted = 0

    def reset(self) -> None:
        """On every rebalance: each partition starts again from its committed offset."""
        self._next.clear()
        self._rewinds.clear()

    def admit(self, tp: Hashable, offset: int, committed: int | None) -> Verdict:
        """What to do with the event at ``offset`` of ``tp``; ``committed`` is the partition's
        committed offset (the next one to read; None when nothing is committed)."""
        need = self._next.get(tp, committed)
        if need is None or offset == need:
            self._next[tp] = offset + 1
            self._rewinds.pop(tp, None)
            return "process"
        if offset < need:  # a redelivery: the window knows it
            return "process"
        now, r = self._clock(), self._rewinds.get(tp)
        if r is None or r.to != need:
            self._rewinds[tp] = _Rewind(need, now, now)
            return need
        if offset != r.answer:  # fetched before the seek
            r.early = now
            return "drop"
        r.seeks = r.seeks + 1 if offset == r.last_answer else 1
        r.last_answer = offset
        if r.seeks >= self.confirmations:  # every time: a hole the broker has
            self._next[tp] = offset + 1
            del self._rewinds[tp]
            self.holes_accepted += 1
            return "process"
        r.at, r.began, r.answer = now, None, None
        return need

    def reread(self, tp: Hashable, offset: int) -> None:
        """The re-read of ``tp`` began at ``offset`` (``ReadBarrier.on_reread``)."""
        if (r := self._rewinds.get(tp)) is not None:
            r.began, r.answer = self._clock(), (offset if offset != r.to else None)

    def due(self) -> dict[Hashable, int]:
        """Pending rewinds to seek again (marked sought now)."""
        now, out = self._clock(), {}
        for tp, r in self._rewinds.items():
            if r.began is None:
                late = now - r.at >= self.stuck_s
            else:
                late = now - max(r.began, r.early) >= self.hold_s
            if late:
                r.at, r.began, r.answer, out[tp] = now, None, None, r.to
        return out


class ReadBarrier:
    """Holds a partition's records back from Faust between a rewind and its re-read.

    A fetch brings hundreds of records, and Faust hands them to the stream as its buffer frees
    room, so records fetched before a seek keep passing after it. Each one raises Faust's read
    offset, and Faust then drops every record the seek brings back below that offset
    (``Consumer._drain_messages``); it also marks the offsets between the sought one and the
    stale one as a gap, which it counts as done when it commits (``Consumer._add_gap``; see
    ``_forget_gaps``). Measured before this barrier (a real broker, a rewind of 1,000 offsets
    under load): 38 seeks over 9.3 s, 15,001 events passed to the agent only to be dropped, and
    a gap [4001, 5002); with it, one seek (tests/stream/test_rewind.py).

    ``hold(tp, offset)`` before seeking, ``sought(tp)`` once the seek is done: from then on
    ``filter`` passes none of ``tp``'s records until the re-read begins (the record at
    ``offset``, or the first record of a fetch that came after the seek: where the broker has no
    record at ``offset``), then reports it to ``on_reread(tp, offset)`` and lets all through."""

    def __init__(self) -> None:
        self._held: dict[Hashable, list] = {}  # tp -> [offset sought, last fetch before the seek ended]
        self._fetches = 0
        self.on_reread: Callable[[Hashable, int], None] | None = None
        self.dropped = 0

    def hold(self, tp: Hashable, offset: int) -> None:
        self._held[tp] = [offset, None]

    def sought(self, tp: Hashable) -> None:
        if (held := self._held.get(tp)) is not None:
            held[1] = self._fetches

    def release(self, tp: Hashable) -> None:
        self._held.pop(tp, None)

    def clear(self) -> None:
        self._held.clear()

    def filter(self, records: Iterable[tuple[Hashable, Any]]) -> Iterator[tuple[Hashable, Any]]:
        """One fetch's ``(tp, record)`` pairs, less those held back."""
        self._fetches += 1
        return self._filter(records, self._fetches)

    def _filter(self, records, fetch: int):
        held = self._held
        for tp, record in records:
            if held and (h := held.get(tp)) is not None:
                if record.offset != h[0] and (h[1] is None or fetch <= h[1]):
                    self.dropped += 1
                    continue
                del held[tp]
                if self.on_reread is not None:
                    self.on_reread(tp, record.offset)
            yield tp, record


class BarrierScheduler(DefaultSchedulingStrategy):
    """Faust's record scheduler with a ReadBarrier in front (``App(ConsumerScheduler=...)``:
    Faust's consumer hands every fetch to ``iterate``)."""

    def __init__(self) -> None:
        super().__init__()
        self.barrier = ReadBarrier()

    def iterate(self, records):
        return self.barrier.filter(super().iterate(records))


class Rewinder:
    """Seeks partitions back for ``guard``, behind the barrier of the consumer's BarrierScheduler
    (``consumer()`` gives Faust's consumer: ``lambda: app.consumer``)."""

    def __init__(self, guard: OffsetGuard, consumer: Callable[[], Any]) -> None:
        self.guard, self._consumer = guard, consumer

    @property
    def barrier(self) -> ReadBarrier:
        return self._consumer().scheduler.barrier

    def reset(self) -> None:
        """On every rebalance (Faust seeks every partition to its committed offset)."""
        self.guard.reset()
        self.barrier.clear()

    async def seek(self, offsets: dict[Hashable, int]) -> None:
        consumer, barrier = self._consumer(), self.barrier
        barrier.on_reread = self._reread
        for tp, offset in offsets.items():
            barrier.hold(tp, offset)
            _forget_gaps(consumer, tp, offset)
        try:
            await consumer.seek_wait(offsets)
        except BaseException:  # let the records through again; the guard seeks again (due)
            for tp in offsets:
                barrier.release(tp)
            raise
        for tp in offsets:
            barrier.sought(tp)

    def _reread(self, tp: Hashable, offset: int) -> None:
        # Records fetched before the seek may have raised Faust's read offset past ``offset``:
        # it would drop the re-read. Faust's own seek_wait sets it the same way.
        self._consumer()._read_offset[tp] = offset
        self.guard.reread(tp, offset)


def _forget_gaps(consumer: Any, tp: Hashable, offset: int) -> None:
    """Drop Faust's gaps of ``tp`` from ``offset`` on: offsets it skipped as missing, which its
    commits count as done (``Consumer._add_gap``). Those past a rewind's offset are Faust's
    mistake (records fetched before a seek, such as its own after a rebalance, passed after it),
    and the re-read records the broker's real holes again as it passes them."""
    gaps = consumer._gap.get(tp)
    if gaps:
        end = max(g.end for g in gaps)
        if end > offset:
            gaps.chop(offset, end)
