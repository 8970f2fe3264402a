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

A lone event is tried once more **alone** before it is set aside: under a lock shared by every
partition (``Health.alone``), so no other suspect runs at the same time. Triton's dynamic
batcher merges concurrent requests into one ``execute``, and a python-backend model that raises
fails every request of that call, so an innocent event retried in step with a poison event of
another partition fails with it. Retry delays are jittered for the same reason.

Where nothing else runs through the same model (the item encoder: one agent, one batch at a
time), a lone failing item would wait forever for evidence; a ``probe`` (an input known to be
harmless) answered by the model is that evidence.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import random
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

log = logging.getLogger(__name__)
T = TypeVar("T")


class Failure(enum.Enum):
    OUTAGE = "outage"
    ERROR = "error"


class Health:
    """When processing last succeeded (monotonic seconds): the evidence that an input, not the
    model, is at fault."""

    def __init__(self) -> None:
        self.last_success = 0.0
        self.alone = asyncio.Lock()  # a suspect event's last tries run one at a time

    def succeeded(self) -> None:
        self.last_success = time.monotonic()


async def isolate(
    items: Sequence[T], run: Callable[[Sequence[T]], Awaitable[list[Any]]],
    classify: Callable[[BaseException], Failure], health: Health, *, what: str = "processing",
    attempts: int = 3, delay: float = 0.1, max_delay: float = 2.0, probe: T | None = None,
) -> tuple[list[Any], list[tuple[int, BaseException]]]:
    """``run(items)`` -> results aligned with ``items``; returns the results (None where an item
    was set aside) and the set-aside ``(index, exception)`` pairs, in item order."""
    first_error: list[float] = []

    async def probe_answered() -> None:
        try:
            await run([probe])
        except Exception:  # noqa: BLE001 - the model fails on a harmless input: no evidence
            return
        health.succeeded()

    async def attempt(part: Sequence[T]) -> list[Any]:
        wait, errors = delay, 0
        while True:
            try:
                out = await run(part)
                health.succeeded()
                return out
            except Exception as exc:  # noqa: BLE001 - classified below
                if classify(exc) is Failure.ERROR:
                    if not first_error:
                        first_error.append(time.monotonic())
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
            except Exception as exc:  # noqa: BLE001 - an ERROR after ``attempts`` tries
                if len(part) > 1:
                    mid = len(part) // 2
                    (a, fa), (b, fb) = await solve(part[:mid], offset), await solve(part[mid:], offset + mid)
                    return a + b, fa + fb
                if probe is not None and health.last_success <= first_error[0]:
                    await probe_answered()
                if health.last_success > first_error[0]:
                    async with health.alone:  # the verdict, with no other suspect in Triton's batch
                        try:
                            return await attempt(part), []
                        except Exception as again:  # noqa: BLE001 - an ERROR on its own
                            exc = again
                    log.error("%s fails on item %d alone (%s: %s); setting it aside", what, offset, type(exc).__name__, exc)
                    return [None], [(offset, exc)]
                log.error("%s fails on everything since %.0fs ago (%s: %s); waiting for it to work again",
                          what, time.monotonic() - first_error[0], type(exc).__name__, exc)
                await asyncio.sleep(max_delay)

    return await solve(items, 0)
