"""Everything the worker does to faust-streaming and aiokafka beyond their public API, in one
place, checked at import against the versions it was written and tested for.

The worker relies on behaviour of faust-streaming 0.15.3 and aiokafka 0.14.0 that no public API
offers (each function says why it is needed):

- ``create_app``: the Faust app, with a monitor that skips per-event bookkeeping and a record
  scheduler with a read barrier in front (``offsets.BarrierScheduler``);
- ``install_idle_fetch_backoff``: aiokafka's per-node fetch, paced against brokers that answer
  an empty fetch at once;
- ``wrap_ack``: the consumer's ``ack``, gated (``acks.AckGate``);
- ``committed_offset``, ``set_read_offset``, ``forget_gaps``: the consumer's record of committed
  offsets, read offsets and skipped gaps (``offsets``);
- ``member_id``: the consumer group member id this process holds (``members``);
- ``partition_state``, ``refetch``: Faust's view of a partition, and putting a partition back
  among those it fetches (``stalls``);
- ``install_abandoned_member_leave``: a member id the consumer gives up is taken out of the
  group at once (``members``);
- ``WindowStore``: the window table's local store and changelog, written separately.

Another version of either library fails here, at import, with what to do, rather than
misbehaving at run time.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Callable, Hashable
from importlib.metadata import version
from typing import Any

TESTED = {"faust-streaming": "0.15.3", "aiokafka": "0.14.0"}
_found = {name: version(name) for name in TESTED}
if _found != TESTED:
    raise ImportError(
        f"persrec's stream worker patches private parts of {TESTED} and was tested with exactly "
        f"those versions; found {_found}. Install the pinned versions (pyproject.toml), or review "
        "persrec/stream/faust_adapter.py against the new ones before changing the pins.")

import faust  # noqa: E402 - after the version check
from aiokafka.client import ConnectionGroup  # noqa: E402
from aiokafka.consumer import fetcher  # noqa: E402
from aiokafka.consumer.group_coordinator import GroupCoordinator  # noqa: E402
from aiokafka.protocol.group import LeaveGroupRequest  # noqa: E402
from aiokafka.structs import TopicPartition as AioTP  # noqa: E402
from faust.sensors.monitor import Monitor  # noqa: E402
from faust.transport.consumer import Consumer as FaustConsumer  # noqa: E402
from faust.transport.consumer import ensure_TP  # noqa: E402

log = logging.getLogger(__name__)


class EventlessMonitor(Monitor):
    """Faust's Monitor without its per-event bookkeeping (times and counts of every message and
    stream event, for Faust's own web views, which nothing here reads: the status API keeps
    its own counters). Commits, rebalances and sends are still recorded, and so is the time
    each partition last reached the stream: Faust's consumer reads it to tell a stalled stream
    from a working one (without it, it logs "Stream has not started processing" every minute)."""

    def on_message_in(self, tp, offset, message) -> None:
        pass

    def on_stream_event_in(self, tp, offset, stream, event) -> None:
        self.stream_inbound_time[tp] = time.monotonic()
        return None

    def on_stream_event_out(self, tp, offset, stream, event, state=None) -> None:
        pass

    def on_message_out(self, tp, offset, message) -> None:
        pass


def create_app(settings, scheduler: type) -> faust.App:
    """The worker's Faust app. ``scheduler``: the consumer's record scheduler class."""
    return faust.App(
        settings.app_id,
        broker=f"kafka://{settings.kafka_bootstrap}",
        datadir=str(settings.work_dir / "faust"),
        store="memory://",
        topic_partitions=settings.partitions,
        processing_guarantee="at_least_once",
        broker_commit_interval=1.0,
        consumer_auto_offset_reset="earliest",
        web_port=settings.worker_web_port,
        web_host="127.0.0.1",
        table_standby_replicas=0,
        producer_linger_ms=settings.kafka_linger_ms,
        # On shutdown do not wait for queued events to be acknowledged: they are not committed,
        # so the next owner of the partition processes them again (at-least-once).
        stream_wait_empty=False,
        monitor=EventlessMonitor(),
        ConsumerScheduler=scheduler,
    )


# ---------------------------------------------------------------------------------- aiokafka
# aiokafka's own (``__wrapped__`` if this module was loaded again after installing the backoff)
_ORIGINAL_FETCH = getattr(fetcher.Fetcher._proc_fetch_request, "__wrapped__", fetcher.Fetcher._proc_fetch_request)


def install_idle_fetch_backoff(backoff_s: float) -> None:
    """Kafka holds a fetch with no data for up to ``fetch.max.wait.ms``; some Kafka-protocol
    brokers (noida-db 0.2.2, used for local runs and CI) answer immediately, and aiokafka then
    re-fetches in a tight loop: an idle worker burns a whole core. This wraps aiokafka's
    per-node fetch so that a fetch which brought nothing and came back faster than
    ``backoff_s`` waits out the rest before that node is asked again. Against a real Kafka
    broker an empty fetch already took ``fetch.max.wait.ms``, so the guard never sleeps.
    Idempotent; 0 restores aiokafka's own."""
    if backoff_s <= 0:
        fetcher.Fetcher._proc_fetch_request = _ORIGINAL_FETCH
        return

    @functools.wraps(_ORIGINAL_FETCH)
    async def proc_fetch_request(self, assignment, node_id, request):
        started = time.monotonic()
        has_data = await _ORIGINAL_FETCH(self, assignment, node_id, request)
        if not has_data:
            rest = backoff_s - (time.monotonic() - started)
            if rest > 0:
                try:
                    await asyncio.sleep(rest)
                except asyncio.CancelledError:  # the fetcher is closing: end quietly, as aiokafka does
                    pass
        return has_data

    fetcher.Fetcher._proc_fetch_request = proc_fetch_request


