"""A model change made while the workers run (``persrec switch``; issue 22).

The request (``memory.SqlSwitches``) names the Triton version a worker group leaves and the one
it moves to, both loaded in Triton. Each worker takes it up (``Switcher.poll``, on a timer, at
startup and before it reads newly assigned partitions): it builds a second ``Runtime`` for the
other version, sharing the window table, the memory store and the counters. From then on, per
input partition, the first event a worker reads is the switch unless another worker recorded
one already (``SqlSwitches.record``): every event of the partition before that offset is the old
model's to answer, every one from it the new model's, whichever worker owns the partition then
or later (after a crash, a replayed event is answered by the model it was answered by before).
Each message names its model version.

A new model's memory of a user is made when the new model first needs it (``CatchUp``): a
RECOMPRESS memory is a function of the aged-out items its row keeps, so the new model
compresses the old row's items (ids translated through both id maps), and the watermark and
fold count carry over, so the window the old model trimmed is the one the new model reads after
it. A new row that a shadow build (``persrec rebuild-memories``) made, and that the old model
has not moved past since, is used as it is. The old model's rows stay (a rollback is a switch
back, which catches its rows up the same way) until ``persrec retire-memories``.

Only changes that keep the stream's shape can be made this way (``incompatibility``): the same
window, recent and segment lengths and history budget, RECOMPRESS memories or none, items read
by id. Others stop the workers (README, "Model change").
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import replace
from typing import TYPE_CHECKING

from persrec.memory import MemoryRecord, MemoryStore, SqlSwitches, StaleMemoryError, SwitchRequest
from persrec.models.config import MemoryPolicy
from persrec.models.data import IdMap

from .folds import as_stored
from .manifest import Manifest
from .memories import carried
from .triton import TritonModels

if TYPE_CHECKING:
    from .runtime import Runtime

log = logging.getLogger(__name__)


def incompatibility(old: Manifest, new: Manifest) -> str | None:
    """Why the workers cannot move from ``old`` to ``new`` while they run (None: they can)."""
    shape = lambda m: (m.window_len, m.recent_len, m.segment_len, m.history_len, m.has_memory)  # noqa: E731
    if shape(old) != shape(new):
        return (f"the stream's shape changes (window, recent, segment, history lengths, memory: {shape(old)} -> "
                f"{shape(new)}): the windows and memories of one cannot serve the other")
    if new.has_memory and new.policy is not MemoryPolicy.RECOMPRESS:
        return f"{new.policy.value} memories cannot be made from stored items: rebuild them by replay"
    if old.catalogue or new.catalogue:
        return "a model that reads catalogue items by their text is not switched in place yet"
    return None


class CatchUp:
    """The new model's memories of users the old model has moved past (or that have none):
    recompressed from the old rows' items by the new version's ``fold`` model, written with
    compare-and-set (a concurrent writer wins and its row is read back)."""

    def __init__(self, store: MemoryStore, old_version: str, old_map: IdMap, new_manifest: Manifest,
                 new_map: IdMap, models: TritonModels, storage_dtype: str) -> None:
        self.store, self.old_version, self.old_map = store, old_version, old_map
        self.manifest, self.new_map, self.models, self.storage_dtype = new_manifest, new_map, models, storage_dtype
        self.made = 0  # memories made by this worker

    async def __call__(self, users: list[str], rows: dict[str, MemoryRecord]) -> dict[str, MemoryRecord]:
        """``rows`` (the new model's, of ``users``) with the missing and stale ones made."""
        olds = await asyncio.to_thread(self.store.get_many, users, self.old_version)
        behind = [olds[u] for u in users if u in olds and olds[u].history is not None
                  and (u not in rows or rows[u].watermark < olds[u].watermark)]
        if not behind:
            return rows
        carry = carried(behind, self.old_map, self.new_map, self.manifest.history_len)
        tensors = await self.models.fold(carry.fold_inputs(self.manifest.memory_shape))
        made = {rec.user_id: replace(rec, tensor=as_stored(rec.tensor, self.storage_dtype))
                for rec in carry.records(self.manifest.model_version, tensors)}
        # compare-and-set, 0 for a row that must not exist yet: a writer that came first wins
        expected = {u: rows[u].row_version if u in rows else 0 for u in made}
        try:
            written = await asyncio.to_thread(self.store.put_many, list(made.values()), expected)
        except StaleMemoryError:  # nothing was written: read what the other writer stored
            rows |= await asyncio.to_thread(self.store.get_many, list(made), self.manifest.model_version)
            return rows
        for u, rec in made.items():
            rows[u] = replace(rec, row_version=written[u])
        self.made += len(written)
        log.debug("made %d memories of %s from %s's rows: %s", len(written), self.manifest.model_version,
                  self.old_version, sorted(written))
        return rows


class Switching:
    """The two runtimes of a switch, and which one answers an event."""

    def __init__(self, store: SqlSwitches, app_id: str, request: SwitchRequest, old: Runtime, new: Runtime,
                 offsets: dict[int, int]) -> None:
        self.store, self.app_id, self.request = store, app_id, request
        self.old, self.new, self.offsets = old, new, dict(offsets)

    async def runtime_for(self, partition: int, offset: int) -> Runtime:
        first = self.offsets.get(partition)
        if first is None:  # the first event of the partition this worker reads since the switch
            first = self.offsets[partition] = await asyncio.to_thread(
                self.store.record, self.app_id, self.new.manifest.model_version, partition, offset)
            log.info("partition %d switches to model %s at offset %d", partition, self.new.manifest.model_version, first)
        return self.new if offset >= first else self.old

    async def refresh(self) -> None:
        """The offsets other workers recorded (a partition assigned to this one keeps them)."""
        self.offsets |= await asyncio.to_thread(self.store.offsets, self.app_id, self.new.manifest.model_version)

    def view(self) -> dict:
        return {"from_version": self.old.manifest.model_version, "to_version": self.new.manifest.model_version,
                "from_triton_version": self.request.from_triton_version,
                "to_triton_version": self.request.to_triton_version,
                "from_triton_url": self.request.from_triton_url, "to_triton_url": self.request.to_triton_url,
                "requested_at": self.request.requested_at.isoformat(),
                "partitions": {str(p): o for p, o in sorted(self.offsets.items())},
                "memories_made": getattr(self.new.memories.catch_up, "made", 0)}


# (Triton version, the gRPC URL of the Triton serving it or None for the workers' own) -> a runtime
MakeRuntime = Callable[[int, "str | None"], Awaitable["Runtime"]]


class Switcher:
    """Takes up the worker group's switch request: ``switching`` once it has."""

    def __init__(self, store: SqlSwitches, app_id: str, make_runtime: MakeRuntime, storage_dtype: str) -> None:
        self.store, self.app_id, self.make_runtime, self.storage_dtype = store, app_id, make_runtime, storage_dtype
        self.switching: Switching | None = None
        self._refused: SwitchRequest | None = None

    async def poll(self, active: Runtime) -> Runtime:
        """Take up a new request, if any; returns the runtime of new events (``active`` if none)."""
        request = await asyncio.to_thread(self.store.current, self.app_id)
        if request is None or request == self._refused:
            return active
        if self.switching is not None and self.switching.request == request:
            await self.switching.refresh()
            return self.switching.new
        versions = (request.from_triton_version, request.to_triton_version)
        if active.manifest.triton_version not in versions:
            return await self._refuse(request, f"this worker serves version {active.manifest.triton_version}, "
                                               f"not {versions}", active)
        other_version = versions[active.manifest.triton_version == request.from_triton_version]
        try:
            other = await self.make_runtime(other_version, request.triton_url(other_version))
        except (OSError, ValueError, KeyError) as exc:  # the version is not in this worker's repository
            return await self._refuse(request, f"{type(exc).__name__}: {exc}", active)
        old, new = (active, other) if active.manifest.triton_version == request.from_triton_version else (other, active)
        why = incompatibility(old.manifest, new.manifest)
        if new.manifest.model_version != request.to_model_version:
            why = f"version {request.to_triton_version} holds model {new.manifest.model_version}, not {request.to_model_version}"
        if why:
            await other.models.close()
            return await self._refuse(request, why, active)
        new.memories.catch_up = CatchUp(new.store, old.manifest.model_version, old.id_map, new.manifest, new.id_map,
                                        new.models, self.storage_dtype)
        offsets = await asyncio.to_thread(self.store.offsets, self.app_id, request.to_model_version)
        self.switching = Switching(self.store, self.app_id, request, old, new, offsets)
        log.info("switching from model %s (version %d) to %s (version %d); %d partitions switched already",
                 old.manifest.model_version, request.from_triton_version, new.manifest.model_version,
                 request.to_triton_version, len(offsets))
        return new

    async def _refuse(self, request: SwitchRequest, why: str, active: Runtime) -> Runtime:
        log.error("not switching to version %d: %s", request.to_triton_version, why)
        self._refused = request
        return active
