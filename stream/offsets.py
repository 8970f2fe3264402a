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

from collections.abc import Hashable
from dataclasses import dataclass
from typing import Literal

Verdict = Literal["process"] | int  # an int: drop the event, seek the partition to that offset


@dataclass
class _Rewind:
    to: int  # the offset sought
    answer: int  # the first later offset that came instead
    seeks: int


class OffsetGuard:
    def __init__(self, confirmations: int = 3) -> None:
        self.confirmations = confirmations
        self._next: dict[Hashable, int] = {}
        self._rewinds: dict[Hashable, _Rewind] = {}
        self.holes_accepted = 0

    def reset(self) -> None:
        """On every rebalance: each partition starts again from its committed offset."""
        self._next.clear()
        self._rewinds.clear()

    def admit(self, tp: Hashable, offset: int, committed: int | None) -> Verdict:
        """What to do with the event at ``offset`` of ``tp``; ``committed`` is the partition's
        committed offset (the next one to read; None when nothing is committed).

        Every event past the missing offset asks for the seek again: events fetched before the
        seek keep coming for a while, and Faust drops what the seek brings back while they move
        its read position past it; the seek after the last of them is the one that works."""
        need = self._next.get(tp, committed)
        if need is None or offset == need:
            self._next[tp] = offset + 1
            self._rewinds.pop(tp, None)
            return "process"
        if offset < need:  # a redelivery: the window knows it
            return "process"
        r = self._rewinds.get(tp)
        if r is None or r.to != need:
            self._rewinds[tp] = _Rewind(need, offset, 1)
        elif offset == r.answer:
            r.seeks += 1
            if r.seeks >= self.confirmations:  # the broker resumes there every time
                self._next[tp] = offset + 1
                del self._rewinds[tp]
                self.holes_accepted += 1
                return "process"
        return need
