"""OrderedAcks: events are acknowledged in read order per partition, whatever order they finish in."""

from __future__ import annotations

import asyncio
import random
import types

from persrec.stream.acks import AckGate, OrderedAcks
from persrec.stream.faust_adapter import wrap_ack


def test_acks_follow_read_order_per_partition():
    acked: list[tuple[int, int]] = []

    async def ack(event):
        acked.append(event)

    async def run():
        acks = OrderedAcks(ack)
        handles = [acks.track(p, (p, off)) for off in range(50) for p in (0, 1)]
        order = list(range(len(handles)))
        random.Random(0).shuffle(order)
        counts = [await acks.finish(handles[i]) for i in order]
        return acks, counts

    acks, counts = asyncio.run(run())
    assert sum(counts) == 100 and acks.waiting() == 0
    for p in (0, 1):  # each partition's offsets acknowledged exactly once, in order
        assert [off for q, off in acked if q == p] == list(range(50))


def test_an_unfinished_event_holds_back_later_ones():
    acked = []
    acks = OrderedAcks(acked.append)  # a plain function works too

    async def run():
        first, second, third = (acks.track("tp", n) for n in range(3))
        assert await acks.finish(second) == 0 and await acks.finish(third) == 0
        assert acked == [] and acks.waiting() == 3  # offset 0 in flight: nothing committed past it
        assert await acks.finish(first) == 3

    asyncio.run(run())
    assert acked == [0, 1, 2]


class FakeConsumer:
    def __init__(self) -> None:
        self.acked: list[int] = []

    def ack(self, message) -> bool:
        self.acked.append(message.offset)
        return True


def message(topic: str, offset: int):
    return types.SimpleNamespace(topic=topic, tp=(topic, 0), offset=offset)


def test_gate_holds_back_input_messages_the_agent_did_not_finish() -> None:
    consumer = FakeConsumer()
    gate = AckGate({"interactions"})
    wrap_ack(consumer, gate.allows)
    wrap_ack(consumer, gate.allows)  # idempotent: one wrapper
    done, skipped = message("interactions", 5), message("interactions", 6)
    gate.release(done)
    assert consumer.ack(done) is True
    assert consumer.ack(skipped) is False  # Faust acking a message its stream skipped
    assert consumer.ack(message("windows-changelog", 6)) is True  # other topics pass
    assert consumer.acked == [5, 6]  # the changelog's 6, not the skipped input message
    assert consumer.ack(done) is False  # a release lets one acknowledgement through
    gate.release(skipped)  # delivered again after the seek, finished by the agent
    assert consumer.ack(skipped) is True and consumer.acked == [5, 6, 6]


def test_the_faust_adapter_refuses_untested_library_versions(monkeypatch) -> None:
    import importlib
    import importlib.metadata

    import pytest

    import persrec.stream.faust_adapter as fa

    real = importlib.metadata.version
    monkeypatch.setattr(importlib.metadata, "version", lambda name: "9.9.9" if name == "aiokafka" else real(name))
    with pytest.raises(ImportError, match="tested with exactly"):
        importlib.reload(fa)
    monkeypatch.undo()
    importlib.reload(fa)  # the installed, pinned versions pass
