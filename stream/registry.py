"""The ``items`` topic: items published while the model serves become recommendable without a
restart or a retrain (issue 21).

Per batch of item messages (``ItemRegistry.register_batch``):

  1. parse: a bad message goes to the dead-letter topic with its reason (``events.parse_item``);
  2. encode: the texts go through Triton's ``encode_items`` (the model's own sentence encoder),
     one call for the batch;
  3. store: the items are registered in the database for this model version
     (``memory.SqlCatalogue``: a new item gets the next dense id, a changed text a new revision,
     a repeat nothing);
  4. serve: the worker's ``Catalogue`` takes the rows; the next request carries the new revision
     and the Triton models read the rows before answering (``serving.catalogue``).

The batch is acknowledged after step 4 (``take_events`` acks once the loop body is done), so a
crash repeats registrations, which change nothing. Outages of Triton or the database are waited
out; a batch Triton rejects is bisected (``stream.poison``) so that only a text the encoder
rejects on its own is dead-lettered, and only once the encoder is seen to answer a harmless text
(a broken encoder holds the items back instead). Every worker also follows what the others
register (``follow``, every ``catalogue_poll_s``).
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING

import faust

from persrec.memory import SqlCatalogue, text_sha256

from .events import InvalidEvent, Item, parse_item
from .failures import failure_kind, retrying
from .poison import Health, isolate

if TYPE_CHECKING:
    from .pipeline import Pipeline
    from .runtime import Runtime

log = logging.getLogger(__name__)
PROBE_TEXT = "item"  # what any sentence encoder answers: the evidence that the encoder works


class ItemRegistry:
    def __init__(self, pipeline: Pipeline, store: SqlCatalogue | None) -> None:
        self.pipeline, self.store = pipeline, store
        settings = pipeline.settings
        self.topic: faust.TopicT = pipeline.app.topic(settings.topic_items, partitions=settings.partitions,
                                                      key_serializer="raw", value_serializer="raw")
        self.batch, self.within = settings.item_batch, settings.item_batch_wait_ms / 1000
        self._warned = False
        self.health = Health()  # when the encoder last answered

    def attach(self) -> None:
        app = self.pipeline.app
        app.agent(self.topic, name="persrec.items")(self.process)
        app.timer(interval=self.pipeline.settings.catalogue_poll_s)(self.follow)

    async def load(self, rt: Runtime) -> None:
        """The whole catalogue of the served version, before the worker answers anything."""
        if rt.catalogue is not None and self.store is not None:
            rows = await retrying(
                "reading the item catalogue", 1, lambda: asyncio.to_thread(self.store.since, rt.manifest.model_version, 0, embeddings=False))
            rt.catalogue.apply(rows)
            log.info("item catalogue: %d items registered since training (revision %d)",
                     len(rt.catalogue.added), rt.catalogue.revision)

    async def process(self, stream) -> None:
        rt = await self.pipeline.ready()
        async for events in stream.take_events(self.batch, within=self.within):
            await self.register_batch(rt, events)

    async def register_batch(self, rt: Runtime, events) -> None:
        t0 = time.perf_counter()
        items: list[tuple[Item, object]] = []
        for event in events:  # 1
            rt.counters.items_in += 1
            try:
                items.append((parse_item(event.value, now=time.time()), event))
            except InvalidEvent as exc:
                await self.dead_letter(rt, event, exc.reason, exc.detail)
        if not items:
            return
        if rt.catalogue is None:
            rt.counters.items_ignored += len(items)
            if not self._warned:
                log.warning("model %s reads items by id only: items on %r are acknowledged and ignored",
                            rt.manifest.model_version, self.topic.get_topic_name())
                self._warned = True
            return
        latest = {item.item_id: (item, event) for item, event in items}  # the last text of an item wins
        texts = [item.text for item, _ in latest.values()]
        vectors, rejected = await isolate(  # 2
            texts, lambda part: self._encode(rt, part), failure_kind, self.health, what="encoding items",
            probe=PROBE_TEXT)
        for index, exc in rejected:
            _, event = list(latest.values())[index]
            await self.dead_letter(rt, event, "processing_error", f"{type(exc).__name__}: {exc}")
        if len(rejected) == len(latest):
            return
        trained = {i: d for i in latest if (d := rt.catalogue.index.get(i, 0)) and d <= rt.catalogue.base}
        rows = [(i, text_sha256(item.text), v) for (i, (item, _)), v in zip(latest.items(), vectors)
                if v is not None]
        written = await retrying(  # 3
            "registering items", len(rows), lambda: asyncio.to_thread(
                self.store.register, rt.manifest.model_version, rt.catalogue.base, rows, trained))
        await self.follow()  # 4: with whatever other workers wrote before these rows
        now, changed = time.time(), {r.item_id for r in written}
        for item_id, (_, event) in latest.items():
            if item_id in changed and event.message.timestamp:
                rt.counters.item_latencies_ms.append((now - event.message.timestamp) * 1000)
        new = sum(1 for r in written if r.registered_at == r.updated_at)
        rt.counters.items_registered += new
        rt.counters.items_updated += len(written) - new
        rt.counters.seconds_items += time.perf_counter() - t0

    @staticmethod
    async def _encode(rt: Runtime, texts) -> list:
        return list(await rt.models.encode_items(list(texts)))

    async def follow(self) -> None:
        """Apply the rows registered since this worker's revision (by any worker)."""
        rt = self.pipeline.runtime
        if rt is None or rt.catalogue is None or self.store is None:
            return
        try:
            rows = await asyncio.to_thread(self.store.since, rt.manifest.model_version, rt.catalogue.revision,
                                           embeddings=False)
        except Exception:  # noqa: BLE001 - the database is down: the next tick tries again
            log.warning("cannot read the item catalogue; retrying", exc_info=True)
            return
        rt.catalogue.apply(rows)

    async def dead_letter(self, rt: Runtime, event, reason: str, detail: str) -> None:
        msg = event.message
        source = {"topic": msg.topic, "partition": msg.partition, "offset": msg.offset}
        log.info("dead-lettering %s:%s@%s: %s", msg.topic, msg.partition, msg.offset, reason)
        await self.pipeline.outbox.dead_letter(event.key, event.value, reason, detail, source)
        rt.counters.dlq += 1