_ORIGINAL_RESET = getattr(GroupCoordinator.reset_generation, "__wrapped__", GroupCoordinator.reset_generation)
_leaving: set[asyncio.Task] = set()  # LeaveGroup requests in flight (a reference keeps each alive)


def install_abandoned_member_leave() -> None:
    """When the broker refuses the consumer's generation or member id (a commit or heartbeat
    answered IllegalGeneration, say, after a rebalance it took part in too slowly), aiokafka
    drops its member id and joins again as a new member. The old id stays in the group until
    the broker expires it, and the rebalance that follows waits for it: up to the session
    timeout on Apache Kafka, and on noida-db 0.2.2 a whole rebalance timeout (60 s) every
    time, so a busy group never settles. This wraps aiokafka's ``reset_generation`` so that
    the id it drops is also sent a LeaveGroup (best effort: an id the broker no longer has is
    answered with an error, which is ignored). Not on close: aiokafka has left by then.
    Idempotent."""

    @functools.wraps(_ORIGINAL_RESET)
    def reset_generation(self) -> None:
        abandoned, node = self.member_id, self.coordinator_id
        _ORIGINAL_RESET(self)
        if not abandoned or node is None or self._closing.done():
            return
        try:
            task = asyncio.get_running_loop().create_task(_leave(self, node, abandoned))
        except RuntimeError:  # no running loop: nothing to send with
            return
        _leaving.add(task)
        task.add_done_callback(_leaving.discard)

    GroupCoordinator.reset_generation = reset_generation


async def _leave(coordinator: GroupCoordinator, node: int, member: str) -> None:
    # the client itself, not the coordinator's _send_req, which takes a failed send for a dead
    # coordinator
    try:
        response = await coordinator._client.send(node, LeaveGroupRequest(coordinator.group_id, member),
                                                  group=ConnectionGroup.COORDINATION)
    except Exception as exc:  # noqa: BLE001 - best effort; the broker's expiry is the fallback
        log.info("could not take abandoned member %s out of group %s: %s", member, coordinator.group_id, exc)
        return
    log.info("took abandoned member %s out of group %s (error code %s)", member, coordinator.group_id,
             response.error_code)


_ORIGINAL_PERFORM_SEEK = getattr(FaustConsumer.perform_seek, "__wrapped__", FaustConsumer.perform_seek)
_ORIGINAL_ASSIGNED = getattr(FaustConsumer.on_partitions_assigned, "_persrec_original",
                             FaustConsumer.on_partitions_assigned)


