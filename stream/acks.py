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


class AckGate:
    """Lets the consumer acknowledge a message of ``topics`` only after ``release(message)``.

    faust-streaming 0.15.3 acknowledges the messages its stream *skips* (fetched under an old
    consumer generation or while flow control is paused, i.e. around a rebalance:
    ``it.after(event, do_ack or value is skipped_value, ...)`` in faust/streams.py). Such a
    message never reaches the agent, yet its offset counts as done, and a commit may pass it:
    after a broker restart one event in about three runs was never processed. Held back, the
    skipped message stays unacknowledged, the commit stops short of it and the seek to the
    committed offsets after the rebalance delivers it again. Other topics (changelogs) pass.
    """

    def __init__(self, topics: set[str]) -> None:
        self._topics = frozenset(topics)
        self._released: set[tuple[Any, int]] = set()

    def release(self, message: Any) -> None:
        self._released.add((message.tp, message.offset))

    def allows(self, message: Any) -> bool:
        """Whether the consumer may acknowledge ``message`` (``faust_adapter.wrap_ack``)."""
        if message.topic not in self._topics:
            return True
        key = (message.tp, message.offset)
        if key in self._released:
            self._released.discard(key)
            return True
        return False
