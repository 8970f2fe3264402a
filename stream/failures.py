"""How the worker tells failures apart: an outage of a service it waits for (Triton unreachable,
the database or the broker down) is waited out (``retrying``); an error about the input may be
set aside by ``stream.poison``."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import TypeVar

from aiokafka.errors import KafkaError as AIOKafkaError
from kafka.errors import KafkaError
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError

from .poison import Failure
from .triton import TritonUnavailable

log = logging.getLogger(__name__)
T = TypeVar("T")


def failure_kind(exc: BaseException) -> Failure:
    """An outage (waited out), or an error about this input (``stream.poison`` may set it aside)."""
    if isinstance(exc, (TritonUnavailable, KafkaError, AIOKafkaError, OSError, asyncio.TimeoutError,
                        OperationalError, InterfaceError)):
        return Failure.OUTAGE
    if isinstance(exc, DBAPIError) and exc.connection_invalidated:
        return Failure.OUTAGE
    return Failure.ERROR


async def retrying(what: str, size: int, step: Callable[[], Awaitable[T]]) -> T:
    """``step()`` until it succeeds: for outages of the broker or the database, which a worker
    waits out (events stay unacknowledged meanwhile)."""
    delay = 0.1
    while True:
        try:
            return await step()
        except Exception:  # noqa: BLE001 - broker/DB trouble: wait and retry
            log.exception("%s of %d failed; retrying in %.1fs", what, size, delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 2.0)
