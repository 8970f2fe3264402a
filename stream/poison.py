"""Poison isolation: a batch whose processing fails is retried, then bisected, so that only the
event(s) that fail on their own are set aside; everything else proceeds.

Two kinds of failure are told apart (``classify``):

- an **outage** (Triton unreachable or timing out, the database or the broker down) is waited
  out: the same part is retried, with backoff, for as long as it takes, and nothing is set aside;
- an **error** (the model or the message builder raised on this input) is retried a few times
  (``attempts``), then the part is split in halves, each solved the same way. A single event
  that still fails is set aside only if processing is known to work: something succeeded since
  this batch first failed (another half, another batch). If nothing has (a broken model fails
  every event), it is waited on like an outage instead of dead-lettering the whole stream.

Once a batch has failed with an error, its calls run **alone** (``Gate``): no other call of
the model is in flight meanwhile. Triton's dynamic batcher merges concurrent requests into one
``execute``, and a python-backend model that raises fails every request of that call, so an
innocent part retried in step with another partition's poison event would fail with it: CI saw
four partitions, each with a poison event, fail together until no event could be judged, and a
verdict merged with a fresh poisoned batch set an innocent event aside. Calls of batches that
have not failed share the model as usual; while a lone call waits, new ones wait behind it.

Where nothing else runs through the same model (the item encoder: one agent, one batch at a
time), a lone failing item would wait forever for evidence; a ``probe`` (an input known to be
harmless) answered by the model is that evidence.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any, TypeVar

log = logging.getLogger(__name__)
T = TypeVar("T")


class Failure(enum.Enum):
    OUTAGE = "outage"
    ERROR = "error"


class Gate:
    """Shared calls run together; an alone call waits until none is in flight and holds off new
    ones (waiting alone calls go first, so a busy stream cannot starve them)."""

    def __init__(self) -> None:
        self._changed = asyncio.Condition()
        self._shared = 0
        self._alone = False
        self._waiting_alone = 0

    @contextlib.asynccontextmanager
    async def shared(self) -> AsyncIterator[None]:
        async with self._changed:
            await self._changed.wait_for(lambda: not self._alone and not self._waiting_alone)
            self._shared += 1
        try:
            yield
        finally:
            async with self._changed:
                self._shared -= 1
                self._changed.notify_all()

    @contextlib.asynccontextmanager
    async def alone(self) -> AsyncIterator[None]:
        async with self._changed:
            self._waiting_alone += 1
            try:
                await self._changed.wait_for(lambda: not self._alone and not self._shared)
            finally:
                self._waiting_alone -= 1
            self._alone = True
        try:
            yield
        finally:
            async with self._changed:
                self._alone = False
                self._changed.notify_all()


class Health:
    """When processing last succeeded (monotonic seconds): the evidence that an input, not the
    model, is at fault; and the ``Gate`` every call of the model passes."""

    def __init__(self) -> None:
        self.last_success = 0.0
        self.gate = Gate()

    def succeeded(self) -> None:
        self.last_success = time.monotonic()


async def isolate(
    items: Sequence[T], run: Callable[[Sequence[T]], Awaitable[list[Any]]],
    classify: Callable[[BaseException], Failure], health: Health, *, what: str = "processing",
    attempts: int = 3, delay: float = 0.1, max_delay: float = 2.0, probe: T | None = None,
) -> tuple[list[Any], list[tuple[int, BaseException]]]:
    """``run(items)`` -> results aligned with ``items``; returns the results (None where an item
    was set aside) and the set-aside ``(index, exception)`` pairs, in item order. A part is split
    after ``attempts`` errors alone (a batch's first error, if it shared the model, does not count)."""
    first_error: list[float] = []  # when this batch first failed with an error; then calls run alone

    async def call(part: Sequence[T]) -> list[Any]:
        async with health.gate.alone() if first_error else health.gate.shared():
            return await run(part)

    async def probe_answered() -> None:
        try:
            await call([probe])
        except Exception:  # noqa: BLE001 - the model fails on a harmless input: no evidence
            return
        health.succeeded()

    async def attempt(part: Sequence[T]) -> list[Any]:
        wait, errors = delay, 0
        while True:
            try:
                out = await call(part)  # alone once this batch has failed (``first_error``)
                health.succeeded()
                return out
            except Exception as exc:  # noqa: BLE001 - classified below
                if classify(exc) is Failure.ERROR:
                    if not first_error:  # it shared the model: perhaps another request's fault
                        first_error.append(time.monotonic())
                    else:
                        errors += 1
                        if errors >= attempts:
                            raise
                log.warning("%s of %d failed (%s: %s); retrying in %.1fs", what, len(part), type(exc).__name__, exc, wait)
                await asyncio.sleep(wait * random.uniform(0.5, 1.5))
                wait = min(wait * 2, max_delay)

    async def solve(part: Sequence[T], offset: int) -> tuple[list[Any], list[tuple[int, BaseException]]]:
        while True:
            try:
                return await attempt(part), []
            except Exception as exc:  # noqa: BLE001 - an ERROR after ``attempts`` tries alone
                if len(part) > 1:
                    mid = len(part) // 2
                    (a, fa), (b, fb) = await solve(part[:mid], offset), await solve(part[mid:], offset + mid)
                    return a + b, fa + fb
                if probe is not None and health.last_success <= first_error[0]:
                    await probe_answered()
                if health.last_success > first_error[0]:  # the model works; this event fails on its own
                    log.error("%s fails on item %d alone (%s: %s); setting it aside", what, offset, type(exc).__name__, exc)
                    return [None], [(offset, exc)]
                log.error("%s fails on everything since %.0fs ago (%s: %s); waiting for it to work again",
                          what, time.monotonic() - first_error[0], type(exc).__name__, exc)
                await asyncio.sleep(max_delay)

    return await solve(items, 0)
