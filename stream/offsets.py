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
"""

from __future__ import annotations

import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Literal

Verdict = Literal["process", "drop"] | int  # an int: drop the event, seek the partition to it


@dataclass
class _Rewind:
    to: int  # the offset sought
    answer: int  # the first later offset that came instead
    seeks: int  # seeks answered by ``answer``
    at: float  # when the partition was last sought


class OffsetGuard:
    """``admit`` each event; seek where it says; call ``due`` now and then and seek those too.

    Events fetched before a seek keep coming for a while (Faust's stream buffer holds thousands
    under load), and while they do Faust moves its read position past what the seek brings
    back and drops it. So a rewind is sought again ``hold_s`` after its last seek for as long
    as it is pending: by the next early event, or by ``due`` when none comes."""

    def __init__(self, confirmations: int = 3, hold_s: float = 0.25,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.confirmations, self.hold_s, self._clock = confirmations, hold_s, clock
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
            self._rewinds[tp] = _Rewind(need, offset, 0, now)
            return need
        if offset == r.answer:  # where the broker resumes after a seek
            r.seeks += 1
            if r.seeks >= self.confirmations:  # every time: a hole the broker has
                self._next[tp] = offset + 1
                del self._rewinds[tp]
                self.holes_accepted += 1
                return "process"
        elif now - r.at < self.hold_s:
            return "drop"
        r.at = now
        return need

    def due(self) -> dict[Hashable, int]:
        """Pending rewinds last sought ``hold_s`` ago or more (marked sought again now)."""
        now, out = self._clock(), {}
        for tp, r in self._rewinds.items():
            if now - r.at >= self.hold_s:
                r.at, out[tp] = now, r.to
        return out