def install_seek_record() -> None:
    """After each rebalance faust-streaming 0.15.3 resumes the stream partitions *before* it
    seeks them to their committed offsets (``Recovery.on_recovery_completed``), and until that
    seek it has no committed offset for them (``committed_offset`` is None). A record fetched in
    between, from wherever the fetch position was, looks to the offset guard like the first
    record of a group that never committed: taken as is, the events before it were skipped (CI:
    a user's 111th event answered as their first). This counts the consumer's assignments and
    records which one the last seek was for, so the pipeline can wait for it (``sought``).
    Assignments are counted, not told apart by the group generation: a broker that loses its
    group state (noida-db restarted; Kafka's group emptied and deleted) starts generations at 1
    again, so the seek of the last assignment looked like the seek of the new one. Idempotent."""

    async def on_partitions_assigned(self, assigned, generation_id: int = 0) -> None:
        self._persrec_assignment = getattr(self, "_persrec_assignment", 0) + 1
        await _ORIGINAL_ASSIGNED(self, assigned, generation_id)

    @functools.wraps(_ORIGINAL_PERFORM_SEEK)
    async def perform_seek(self) -> None:
        assignment = getattr(self, "_persrec_assignment", 0)
        await _ORIGINAL_PERFORM_SEEK(self)
        self._persrec_sought_assignment = assignment

    on_partitions_assigned._persrec_original = _ORIGINAL_ASSIGNED  # type: ignore[attr-defined]
    FaustConsumer.on_partitions_assigned = on_partitions_assigned
    FaustConsumer.perform_seek = perform_seek


def sought(app: faust.App) -> bool:
    """Faust has sought the partitions of its current assignment to their committed offsets."""
    consumer = app.consumer
    return getattr(consumer, "_persrec_sought_assignment", None) == getattr(consumer, "_persrec_assignment", 0)


def member_id(app: faust.App) -> str:
    """The group member id the app's consumer holds now (aiokafka's coordinator)."""
    return app.consumer._thread._consumer._coordinator.member_id


# ------------------------------------------------------------------------ Faust's consumer
def wrap_ack(consumer: Any, allows: Callable[[Any], bool]) -> None:
    """Make ``consumer.ack(message)`` a no-op for messages ``allows`` refuses (idempotent).
    faust-streaming acknowledges messages its stream skips around a rebalance (``acks.AckGate``
    says why that loses events)."""
    if getattr(consumer.ack, "_persrec_gate", None) == allows:  # bound methods: equal, not identical
        return
    original = consumer.ack

    def ack(message: Any) -> bool:
        return original(message) if allows(message) else False

    ack._persrec_gate = allows  # type: ignore[attr-defined]
    consumer.ack = ack


def committed_offset(app: faust.App, tp: Hashable) -> int | None:
    """Faust's record of ``tp``'s committed offset: set by the seek after each rebalance, then
    by its commits."""
    return app.consumer._committed_offset.get(tp)


def set_read_offset(consumer: Any, tp: Hashable, offset: int) -> None:
    """Faust drops records below its read offset; records fetched before a seek may have raised
    it past ``offset`` (Faust's own ``seek_wait`` sets it the same way)."""
    consumer._read_offset[tp] = offset


def forget_gaps(consumer: Any, tp: Hashable, offset: int) -> None:
    """Drop Faust's gaps of ``tp`` from ``offset`` on: offsets it skipped as missing, which its
    commits count as done (``Consumer._add_gap``). Those past a rewind's offset are Faust's
    mistake (records fetched before a seek passed after it), and the re-read records the
    broker's real holes again as it passes them."""
    gaps = consumer._gap.get(tp)
    if gaps:
        end = max(g.end for g in gaps)
        if end > offset:
            gaps.chop(offset, end)


def partition_state(consumer: Any, tp: Hashable) -> dict[str, Any]:
    """What Faust's consumer holds about ``tp``, for the log of a stalled partition."""
    active = consumer._active_partitions
    return {"assigned": tp in consumer.assignment(), "active": active is None or tp in active,
            "paused": tp in consumer._paused_partitions, "buffered": tp in consumer._buffered_partitions,
            "read_offset": consumer._read_offset.get(tp), "committed": consumer._committed_offset.get(tp),
            "flow_active": consumer.flow_active, "doing": sorted(consumer.diag.flags)}


