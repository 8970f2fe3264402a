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

from . import faust_adapter

Verdict = Literal["process", "drop"] | int  # an int: drop the event, seek the partition to it


@dataclass
class _Rewind:
    to: int  # the offset sought
    mark: int = 0  # the guard's count of admitted events at the latest seek, or its re-read's start
    seen: int = 0  # the count ``due`` last saw,
    progress: float = 0.0  # and when it last changed (from ``mark`` on)
    began: bool = False  # the latest seek's re-read began (ReadBarrier)
    answer: int | None = None  # where it began, when not at ``to``
    passed: int | None = None  # the highest offset the barrier had passed on before it
    last_answer: int | None = None
    seeks: int = 0  # consecutive re-reads that began at ``last_answer``


class OffsetGuard:
    """``admit`` each event; seek where it says; call ``due`` now and then and seek those too.

    Events fetched before a seek keep coming for a while (Faust's stream buffer holds thousands
    under load): they are dropped, and the ReadBarrier in front of Faust's consumer keeps them
    from spoiling the re-read. ``reread`` hears where each re-read began: at the sought offset,
    or later (a hole the broker has; or a start lost), and then the partition is sought again.

    Once a re-read began, its first record reaches the agent behind whatever Faust had queued
    before it, which takes as long as the agent needs for those; and a seek's re-read begins only
    when Faust fetches again, once its stream buffer has room. No clock can tell a slow agent
    from a lost record (a rule that sought again when a re-read's first record had not come
    within 1 s made a model-bound benchmark worker re-read, and answer again, 1,066 of 30,000
    events). Order can: a partition's records reach the agent in offset order, so one past
    ``passed`` (the highest offset of the partition Faust had been given before the re-read)
    comes from the re-read, and if the re-read's first record has not come before it, that
    record was lost: seek again. ``due`` is the backstop, by the agent's progress: seek again
    when the agent has admitted ``max_ahead`` events since the seek or its re-read's start (more
    than Faust queues ahead of it: its stream buffer holds 4,096, but Faust moves every fetched
    record into it past that size, and a benchmark drain had more than 8,192 ahead) or none at
    all for ``stuck_s``."""

    def __init__(self, confirmations: int = 3, stuck_s: float = 10.0, max_ahead: int = 100_000,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.confirmations, self.stuck_s, self.max_ahead, self._clock = confirmations, stuck_s, max_ahead, clock
        self._next: dict[Hashable, int] = {}
        self._rewinds: dict[Hashable, _Rewind] = {}
        self.holes_accepted = 0
        self.admitted = 0  # events admitted (any partition), for ``due``
        self.due_every_s = stuck_s / 10  # how often to call ``due``

    def reset(self) -> None:
        """On every rebalance: each partition starts again from its committed offset."""
        self._next.clear()
        self._rewinds.clear()

    def admit(self, tp: Hashable, offset: int, committed: int | None) -> Verdict:
        """What to do with the event at ``offset`` of ``tp``; ``committed`` is the partition's
        committed offset (the next one to read; None when nothing is committed)."""
        self.admitted += 1
        need = self._next.get(tp, committed)
        if need is None or offset == need:
            self._next[tp] = offset + 1
            self._rewinds.pop(tp, None)
            return "process"
        if offset < need:  # a redelivery: the window knows it
            return "process"
        r = self._rewinds.get(tp)
        if r is None or r.to != need:
            self._restart(r := _Rewind(need))
            self._rewinds[tp] = r
            return need
        if offset != r.answer:
            if r.began and r.passed is not None and offset > r.passed:
                self._restart(r)  # from the re-read, which lost its first record: seek again
                return need
            return "drop"  # fetched before the seek
        r.seeks = r.seeks + 1 if offset == r.last_answer else 1
        r.last_answer = offset
        if r.seeks >= self.confirmations:  # every time: a hole the broker has
            self._next[tp] = offset + 1
            del self._rewinds[tp]
            self.holes_accepted += 1
            return "process"
        self._restart(r)
        return need

    def reread(self, tp: Hashable, offset: int, passed: int | None = None) -> None:
        """The re-read of ``tp`` began at ``offset`` (``ReadBarrier.on_reread``); ``passed``:
        the highest offset of ``tp`` Faust had been given before it."""
        if (r := self._rewinds.get(tp)) is not None:
            self._restart(r)
            r.began, r.answer, r.passed = True, (offset if offset != r.to else None), passed

    def next_offset(self, tp: Hashable, committed: int | None) -> int | None:
        """The offset of ``tp`` the agent needs next (``committed``: Faust's committed offset)."""
        return self._next.get(tp, committed)

    def rewinding(self, tp: Hashable) -> bool:
        """A seek of ``tp`` is pending: its re-read has not begun (``due`` watches it)."""
        return tp in self._rewinds

    def due(self) -> dict[Hashable, int]:
        """Pending rewinds to seek again (marked sought now)."""
        now, out = self._clock(), {}
        for tp, r in self._rewinds.items():
            if r.seen != self.admitted:
                r.seen, r.progress = self.admitted, now
            if self.admitted - r.mark >= self.max_ahead or now - r.progress >= self.stuck_s:
                self._restart(r, now)
                out[tp] = r.to
        return out

    def _restart(self, r: _Rewind, now: float | None = None) -> None:
        """A seek, or its re-read's start: watch the agent's progress from here."""
        r.mark = r.seen = self.admitted
        r.progress = self._clock() if now is None else now
        r.began, r.answer = False, None


class ReadBarrier:
    """Holds a partition's records back from Faust between a rewind and its re-read.

    A fetch brings hundreds of records, and Faust hands them to the stream as its buffer frees
    room, so records fetched before a seek keep passing after it. Each one raises Faust's read
    offset, and Faust then drops every record the seek brings back below that offset
    (``Consumer._drain_messages``); it also marks the offsets between the sought one and the
    stale one as a gap, which it counts as done when it commits (``Consumer._add_gap``; see
    ``faust_adapter.forget_gaps``). Measured before this barrier (a real broker, a rewind of 1,000 offsets
    under load): 38 seeks over 9.3 s, 15,001 events passed to the agent only to be dropped, and
    a gap [4001, 5002); with it, one seek (tests/stream/test_rewind.py).

    ``hold(tp, offset)`` before seeking, ``sought(tp)`` once the seek is done: from then on
    ``filter`` passes none of ``tp``'s records until the re-read begins (the record at
    ``offset``, or the first record of a fetch that came after the seek: where the broker has no
    record at ``offset``), then reports it to ``on_reread(tp, offset)`` and lets all through.
    ``passed`` holds the highest offset of each partition it has passed on (OffsetGuard)."""

    def __init__(self) -> None:
        self._held: dict[Hashable, list] = {}  # tp -> [offset sought, last fetch before the seek ended]
        self.passed: dict[Hashable, int] = {}  # tp -> the highest offset passed on (since ``clear``)
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
        self.passed.clear()

    def filter(self, records: Iterable[tuple[Hashable, Any]]) -> Iterator[tuple[Hashable, Any]]:
        """One fetch's ``(tp, record)`` pairs, less those held back."""
        self._fetches += 1
        return self._filter(records, self._fetches)

    def _filter(self, records, fetch: int):
        held, passed = self._held, self.passed
        for tp, record in records:
            if held and (h := held.get(tp)) is not None:
                if record.offset != h[0] and (h[1] is None or fetch <= h[1]):
                    self.dropped += 1
                    continue
                del held[tp]
                if self.on_reread is not None:
                    self.on_reread(tp, record.offset)
            if (top := passed.get(tp)) is None or record.offset > top:
                passed[tp] = record.offset
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
            faust_adapter.forget_gaps(consumer, tp, offset)
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
        # it would drop the re-read. Faust's own seek_wait sets it the same way. (Faust's read
        # offset cannot tell the guard where the records queued before the re-read end: Faust's
        # own seeks set it back while stale records are still queued; the barrier's can.)
        faust_adapter.set_read_offset(self._consumer(), tp, offset)
        self.guard.reread(tp, offset, self.barrier.passed.get(tp))
