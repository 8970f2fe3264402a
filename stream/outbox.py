"""What the worker sends to Kafka: answers straight to the producer, dead letters with their
reason, events re-keyed by user id. A broker outage is waited out (``failures.retrying``), so a
message the pipeline counts as sent is one the broker has."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import faust
import orjson

from .failures import retrying


@dataclass
class Topics:
    interactions: faust.TopicT
    recommendations: faust.TopicT
    dlq: faust.TopicT


def dlq_headers(reason: str, detail: str, source: dict) -> dict[str, bytes]:
    """The headers of a dead letter: a stable reason code, a sentence, where the input was."""
    return {"reason": reason.encode(), "detail": detail.encode()[:500], "source": json.dumps(source).encode()}


class Outbox:
    def __init__(self, app: faust.App, topics: Topics, in_flight: int = 1024) -> None:
        self.app, self.topics = app, topics
        self._forwarding = asyncio.Semaphore(in_flight)  # messages being forwarded at once (backpressure)
        self._background: set[asyncio.Task] = set()

    async def answers(self, messages: list[dict], appended: asyncio.Future) -> None:
        """One message per answer, straight to the producer (Faust's Topic.send adds a channel,
        codecs and a FutureMessage per message, which cost more than the send itself), appended
        in order (then ``appended`` is set) and waited for until the broker has every one. A
        retry sends them all again (same event ids)."""
        payload = [(m["user_id"].encode(), orjson.dumps(m)) for m in messages]
        out = self.topics.recommendations.get_topic_name()

        async def deliver() -> None:
            futures = [await self.app.producer.send(out, k, v, None, None, None) for k, v in payload]
            if not appended.done():
                appended.set_result(None)
            await asyncio.gather(*futures)

        await retrying("publishing", len(payload), deliver)

    async def dead_letter(self, key: bytes | None, value: bytes | None, reason: str, detail: str,
                          source: dict) -> None:
        """One dead letter, waited for until the broker has it."""
        await self._send(self.topics.dlq, key, value or b"", dlq_headers(reason, detail, source), "dead-lettering")

    async def forward(self, topic: faust.TopicT, key: bytes | None, value: bytes, headers: dict | None,
                      then: Callable[[], Awaitable[None]]) -> None:
        """Send one message without waiting for the broker (only for room among the messages
        being forwarded); ``then()`` runs once the broker has it."""
        await self._forwarding.acquire()

        async def run() -> None:
            try:
                await self._send(topic, key, value, headers, f"forwarding to {topic.get_topic_name()}")
                await then()
            finally:
                self._forwarding.release()

        task = asyncio.create_task(run())
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    @staticmethod
    async def _send(topic: faust.TopicT, key: bytes | None, value: bytes, headers: dict | None, what: str) -> None:
        async def deliver() -> None:
            await (await topic.send(key=key, value=value, headers=headers))

        await retrying(what, 1, deliver)
