"""The Faust worker: ``interactions`` -> per-user window table -> Triton -> ``recommendations``.

For each event (in the agent, in partition order):
  0. check that no earlier offset of its partition went missing (``stream.offsets``; if one
     did, the partition is read again from it);
  1. parse it; a bad event goes to the dead-letter topic with its reason, then is acknowledged;
  2. an event keyed by something else than its user id is re-published keyed by the user id
     (so each user's window lives in one partition), then acknowledged;
  3. update the user's window in the table (a replayed event id changes nothing);
  4. queue a recommendation request carrying a snapshot of the window (and the memory it was
     trimmed against, see ``Runtime.memory_for``).
The batcher task then, per batch: calls Triton once, publishes one message per event, waits
until the broker has them, writes the latest window of each of the batch's users to the
table's changelog (once per user: a burst of one user's events costs one write, not one per
event), and only then acknowledges the events. Offsets are committed after that (and after the
changelog is flushed), so a crash can repeat a recommendation (same event id) but never loses
an acknowledged event, and a restored window holds every acknowledged event.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import time
from dataclasses import dataclass

import faust
import orjson
from aiokafka.errors import KafkaError as AIOKafkaError
from faust.sensors.monitor import Monitor
from kafka.errors import KafkaError
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError

from persrec.serving.triton_client import TritonUnavailable
from persrec.settings import Settings

from . import members
from . import window as win
from .acks import AckGate, OrderedAcks
from .events import InvalidEvent, UserDeletion, parse_event
from .offsets import BarrierScheduler, OffsetGuard, Rewinder
from .poison import Failure, Health, isolate
from .runtime import RecRequest, Runtime

log = logging.getLogger(__name__)


@dataclass
class Topics:
    interactions: faust.TopicT
    recommendations: faust.TopicT
    dlq: faust.TopicT


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


def failure_kind(exc: BaseException) -> Failure:
    """An outage of a service the worker waits for (Triton unreachable, the database or the
    broker down), or an error about this input, which ``stream.poison`` may set aside."""
    if isinstance(exc, (TritonUnavailable, KafkaError, AIOKafkaError, OSError, asyncio.TimeoutError,
                        OperationalError, InterfaceError)):
        return Failure.OUTAGE
    if isinstance(exc, DBAPIError) and exc.connection_invalidated:
        return Failure.OUTAGE
    return Failure.ERROR


def create_app(settings: Settings) -> faust.App:
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
        ConsumerScheduler=BarrierScheduler,  # holds a partition's records back during a rewind
    )


def wire(app: faust.App, settings: Settings, make_runtime) -> dict:
    """Register topics, the window table, the agent, the batcher and the fold loop on ``app``.

    ``make_runtime(read_window)`` builds the Runtime inside the worker's event loop.
    Returns a dict that will hold ``runtime`` once the worker runs (for the status API).
    """
    topics = Topics(
        app.topic(settings.topic_interactions, key_serializer="raw", value_serializer="raw",
                  partitions=settings.partitions),
        app.topic(settings.topic_recommendations, key_serializer="raw", value_serializer="raw"),
        app.topic(settings.topic_dlq, key_serializer="raw", value_serializer="raw"),
    )
    # Keys are raw user-id bytes. ``key_type=bytes`` matters: without it Faust restores
    # changelog keys with the JSON codec (b"42" -> 42; non-numeric ids fail), so a restarted
    # worker found no window at all. Values are raw bytes in the changelog (``window.encode``,
    # written by ``write_windows``); the store holds them as restored, or the ``Window`` the
    # agent last set.
    windows = app.Table("windows", default=None, partitions=settings.partitions, key_type=bytes,
                        value_type=bytes)
    state: dict = {"topics": topics, "windows": windows}
    queue: asyncio.Queue[RecRequest] = asyncio.Queue(maxsize=4 * settings.max_batch)
    # Windows changed in the table's store but not yet written to its changelog: key ->
    # (partition, window). Written by ``write_windows`` before their events are acknowledged.
    unwritten: dict[bytes, tuple[int, win.Window]] = {}

    def window_of(key: bytes) -> win.Window:
        w = windows.data.get(key)
        return w if isinstance(w, win.Window) else win.decode(w)

    def read_window(user_id: str) -> win.Window:
        return window_of(user_id.encode())

    def set_window(key: bytes, partition: int, w: win.Window) -> None:
        windows.data[key] = w  # the store only: ``windows[key] = w`` would also write the changelog
        unwritten[key] = (partition, w)

    def write_windows(keys) -> None:
        """Send the changelog record of each of ``keys`` whose window changed since its last one."""
        for key in keys:
            if (entry := unwritten.pop(key, None)) is not None:
                windows.send_changelog(entry[0], key, win.encode(entry[1]))

    async def runtime() -> Runtime:
        if "runtime" not in state:
            state["runtime"] = await make_runtime(read_window)
        return state["runtime"]

    # Only events this agent finished are acknowledged (AckGate), in read order per partition
    # (OrderedAcks), and none is missing from what the agent reads (OffsetGuard).
    gate, guard = AckGate({settings.topic_interactions}), OffsetGuard()
    rewinder = Rewinder(guard, lambda: app.consumer)

    def release(event) -> bool:
        gate.release(event.message)
        return stream_of["process"].ack(event)

    acks = OrderedAcks(release)
    stream_of: dict = {}

    async def rebalanced(app, *args, **kwargs) -> None:  # noqa: ARG001 - Faust's signals
        rewinder.reset()

    async def assigned(app, *args, **kwargs) -> None:
        await rebalanced(app)
        # the member id this process holds now, for a later worker to remove if we die
        member_id = app.consumer._thread._consumer._coordinator.member_id
        members.record(members.registry(settings.work_dir, settings.app_id), member_id)

    async def revoked(app, *args, **kwargs) -> None:
        # The next owner restores windows from the changelog: it must hold every window this
        # worker changed, before the rebalance goes on (Faust's own flush came before this).
        write_windows(list(unwritten))
        await app.producer.flush()
        await rebalanced(app)

    app.on_partitions_revoked.connect(revoked)
    app.on_partitions_assigned.connect(assigned)

    def admit(msg):
        """OffsetGuard's verdict on ``msg`` ("process" unless an earlier offset never came)."""
        if not settings.offset_guard:
            return "process"
        # Faust's own record of the committed offsets: set by the seek after each rebalance,
        # then by its commits (of acknowledged, i.e. finished, events only: AckGate).
        return guard.admit(msg.tp, msg.offset, app.consumer._committed_offset.get(msg.tp))

    async def rewind(offsets: dict) -> None:
        (await runtime()).counters.offset_rewinds += len(offsets)
        await rewinder.seek(offsets)

    @app.timer(interval=guard.due_every_s)
    async def rewind_due() -> None:
        """Seek pending rewinds again whose re-read never came (see OffsetGuard)."""
        if due := guard.due():
            await rewind(due)

    @app.agent(topics.interactions)
    async def process(stream):
        rt = await runtime()
        stream_of["process"] = stream
        gate.install(app.consumer)
        async for event in stream.noack().events():
            msg = event.message
            verdict = admit(msg)  # no await on the hot path: most events are "process"
            if verdict != "process":
                if verdict != "drop":
                    log.warning("%s:%s: offset %s came before %s; reading the partition again from %s",
                                msg.topic, msg.partition, msg.offset, verdict, verdict)
                    await rewind({msg.tp: verdict})
                continue
            handle = acks.track(msg.tp, event)
            source = {"topic": msg.topic, "partition": msg.partition, "offset": msg.offset}
            rt.counters.events_in += 1
            try:
                ev = parse_event(event.value, now=time.time())
            except InvalidEvent as exc:
                headers = {"reason": exc.reason.encode(), "detail": exc.detail.encode()[:500],
                           "source": json.dumps(source).encode()}
                log.info("dead-lettering %s:%s@%s: %s", msg.topic, msg.partition, msg.offset, exc.reason)
                await forward(topics.dlq, event.key, event.value or b"", headers, handle, "dlq")
                continue
            key = ev.user_id.encode()
            if event.key != key:
                await forward(topics.interactions, key, event.value, None, handle, "rerouted")
                continue
            if isinstance(ev, UserDeletion):
                unwritten.pop(key, None)
                if windows.get(key) is not None:
                    del windows[key]
                # A database outage is waited out: the erasure happens, late, never skipped.
                await retrying("erasing a user", 1, lambda: asyncio.to_thread(rt.store.delete_many, [ev.user_id]))
                rt.forget([ev.user_id])
                log.info("erased user %r", ev.user_id)
                await acks.finish(handle)
                continue
            event_id = ev.event_id or f"{msg.topic}:{msg.partition}:{msg.offset}"
            w = window_of(key)
            where = (msg.topic, msg.partition, msg.offset)
            duplicate = win.seen(w, event_id, where)
            if duplicate:
                rt.counters.duplicates += 1
            else:
                w = rt.trimmed(ev.user_id, win.append(w, event_id, ev.item_id, int(ev.ts), where))
                set_window(key, msg.partition, w)
            request = RecRequest(ev.user_id, w, event_id, ev.ts, source, time.monotonic(),
                                 duplicate, ack=functools.partial(acks.finish, handle), value=event.value)
            rt.request_queued(request)
            await queue.put(request)

    out_topic = settings.topic_recommendations
    forwarding = asyncio.Semaphore(1024)  # messages being forwarded at once (backpressure)
    background: set[asyncio.Task] = set()

    async def forward(topic, key: bytes | None, value: bytes, headers: dict | None, handle, counter: str) -> None:
        """Send one message (a dead letter, a re-keyed event) without waiting for the broker;
        the input event is acknowledged once the broker has it (retried until then)."""
        await forwarding.acquire()

        async def run() -> None:
            try:
                async def deliver() -> None:
                    await (await topic.send(key=key, value=value, headers=headers))

                await retrying(f"forwarding to {topic.get_topic_name()}", 1, deliver)
                rt = await runtime()
                setattr(rt.counters, counter, getattr(rt.counters, counter) + 1)
                await acks.finish(handle)
            finally:
                forwarding.release()

        task = asyncio.create_task(run())
        background.add(task)
        task.add_done_callback(background.discard)

    async def next_batch() -> list[RecRequest]:
        loop = asyncio.get_running_loop()
        batch = [await queue.get()]
        deadline = loop.time() + settings.batch_wait_ms / 1000
        while len(batch) < settings.max_batch:
            if not queue.empty():
                batch.append(queue.get_nowait())
                continue
            timeout = deadline - loop.time()
            if timeout <= 0:
                break
            try:
                batch.append(await asyncio.wait_for(queue.get(), timeout))
            except asyncio.TimeoutError:
                break
        return batch

    @app.task
    async def batcher() -> None:
        """Up to ``max_in_flight_batches`` batches at once: the model call of one overlaps the
        publishing of another. Messages are still sent in event order (each batch sends after
        the previous one has sent), so a user's recommendations arrive in the order of their
        events."""
        rt = await runtime()
        slots = asyncio.Semaphore(settings.max_in_flight_batches)
        running: set[asyncio.Task] = set()
        previous: asyncio.Future | None = None
        while True:
            batch = await next_batch()
            await slots.acquire()
            sent = asyncio.get_running_loop().create_future()
            task = asyncio.create_task(handle_batch(rt, batch, previous, sent))
            running.add(task)
            task.add_done_callback(lambda t: (running.discard(t), slots.release()))
            previous = sent

    health = Health()  # when a batch was last answered: proof that a failing event is the cause

    async def retrying(what: str, size: int, step):
        delay = 0.1
        while True:  # a batch is never dropped: its events stay unacknowledged until it succeeds
            try:
                return await step()
            except Exception:  # noqa: BLE001 - Triton/broker/DB trouble: wait and retry
                log.exception("%s of a batch of %d failed; retrying in %.1fs", what, size, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)

    async def dead_letter(r: RecRequest, exc: BaseException) -> None:
        """An event whose processing fails on its own (stream.poison): to the DLQ, then acknowledged."""
        rt = await runtime()
        headers = {"reason": b"processing_error", "detail": f"{type(exc).__name__}: {exc}".encode()[:500],
                   "source": json.dumps(r.source).encode()}

        async def deliver() -> None:
            await (await topics.dlq.send(key=r.user_id.encode(), value=r.value, headers=headers))

        await retrying("dead-lettering", 1, deliver)
        rt.counters.dlq += 1
        await r.ack()

    async def handle_batch(rt: Runtime, batch: list[RecRequest], previous: asyncio.Future | None,
                           sent: asyncio.Future) -> None:
        try:
            t0 = time.perf_counter()
            messages, failed = await isolate(batch, rt.recommend_batch, failure_kind, health, what="recommending")
            for r in batch:  # their window snapshots are read: folds may pass them now
                rt.request_done(r)
            for i, exc in failed:
                await dead_letter(batch[i], exc)
            done = set(range(len(batch))) - {i for i, _ in failed}
            batch, messages = [batch[i] for i in sorted(done)], [messages[i] for i in sorted(done)]
            t1 = time.perf_counter()
            if previous is not None:
                await previous
            payload = [(m["user_id"].encode(), orjson.dumps(m)) for m in messages]

            async def deliver() -> None:  # a retry sends the whole batch again (same event ids)
                # Straight to the producer: Faust's Topic.send adds a channel, codecs and a
                # FutureMessage per message, which cost more than the send itself. Messages are
                # appended in this order, so each partition keeps the users' event order.
                futures = [await app.producer.send(out_topic, k, v, None, None, None) for k, v in payload]
                if not sent.done():
                    sent.set_result(None)
                await asyncio.gather(*futures)

            await retrying("publishing", len(batch), deliver)
            write_windows({r.user_id.encode() for r in batch})
        finally:
            if not sent.done():
                sent.set_result(None)
        rt.counters.seconds_model += t1 - t0
        rt.counters.seconds_publish += time.perf_counter() - t1
        rt.counters.batches += 1
        now = time.monotonic()
        for r in batch:
            rt.counters.latencies_ms.append((now - r.received) * 1000)
            await r.ack()
        rt.counters.recs_out += len(batch)

    @app.task
    async def folder() -> None:
        """Fold every pending user, pause ``fold_interval_s``, again (a pass may take longer
        than the pause under load: a Faust timer would then warn on every tick)."""
        rt = await runtime()
        while True:
            await asyncio.sleep(settings.fold_interval_s)
            try:
                while rt.fold_pending:
                    if not await rt.fold_once():
                        break
            except Exception:  # noqa: BLE001 - the users stay pending; the next pass retries
                log.exception("fold failed; %d users pending", len(rt.fold_pending))

    return state
