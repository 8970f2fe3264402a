"""The worker's pipeline: ``interactions`` -> per-user window table -> Triton ->
``recommendations``, and the commit protocol that loses no acknowledged event.

Per event, in the agent, in partition order (``Pipeline.process``):

  1. admit: no earlier offset of its partition went missing (``stream.offsets``; if one did, the
     partition is read again from it);
  2. parse: a bad event goes to the dead-letter topic with its reason, then is acknowledged;
  3. route: an event keyed by something else than its user id is re-published keyed by the user
     id (so each user's window lives in one partition), then acknowledged;
  4. window: the user's window is updated in the table's local store (a replayed event id
     changes nothing; ``delete_user`` erases the user);
  5. request: a recommendation request carrying a snapshot of the window (and the memory it was
     trimmed against, ``Memories.for_request``) is queued.

Per batch of requests, in the batcher (``Pipeline.handle_batch``):

  6. recommend: one Triton call for the batch; an event the model fails on alone goes to the
     dead-letter topic (``stream.poison``); outages are waited out;
  7. publish: one message per event, sent after the previous batch's, and waited for until the
     broker has them (``stream.outbox``: everything the worker sends);
  8. changelog: the latest window of each of the batch's users goes to the table's changelog
     (once per user: a burst of one user's events costs one write, not one per event);
  9. acknowledge: the events are acknowledged, in offset order per partition (``acks``).

Offsets are committed after that (and after the changelog is flushed), so a crash can repeat a
recommendation (same event id) but never loses an acknowledged event, and a restored window
holds every acknowledged event. Folds run beside this, in their own task (``Pipeline.folder``).
During a model switch (``stream.switch``) each event goes to the runtime of the model that
answers it, by its offset; a batch is answered by each of its runtimes in turn.
Faust itself is reached only through ``stream.faust_adapter``. An outage of the broker, Triton
or the database is waited out, never skipped (``stream.failures``).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Awaitable, Callable

import faust

from persrec.memory import SqlSwitches
from persrec.settings import Settings

from . import faust_adapter as fa
from . import members
from . import window as win
from .acks import AckGate, OrderedAcks
from .events import Event, InvalidEvent, UserDeletion, parse_event
from .failures import failure_kind, retrying
from .offsets import BarrierScheduler, OffsetGuard, Rewinder
from .outbox import Outbox, Topics, dlq_headers
from .poison import Health, isolate
from .runtime import RecRequest, Runtime
from .stalls import PartitionWatch, RecoveryWatch, StallWatch
from .switch import Switcher

log = logging.getLogger(__name__)
SEEK_WAIT_S = 10.0  # longest wait for Faust's seek after a rebalance (see ``Pipeline._after_seek``)


def create_app(settings: Settings) -> faust.App:
    return fa.create_app(settings, BarrierScheduler)


class Pipeline:
    """The agent, batcher and fold loop of one worker, and what they share."""

    def __init__(self, app: faust.App, settings: Settings, make_runtime: Callable[..., Awaitable[Runtime]],
                 switches: SqlSwitches | None = None) -> None:
        """``make_runtime(read_window, triton_version=None, counters=None, triton_url=None)``: a runtime for the
        configured model version, or for another (a switch, from ``switches``)."""
        self.app, self.settings, self._make_runtime, self.switches = app, settings, make_runtime, switches
        raw = dict(key_serializer="raw", value_serializer="raw")
        self.topics = Topics(
            app.topic(settings.topic_interactions, partitions=settings.partitions, **raw),
            app.topic(settings.topic_recommendations, **raw),
            app.topic(settings.topic_dlq, **raw),
        )
        decode = lambda v: v if isinstance(v, win.Window) else win.decode(v)  # noqa: E731
        self.windows = fa.WindowStore(app, settings.partitions, decode, win.encode)
        self.runtime: Runtime | None = None  # built in the worker's event loop (``ready``)
        self.switcher: Switcher | None = None  # with ``switches``: the model switch taken up, if any
        self._building: asyncio.Future | None = None
        self.queue: asyncio.Queue[RecRequest] = asyncio.Queue(maxsize=4 * settings.max_batch)
        # Only events this agent finished are acknowledged (AckGate), in read order per
        # partition (OrderedAcks), and none is missing from what the agent reads (OffsetGuard).
        self.gate, self.guard = AckGate({settings.topic_interactions}), OffsetGuard()
        self.rewinder = Rewinder(self.guard, lambda: app.consumer)
        # ... and no partition stops reaching it (PartitionWatch)
        self.partitions = PartitionWatch(app, settings.topic_interactions, self.guard,
                                         StallWatch(settings.partition_stall_s), self.rewinder.seek)
        self.recovery = RecoveryWatch(app, StallWatch(settings.recovery_stall_s))
        self.acks = OrderedAcks(self._release)
        self.stream: faust.StreamT | None = None
        self.outbox = Outbox(app, self.topics)
        self.health = Health()  # when a batch was last answered: proof a failing event is at fault

    def attach(self) -> None:
        """Register the agent, the tasks and the rebalance handlers on the app."""
        app = self.app
        app.agent(self.topics.interactions, name="persrec.process")(self.process)
        app.task(self.batcher)
        app.task(self.folder)
        app.timer(interval=self.guard.due_every_s)(self.rewind_due)
        app.timer(interval=self.partitions.every_s)(self.partitions.check)
        if self.switches is not None:
            app.timer(interval=self.settings.switch_poll_s)(self.poll_switch)
        app.on_partitions_revoked.connect(self._revoked)
        app.on_partitions_assigned.connect(self._assigned)

    async def ready(self) -> Runtime:
        """The runtime, built once by whichever task asks first (the others wait for it)."""
        if self.runtime is None:
            if self._building is None:
                self._building = asyncio.ensure_future(self._build())
            runtime = await asyncio.shield(self._building)
            self.runtime = self.runtime or runtime
        return self.runtime

    async def _build(self) -> Runtime:
        read = lambda user_id: self.windows.get(user_id.encode())  # noqa: E731
        rt = await self._make_runtime(read)
        if self.switches is not None:  # a switch under way: the worker joins it before reading
            self.switcher = Switcher(self.switches, self.settings.app_id,
                                     lambda version, url: self._make_runtime(read, version, rt.counters, url),
                                     self.settings.storage_dtype)
            rt = await retrying("reading the model switch", 1, lambda: self.switcher.poll(rt))
        return rt

    def runtimes(self) -> list[Runtime]:
        """The runtime of new events, and during a switch the old model's."""
        switching = None if self.switcher is None else self.switcher.switching
        return [r for r in (self.runtime, switching and switching.old) if r is not None]

    async def poll_switch(self) -> None:
        """Take up a model switch requested since (``persrec switch``)."""
        if self.runtime is None or self.switcher is None:
            return
        try:
            self.runtime = await self.switcher.poll(self.runtime)
        except Exception:  # noqa: BLE001 - the database or Triton is down: the next tick tries again
            log.warning("cannot take up the model switch; retrying", exc_info=True)

    # ---------------------------------------------------------------- per event (the agent)
    async def process(self, stream) -> None:
        await self.ready()
        self.stream = stream
        fa.wrap_ack(self.app.consumer, self.gate.allows)
        async for event in stream.noack().events():
            self.partitions.took()
            await self.take(event)
            self.partitions.done()

    async def take(self, event) -> None:
        """Steps 1-5 for one event."""
        msg = event.message
        if not await self.admit(msg):  # 1
            return
        switching = self.switcher and self.switcher.switching
        rt = self.runtime if not switching else await retrying(  # a database outage is waited out
            "recording the switch offset", 1, lambda: switching.runtime_for(msg.partition, msg.offset))
        handle = self.acks.track(msg.tp, event)
        source = {"topic": msg.topic, "partition": msg.partition, "offset": msg.offset}
        rt.counters.events_in += 1
        ev = await self.parse(event, handle, source)  # 2
        if ev is None or not await self.route(event, ev, handle):  # 3
            return
        request = await self.apply(rt, event, ev, handle, source)  # 4
        if request is not None:
            rt.request_queued(request)  # 5
            await self.queue.put(request)

    async def admit(self, msg) -> bool:
        """1. OffsetGuard's verdict: process, drop (a repeat), or read the partition again."""
        if not self.settings.offset_guard:
            return True
        # Faust's own record of the committed offsets (of acknowledged, i.e. finished, events
        # only: AckGate). No await on the hot path: most events are "process".
        committed = fa.committed_offset(self.app, msg.tp)
        if committed is None and not fa.sought(self.app):
            committed = await self._after_seek(msg.tp)
        verdict = self.guard.admit(msg.tp, msg.offset, committed)
        if verdict == "process":
            return True
        if verdict != "drop":
            log.warning("%s:%s: offset %s came before %s; reading the partition again from %s",
                        msg.topic, msg.partition, msg.offset, verdict, verdict)
            await self.rewind({msg.tp: verdict})
        return False

    async def _after_seek(self, tp) -> int | None:
        """The committed offset of ``tp`` once Faust has sought it after a rebalance (a record
        can come before that seek: ``faust_adapter.install_seek_record``); None if the group
        never committed there."""
        start = time.monotonic()
        while not fa.sought(self.app) and time.monotonic() < start + SEEK_WAIT_S:
            await asyncio.sleep(0.01)
        committed = fa.committed_offset(self.app, tp)
        if not fa.sought(self.app):
            log.warning("%s: no seek to the committed offset within %.0fs; going on without it", tp, SEEK_WAIT_S)
        else:
            log.info("%s: a record came before Faust's seek; waited %.0f ms for it (committed offset %s)",
                     tp, (time.monotonic() - start) * 1000, committed)
        return committed

    async def parse(self, event, handle, source: dict) -> Event | UserDeletion | None:
        """2. The event, or None once a bad one is on its way to the dead-letter topic."""
        try:
            return parse_event(event.value, now=time.time())
        except InvalidEvent as exc:
            headers = dlq_headers(exc.reason, exc.detail, source)
            log.info("dead-lettering %s:%s@%s: %s", source["topic"], source["partition"], source["offset"], exc.reason)
            await self.forward(self.topics.dlq, event.key, event.value or b"", headers, handle, "dlq")
            return None

    async def route(self, event, ev, handle) -> bool:
        """3. False once an event keyed by another than its user is on its way back, re-keyed."""
        key = ev.user_id.encode()
        if event.key == key:
            return True
        await self.forward(self.topics.interactions, key, event.value, None, handle, "rerouted")
        return False

    async def apply(self, rt: Runtime, event, ev, handle, source: dict) -> RecRequest | None:
        """4. The user's window updated in the store; the request for its recommendation (None
        for an erasure, done here)."""
        key, msg = ev.user_id.encode(), event.message
        if isinstance(ev, UserDeletion):
            self.windows.delete(key)
            # A database outage is waited out: the erasure happens, late, never skipped.
            await retrying("erasing a user", 1, lambda: asyncio.to_thread(rt.store.delete_many, [ev.user_id]))
            for r in self.runtimes():
                r.forget([ev.user_id])
            log.info("erased user %r", ev.user_id)
            await self.acks.finish(handle)
            return None
        event_id = ev.event_id or f"{msg.topic}:{msg.partition}:{msg.offset}"
        w = self.windows.get(key)
        where = (msg.topic, msg.partition, msg.offset)
        duplicate = win.seen(w, event_id, where)
        if duplicate:
            rt.counters.duplicates += 1
        else:
            w = rt.trimmed(ev.user_id, win.append(w, event_id, ev.item_id, int(ev.ts), where))
            self.windows.set(key, msg.partition, w)
        return RecRequest(ev.user_id, w, event_id, ev.ts, source, time.monotonic(), duplicate,
                          ack=functools.partial(self.acks.finish, handle), value=event.value, runtime=rt)

    # ------------------------------------------------------------- per batch (the batcher)
    async def batcher(self) -> None:
        """Up to ``max_in_flight_batches`` batches at once: the model call of one overlaps the
        publishing of another. Messages are still sent in event order (each batch sends after
        the previous one has sent), so a user's recommendations arrive in the order of their
        events."""
        await self.ready()
        slots = asyncio.Semaphore(self.settings.max_in_flight_batches)
        running: set[asyncio.Task] = set()
        previous: asyncio.Future | None = None
        while True:
            batch = await self.next_batch()
            await slots.acquire()
            sent = asyncio.get_running_loop().create_future()
            task = asyncio.create_task(self.handle_batch(batch, previous, sent))
            running.add(task)
            task.add_done_callback(lambda t: (running.discard(t), slots.release()))
            previous = sent

    async def next_batch(self) -> list[RecRequest]:
        """Up to ``max_batch`` requests, waiting at most ``batch_wait_ms`` for it to fill."""
        loop = asyncio.get_running_loop()
        batch = [await self.queue.get()]
        deadline = loop.time() + self.settings.batch_wait_ms / 1000
        while len(batch) < self.settings.max_batch:
            if not self.queue.empty():
                batch.append(self.queue.get_nowait())
                continue
            timeout = deadline - loop.time()
            if timeout <= 0:
                break
            try:
                batch.append(await asyncio.wait_for(self.queue.get(), timeout))
            except asyncio.TimeoutError:
                break
        return batch

    async def handle_batch(self, batch: list[RecRequest], previous: asyncio.Future | None,
                           sent: asyncio.Future) -> None:
        try:
            t0 = time.perf_counter()
            answered, messages, failed = await self.recommend(batch)  # 6
            t1 = time.perf_counter()
            if previous is not None:
                await previous
            await self.outbox.answers(messages, sent)  # 7: in event order, after the previous batch's
            self.windows.write({r.user_id.encode() for r in batch})  # 8: the set-aside events' windows too
            for r, exc in failed:
                await self.dead_letter(r, exc)
        finally:
            if not sent.done():
                sent.set_result(None)
        c = batch[0].runtime.counters
        c.seconds_model += t1 - t0
        c.seconds_publish += time.perf_counter() - t1
        c.batches += 1
        now = time.monotonic()
        for r in answered:  # 9
            c.latencies_ms.append((now - r.received) * 1000)
            await r.ack()
        c.recs_out += len(answered)

    async def recommend(self, batch: list[RecRequest]):
        """6. The requests answered, their messages, and the (request, exception) of each event
        the model fails on alone (``stream.poison``), to be dead-lettered once its window is in
        the changelog (step 8): it was applied to the window like any other. During a switch,
        each runtime answers its requests (a user's old-model events come before its new-model
        ones, so answering the old model's first keeps each user's order)."""
        parts: dict[int, list[RecRequest]] = {}
        for r in batch:
            parts.setdefault(id(r.runtime), []).append(r)
        answered, messages, failed = [], [], []
        for part in parts.values():
            rt = part[0].runtime
            out, bad = await isolate(part, rt.recommend_batch, failure_kind, self.health, what="recommending")
            for r in part:  # their window snapshots are read: folds may pass them now
                rt.request_done(r)
            gone = {i for i, _ in bad}
            answered += [r for i, r in enumerate(part) if i not in gone]
            messages += [m for i, m in enumerate(out) if i not in gone]
            failed += [(part[i], exc) for i, exc in bad]
        return answered, messages, failed

    async def dead_letter(self, r: RecRequest, exc: BaseException) -> None:
        """An event whose processing fails on its own: to the DLQ, then acknowledged (its window,
        which holds it, is already on its way to the changelog)."""
        await self.outbox.dead_letter(r.user_id.encode(), r.value, "processing_error",
                                      f"{type(exc).__name__}: {exc}", r.source)
        r.runtime.counters.dlq += 1
        await r.ack()

    # ----------------------------------------------------------------------------- helpers
    def _release(self, event) -> bool:
        self.gate.release(event.message)
        return self.stream.ack(event)

    async def forward(self, topic, key: bytes | None, value: bytes, headers: dict | None, handle,
                      counter: str) -> None:
        """Send one message (a dead letter, a re-keyed event) without waiting for the broker;
        the input event is acknowledged once the broker has it."""
        async def sent() -> None:
            rt = await self.ready()
            setattr(rt.counters, counter, getattr(rt.counters, counter) + 1)
            await self.acks.finish(handle)

        await self.outbox.forward(topic, key, value, headers, sent)

    async def rewind(self, offsets: dict) -> None:
        (await self.ready()).counters.offset_rewinds += len(offsets)
        await self.rewinder.seek(offsets)

    async def rewind_due(self) -> None:
        """Seek pending rewinds again whose re-read never came (see OffsetGuard)."""
        if due := self.guard.due():
            await self.rewind(due)

    async def _assigned(self, app, *args, **kwargs) -> None:  # noqa: ARG002 - Faust's signal
        self.rewinder.reset()
        self.partitions.reset()
        self.recovery.start()
        # the member id this process holds now, for a later worker to remove if we die
        members.record(members.registry(self.settings.work_dir, self.settings.app_id), fa.member_id(app))
        # a partition switched by its previous owner keeps that owner's switch offset
        await self.poll_switch()

    async def _revoked(self, app, *args, **kwargs) -> None:  # noqa: ARG002 - Faust's signal
        # The next owner restores windows from the changelog: it must hold every window this
        # worker changed, before the rebalance goes on (Faust's own flush came before this).
        self.windows.write(self.windows.pending())
        await app.producer.flush()
        self.rewinder.reset()
        self.partitions.reset()

    # ------------------------------------------------------------------------------- folds
    async def folder(self) -> None:
        """Fold every pending user, pause ``fold_interval_s``, again (a pass may take longer
        than the pause under load: a Faust timer would then warn on every tick)."""
        await self.ready()
        while True:
            await asyncio.sleep(self.settings.fold_interval_s)
            for rt in self.runtimes():
                try:
                    while rt.folds.pending:
                        if not await rt.folds.once():
                            break
                except Exception:  # noqa: BLE001 - the users stay pending; the next pass retries
                    log.exception("fold failed; %d users pending", len(rt.folds.pending))

