"""OffsetGuard: an event past a missing offset is held back and the partition read again;
ReadBarrier: records fetched before the seek do not reach Faust after it."""

from __future__ import annotations

from persrec.stream.offsets import OffsetGuard, ReadBarrier


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_contiguous_offsets_and_redeliveries_pass() -> None:
    guard = OffsetGuard()
    assert [guard.admit("p0", o, committed=10) for o in (10, 11, 12)] == ["process"] * 3
    assert guard.admit("p0", 11, committed=10) == "process"  # a redelivery: the window knows it
    assert guard.admit("p1", 0, committed=None) == "process"  # nothing committed yet: any start
    assert guard.due() == {}


def test_a_missing_offset_is_read_again() -> None:
    """The broker-restart case: committed 255, the stream's first event after the rebalance 256."""
    clock = Clock()
    guard = OffsetGuard(clock=clock)
    assert guard.admit("p1", 256, committed=255) == 255  # seek back to 255, drop 256
    clock.now = 5.0
    assert guard.admit("p1", 257, committed=255) == "drop"  # fetched before the seek: however late
    assert guard.due() == {}  # the re-read has not begun: the barrier still holds stale records
    guard.reread("p1", 255)
    clock.now = 5.5
    assert guard.admit("p1", 258, committed=255) == "drop"  # still in the stream buffer
    assert guard.due() == {}
    assert [guard.admit("p1", o, committed=255) for o in (255, 256, 257)] == ["process"] * 3
    clock.now = 20.0
    assert guard.due() == {} and guard.holes_accepted == 0


def test_a_slow_agent_is_not_taken_for_a_lost_reread() -> None:
    """A model-bound agent, a few events a second: the seek's re-read begins only once Faust's
    stream buffer has room, and its first record comes behind what Faust had queued (up to
    offset 60 of p0, and other partitions' events)."""
    clock = Clock()
    guard = OffsetGuard(stuck_s=10.0, max_ahead=1000, clock=clock)
    assert guard.admit("p0", 50, committed=40) == 40

    def agent_busy(seconds: range) -> None:
        for t in seconds:
            clock.now = float(t)
            assert [guard.admit("p1", 3 * t + i, committed=None) for i in range(3)] == ["process"] * 3
            assert guard.due() == {}  # (the 10 s clock rule sought again at t=10, the 1 s one at t=3)

    agent_busy(range(1, 30))
    guard.reread("p0", 40, passed=60)
    assert guard.admit("p0", 51, committed=40) == "drop"  # queued before the seek
    agent_busy(range(30, 60))
    assert [guard.admit("p0", o, committed=40) for o in range(40, 62)] == ["process"] * 22
    assert guard.due() == {}


def test_a_reread_record_past_what_was_queued_means_its_first_was_lost() -> None:
    clock = Clock()
    guard = OffsetGuard(clock=clock)
    assert guard.admit("p0", 50, committed=40) == 40
    guard.reread("p0", 40, passed=60)
    assert guard.admit("p0", 60, committed=40) == "drop"  # the last one queued before the seek
    assert guard.admit("p0", 61, committed=40) == 40  # from the re-read, and 40 never came: seek
    assert guard.admit("p0", 62, committed=40) == "drop"  # the rest of that re-read
    guard.reread("p0", 40, passed=62)
    assert [guard.admit("p0", o, committed=40) for o in (40, 41, 42)] == ["process"] * 3
    assert guard.due() == {}


def test_a_rewind_is_sought_again_when_the_agent_gets_nothing() -> None:
    clock = Clock()
    guard = OffsetGuard(stuck_s=10.0, max_ahead=100, clock=clock)
    assert guard.admit("p0", 50, committed=40) == 40
    clock.now = 9.9
    assert guard.due() == {}
    clock.now = 10.1
    assert guard.due() == {"p0": 40}  # nothing at all reached the agent: the seek was lost
    guard.reread("p0", 40, passed=60)  # the re-read began at 40 ...
    clock.now = 20.0
    assert guard.due() == {}
    clock.now = 20.2
    assert guard.due() == {"p0": 40}  # ... and the agent has had nothing since: lost on the way
    guard.reread("p0", 40, passed=60)
    assert [guard.admit("p1", o, committed=None) for o in range(99)] == ["process"] * 99
    assert guard.due() == {}
    assert guard.admit("p1", 99, committed=None) == "process"
    assert guard.due() == {"p0": 40}  # more events than Faust can queue ahead of it, and not it
    assert guard.admit("p0", 40, committed=40) == "process" and guard.due() == {}


def test_a_hole_the_broker_has_is_accepted_after_three_answers() -> None:
    clock = Clock()
    guard = OffsetGuard(confirmations=3, clock=clock)
    assert guard.admit("p0", 8, committed=7) == 7  # offset 7 is a transaction marker, say
    assert guard.admit("p0", 9, committed=7) == "drop"  # the rest of that fetch
    guard.reread("p0", 8)  # the seek's fetch began at 8
    assert guard.admit("p0", 8, committed=7) == 7  # seek again
    guard.reread("p0", 9)  # a different answer (its start was lost): the count starts again
    assert guard.admit("p0", 9, committed=7) == 7
    for _ in range(2):
        guard.reread("p0", 8)
        assert guard.admit("p0", 8, committed=7) == 7
    guard.reread("p0", 8)
    assert guard.admit("p0", 8, committed=7) == "process"  # three answers in a row: 8
    assert guard.admit("p0", 9, committed=7) == "process"
    assert guard.holes_accepted == 1 and guard.due() == {}


