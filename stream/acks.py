"""Acknowledge each partition's events in offset order, whatever order their work finishes in.

The worker finishes events out of order: a bad or re-keyed event is done at once, a valid one
only once its recommendation is delivered, and several recommendation batches may be in
flight. faust-streaming 0.15.3 commits the first run of consecutive acknowledged offsets even
when the offset just before it is still in flight (faust-streaming/faust#606: a one-offset gap
at the head is taken for a compacted-topic gap), so acknowledging offset n+1 before n could
commit past n and lose it in a crash. Acknowledging in order makes that case impossible.
"""

from __future__ import annotations

import collections
from collections.abc import Awaitable, Callable, Hashable
from typing import Any


class Ticket:
    __slots__ = ("done", "event")

    def __init__(self, event: Any) -> None:
        self.event, self.done = event, False


class OrderedAcks:
    """``track(partition, event)`` in the order events are read (per partition), then
    ``await finish(ticket)`` when an event is handled: events are passed to ``ack`` only once
    every earlier event of their partition is finished."""

    def __init__(self, ack: Callable[[Any], Awaitable[Any] | Any]) -> None:
        self._ack = ack
        self._pending: dict[Hashable, collections.deque[Ticket]] = collections.defaultdict(collections.deque)

    def track(self, partition: Hashable, event: Any) -> tuple[Hashable, Ticket]:
        ticket = Ticket(event)
        self._pending[partition].append(ticket)
        return partition, ticket

    async def finish(self, handle: tuple[Hashable, Ticket]) -> int:
        """Mark one event finished; returns how many events were acknowledged by this call."""
        partition, ticket = handle
        ticket.done = True
        queue, acked = self._pending[partition], 0
        while queue and queue[0].done:
            result = self._ack(queue.popleft().event)
            if isinstance(result, Awaitable):
                await result
            acked += 1
        return acked

    def waiting(self) -> int:
        """Events tracked and not acknowledged yet (finished or not)."""
        return sum(len(q) for q in self._pending.values())
