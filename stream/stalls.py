"""A partition whose records stop reaching the agent is found and read again.

Seen once (short crash test, 2026-12-06): after a restart, one input partition's records never
reached the agent. Its lag stayed at 565, every other partition drained, no offset was missing
(so ``stream.offsets`` had nothing to see), and nothing else noticed. faust-streaming 0.15.3
fetches only the partitions in its consumer's "active" set and drops, unannounced, fetched
records of the others (``Consumer.getmany``); its rebalance, recovery and stream back-pressure
each take partitions out of that set and put them back, and a partition left out is never
fetched again (faust-streaming#175, "consumers slowly die over time", reports the same).

``StallWatch`` decides from facts the worker can check every few seconds: a partition is
stalled when the broker has records past the offset the agent needs next, that offset has not
moved for ``stall_s``, and all that time the agent could have taken its records (it was idle,
or it took other partitions' events). An agent that is busy with nothing new (an outage being
waited out) blames no partition. A stalled partition is logged with Faust's view of it, put back
in the consumer's active set, and sought to the offset the agent needs (``PartitionWatch.check``, a timer of the ``Pipeline``).
Reading a partition again costs at most the records in flight; the offset guard drops repeats.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Hashable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from . import faust_adapter as fa

if TYPE_CHECKING:
    import faust

    from .offsets import OffsetGuard

log = logging.getLogger(__name__)


@dataclass
class _Quiet:
    need: int | None  # the offset the agent needed at the last check
    since: float  # since when it has been stuck there with records waiting


class StallWatch:
    """``check`` every few seconds with each assigned partition's end offset and needed offset;
    it returns the partitions stalled for ``stall_s``. ``reset`` at every rebalance."""

    def __init__(self, stall_s: float = 30.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.stall_s, self._clock = stall_s, clock
        self._quiet: dict[Hashable, _Quiet] = {}
        self._admitted: int | None = None

    def reset(self) -> None:
        self._quiet.clear()
        self._admitted = None

    def check(self, ends: Mapping[Hashable, int], needs: Mapping[Hashable, int | None], admitted: int,
              agent_idle: bool) -> list[Hashable]:
        """``ends``: each partition's end offset at the broker (the next offset to be written);
        ``needs``: the offset the agent needs next from it (None: unknown); ``admitted``: the
        agent's count of events taken so far (any partition); ``agent_idle``: the agent is
        waiting for the stream now."""
        now = self._clock()
        free = agent_idle or (self._admitted is not None and admitted != self._admitted)
        self._admitted = admitted
        stalled = []
        for tp, end in ends.items():
            need = needs.get(tp)
            q = self._quiet.get(tp)
            if q is None or need is None or need != q.need or end <= need or not free:
                self._quiet[tp] = _Quiet(need, now)  # moving, caught up, unknown, or not its fault
            elif now - q.since >= self.stall_s:
                stalled.append(tp)
                q.since = now  # again only after another ``stall_s``
        for tp in set(self._quiet) - set(ends):
            del self._quiet[tp]
        return stalled


class PartitionWatch:
    """The worker's side of ``StallWatch``: reads the broker's end offsets of the input
    partitions assigned to this worker, and reads stalled ones again. The agent calls ``took``
    as each event reaches it and ``done`` once it has handled it."""

    def __init__(self, app: faust.App, topic: str, guard: OffsetGuard, watch: StallWatch,
                 seek: Callable[[dict], Awaitable[None]]) -> None:
        self.app, self.topic, self.guard, self.watch, self._seek = app, topic, guard, watch, seek
        self.every_s = watch.stall_s / 6  # how often to ``check``
        self.received = 0  # events that reached the agent
        self.idle = True  # the agent waits for the stream
        self.stalls = 0

    def reset(self) -> None:
        """At every rebalance: each partition is watched afresh."""
        self.watch.reset()

    def took(self) -> None:
        self.received += 1
        self.idle = False

    def done(self) -> None:
        self.idle = True

    async def check(self) -> list:
        """The partitions found stalled now, and sought again (none during a rebalance, while the
        broker does not answer, or before Faust's seek to the committed offsets)."""
        app, consumer = self.app, self.app.consumer
        if app.rebalancing or not consumer.flow_active or not fa.sought(app):
            return []
        tps = [tp for tp in consumer.assignment() if tp.topic == self.topic]
        try:
            answer = await asyncio.wait_for(consumer.highwaters(*tps), self.every_s) if tps else {}
            ends = {tp: answer[tp] for tp in tps if answer.get(tp) is not None}  # Faust's TP keys, not aiokafka's
            needs = {tp: self.guard.next_offset(tp, fa.committed_offset(app, tp)) for tp in tps}
            if unknown := [tp for tp, need in needs.items() if need is None]:  # never committed: from the start
                needs.update(await asyncio.wait_for(consumer.earliest_offsets(*unknown), self.every_s))
        except Exception as exc:  # noqa: BLE001 - the broker is away or slow: the next check asks again
            log.debug("stall check: no offsets from the broker (%s)", exc)
            return []
        stalled = [tp for tp in self.watch.check(ends, needs, self.received, self.idle) if not self.guard.rewinding(tp)]
        for tp in stalled:
            log.warning("%s:%s: no record for %.0fs while the broker has %d past offset %s; reading it again "
                        "(Faust's view: %s)", tp.topic, tp.partition, self.watch.stall_s, ends[tp] - needs[tp],
                        needs[tp], fa.partition_state(consumer, tp))
            fa.refetch(consumer, tp)
        if stalled:
            self.stalls += len(stalled)
            await self._seek({tp: needs[tp] for tp in stalled})
        return stalled


class RecoveryWatch:
    """Faust's table recovery, watched like the input (a task the ``Pipeline`` starts).

    Seen in CI (2026-12-07) and in about 1 of 25 local runs of ``test_broker_restart``: after
    the rebalance that follows a broker restart, recovery sought the changelog partitions and
    resumed the flow, then no changelog record reached it, and the worker answered nothing
    (Faust reads no input before recovery ends). When caught, aiokafka's fetch position stood at
    each partition's end while recovery had applied none of its records: fetched, then lost on
    the way to recovery. A changelog partition behind its end whose recovery offset has not
    moved for ``stall_s`` is logged with Faust's and aiokafka's view and where the consumer's
    tasks wait, put back among the partitions Faust fetches (``faust_adapter.refetch``), and
    sought to the next offset recovery needs, which brings the records back. Reading a
    changelog record twice is harmless: it sets the same value."""

    def __init__(self, app: faust.App, watch: StallWatch) -> None:
        self.app, self.watch = app, watch
        self.every_s = watch.stall_s / 3
        self.stalls = 0
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        """Check every ``every_s`` from now on (idempotent; at each assignment). Not a Faust timer:
        Faust starts those only once the first recovery has ended."""
        if self._task is None or self._task.done():
            self._task = asyncio.ensure_future(self._run())

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.every_s)
            try:
                await self.check()
            except Exception:  # noqa: BLE001 - a check that failed is tried again at the next tick
                log.exception("table recovery check failed")

    async def check(self) -> list:
        recovery, consumer = self.app.tables.recovery, self.app.consumer
        if not recovery.in_recovery:
            self.watch.reset()
            return []
        # Faust keeps the offset last applied (-1: none) and the last offset there is.
        offsets, highwaters = dict(recovery.active_offsets), dict(recovery.active_highwaters)
        needs = {tp: (-1 if offsets.get(tp) is None else offsets[tp]) + 1 for tp in highwaters}
        ends = {tp: end + 1 for tp, end in highwaters.items() if end is not None}
        stalled = self.watch.check(ends, needs, 0, agent_idle=True)
        tasks = fa.consumer_tasks(self.app) if stalled else []  # where the consumer waits: once a check
        for tp in stalled:
            log.warning("%s:%s: table recovery stuck at offset %d of %d for %.0fs; reading it again "
                        "(Faust's view: %s; aiokafka's: %s; consumer tasks: %s)", tp.topic, tp.partition,
                        needs[tp], ends[tp], self.watch.stall_s, fa.partition_state(consumer, tp),
                        fa.fetch_state(self.app, tp), tasks)
            fa.refetch(consumer, tp)
            await consumer.seek(tp, needs[tp])
        self.stalls += len(stalled)
        return stalled