class Record:
    def __init__(self, offset: int) -> None:
        self.offset = offset


def offsets(pairs) -> list[tuple[str, int]]:
    return [(tp, r.offset) for tp, r in pairs]


def fetch(tp: str, *offs: int) -> list[tuple[str, Record]]:
    return [(tp, Record(o)) for o in offs]


def test_barrier_holds_a_partition_until_its_reread_begins() -> None:
    barrier, began = ReadBarrier(), []
    barrier.on_reread = lambda tp, o: began.append((tp, o))
    in_flight = barrier.filter(fetch("p0", 500, 501, 502) + fetch("p1", 7, 8))  # fetched before the seek
    assert offsets([next(in_flight)]) == [("p0", 500)]
    barrier.hold("p0", 400)  # a rewind: from here on none of p0's stale records pass
    assert offsets(in_flight) == [("p1", 7), ("p1", 8)]
    barrier.sought("p0")
    assert offsets(barrier.filter(fetch("p0", 400, 401) + fetch("p1", 9))) == [("p0", 400), ("p0", 401), ("p1", 9)]
    assert began == [("p0", 400)] and barrier.dropped == 2
    assert offsets(barrier.filter(fetch("p0", 402))) == [("p0", 402)]  # released
    assert barrier.passed == {"p0": 500, "p1": 9}  # the highest of each passed on
    barrier.clear()
    assert barrier.passed == {}


def test_barrier_lets_a_fetch_after_the_seek_through_where_the_broker_has_a_hole() -> None:
    barrier, began = ReadBarrier(), []
    barrier.on_reread = lambda tp, o: began.append((tp, o))
    barrier.hold("p0", 7)
    assert offsets(barrier.filter(fetch("p0", 20, 21))) == []  # before the seek ended: stale
    stale = barrier.filter(fetch("p0", 22))  # a fetch that came before the seek ended ...
    barrier.sought("p0")
    assert offsets(stale) == []  # ... is stale even when iterated after it
    assert offsets(barrier.filter(fetch("p0", 8, 9))) == [("p0", 8), ("p0", 9)]  # no record at 7
    assert began == [("p0", 8)]


def test_barrier_release_and_clear_let_everything_through() -> None:
    barrier = ReadBarrier()
    barrier.hold("p0", 1)
    barrier.hold("p1", 1)
    barrier.release("p0")  # the seek failed
    assert offsets(barrier.filter(fetch("p0", 5) + fetch("p1", 5))) == [("p0", 5)]
    barrier.clear()  # a rebalance
    assert offsets(barrier.filter(fetch("p1", 6))) == [("p1", 6)]


def test_reset_starts_each_partition_from_its_committed_offset() -> None:
    guard = OffsetGuard()
    assert guard.admit("p0", 5, committed=5) == "process"
    assert guard.admit("p1", 9, committed=3) == 3
    guard.reset()  # another worker had the partitions meanwhile and committed further
    assert guard.admit("p0", 40, committed=40) == "process"
    assert guard.due() == {}


def test_a_rewind_forgets_faust_gaps_from_its_offset_on() -> None:
    from intervaltree import IntervalTree

    from persrec.stream.faust_adapter import forget_gaps

    class Consumer:
        _gap = {"p0": IntervalTree.from_tuples([(3, 5), (10, 20)]), "p1": IntervalTree.from_tuples([(4, 9)])}

    forget_gaps(Consumer, "p0", 12)  # records fetched before a seek passed after it: 12-19 unread
    assert sorted((g.begin, g.end) for g in Consumer._gap["p0"]) == [(3, 5), (10, 12)]
    forget_gaps(Consumer, "p1", 9)
    assert sorted((g.begin, g.end) for g in Consumer._gap["p1"]) == [(4, 9)]
    forget_gaps(Consumer, "p2", 0)  # no gaps at all


def test_the_seek_after_a_rebalance_is_recorded_per_assignment(monkeypatch) -> None:
    """faust-streaming resumes partitions before it seeks them to the committed offsets; the
    pipeline waits for that seek when it has no committed offset (``faust_adapter.sought``).
    Each assignment needs its own seek, also when the group generation repeats (a broker that
    lost its group state starts again at generation 1)."""
    import asyncio
    import types

    from faust.transport.consumer import Consumer
    from faust.types import TP

    from persrec.stream import faust_adapter as fa

    tp = TP("interactions", 0)

    fa.install_seek_record()
    fa.install_seek_record()  # idempotent: one count per assignment, not two

    class Stub:
        def __init__(self) -> None:
            self._read_offset, self._committed_offset = {}, {}

        async def seek_to_committed(self):
            return {tp: 41}

    consumer = Stub()
    app = types.SimpleNamespace(consumer=consumer)
    handled = []

    async def faust_assigned(self, assigned, generation_id):  # Faust's own handling, left out here
        handled.append(generation_id)

    monkeypatch.setattr(fa, "_ORIGINAL_ASSIGNED", faust_assigned)

    def assign(generation: int) -> None:
        asyncio.run(Consumer.on_partitions_assigned(consumer, {tp}, generation))

    assert not fa.sought(app)  # nothing assigned, nothing sought
    assign(1)
    assert not fa.sought(app)
    asyncio.run(Consumer.perform_seek(consumer))
    assert fa.sought(app) and consumer._committed_offset == {tp: 41}
    assign(1)  # the broker restarted: the same generation again
    assert not fa.sought(app)
    asyncio.run(Consumer.perform_seek(consumer))
    assert fa.sought(app) and handled == [1, 1] and consumer._persrec_assignment == 2