def fetch_state(app: faust.App, tp: Hashable) -> dict[str, Any]:
    """What aiokafka's fetcher (under Faust's consumer thread) holds about ``tp``, for the log of
    a stalled partition: its assignment state, buffered records, and fetches in flight."""
    try:
        fetcher = app.consumer._thread._consumer._fetcher
        aiotp = AioTP(tp.topic, tp.partition)
        assignment = fetcher._subscriptions.subscription.assignment
        state = assignment.state_value(aiotp) if assignment is not None else None
        return {"assigned": state is not None, "active": assignment is not None and assignment.active,
                "paused": state is not None and state.paused,
                "position": state.position if state is not None and state.has_valid_position else None,
                "awaiting_reset": state is not None and state.awaiting_reset,
                "buffered": aiotp in fetcher._records, "in_flight": sorted(fetcher._in_flight),
                "pending": len(fetcher._pending_tasks),
                "routine": "done" if fetcher._fetch_task.done() else "running"}
    except Exception as exc:  # noqa: BLE001 - diagnostics only
        return {"unreadable": repr(exc)}


def consumer_tasks(app: faust.App) -> list[str]:
    """Where the consumer's tasks wait now, for the log of a stall: Faust's record drain (this
    loop), the consumer thread's method workers and aiokafka's fetcher (the thread's loop), each
    as its chain of awaits, ``function:line > ...``."""
    names = {"_drain_messages", "_method_queue_do_work", "_fetch_requests_routine", "_proc_fetch_request"}
    loops = [asyncio.get_running_loop(), getattr(app.consumer._thread, "thread_loop", None)]
    found = []
    for loop in filter(None, loops):
        try:
            tasks = list(asyncio.all_tasks(loop))
        except RuntimeError:  # the other thread changed its set meanwhile: skip it this time
            continue
        for task in tasks:
            chain, coro = [], task.get_coro()
            while (frame := getattr(coro, "cr_frame", None) or getattr(coro, "gi_frame", None)) is not None:
                chain.append((frame.f_code.co_name, frame.f_lineno))
                coro = getattr(coro, "cr_await", None) or getattr(coro, "gi_yieldfrom", None)
            if names.intersection(name for name, _ in chain):
                found.append(" > ".join(f"{name}:{line}" for name, line in chain))
    return found


def refetch(consumer: Any, tp: Hashable) -> None:
    """Put ``tp`` back among the partitions Faust fetches. Faust fetches only its "active"
    partitions and drops the fetched records of the others (``Consumer.getmany``); rebalances,
    recovery (pause/resume) and stream back-pressure (``on_buffer_full``/``on_buffer_drop``)
    take partitions out and put them back, and one left out is never read again."""
    tp = ensure_TP(tp)  # Faust asserts its own type there (an aiokafka TopicPartition crashes its fetcher)
    consumer._paused_partitions.discard(tp)
    consumer._buffered_partitions.discard(tp)
    consumer._get_active_partitions().add(tp)


class WindowStore:
    """The window table's local store and its changelog, written separately: a window is set in
    the store at once (``set``) and its changelog record is sent later, once per user per batch
    (``write``), by the code that then acknowledges the events it holds.

    Keys are raw user-id bytes (``key_type=bytes``: without it Faust restores changelog keys
    with the JSON codec, b"42" -> 42, and non-numeric ids fail, so a restarted worker found no
    window at all). The store holds a value as restored from the changelog (bytes) or as last
    set (any object); ``decode`` turns the first into the second."""

    def __init__(self, app: faust.App, partitions: int, decode: Callable[[Any], Any],
                 encode: Callable[[Any], bytes]) -> None:
        self.table = app.Table("windows", default=None, partitions=partitions, key_type=bytes, value_type=bytes)
        self._decode, self._encode = decode, encode
        self._unwritten: dict[bytes, tuple[int, Any]] = {}  # key -> (partition, value) not in the changelog

    def get(self, key: bytes) -> Any:
        return self._decode(self.table.data.get(key))

    def set(self, key: bytes, partition: int, value: Any) -> None:
        self.table.data[key] = value  # the store only: ``table[key] = value`` would write the changelog too
        self._unwritten[key] = (partition, value)

    def write(self, keys) -> None:
        """Send the changelog record of each of ``keys`` whose value changed since its last one."""
        for key in keys:
            if (entry := self._unwritten.pop(key, None)) is not None:
                self.table.send_changelog(entry[0], key, self._encode(entry[1]))

    def delete(self, key: bytes) -> None:
        """Remove ``key``, in the store and the changelog (a tombstone)."""
        self._unwritten.pop(key, None)
        if self.table.get(key) is not None:
            del self.table[key]

    def items(self):
        """(key, value) of every window in the store (decoded)."""
        return ((k, self._decode(v)) for k, v in list(self.table.data.items()))

    def pending(self) -> list[bytes]:
        return list(self._unwritten)
