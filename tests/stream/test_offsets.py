"""OffsetGuard: an event past a missing offset is held back and the partition read again."""

from __future__ import annotations

from persrec.stream.offsets import OffsetGuard


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
    guard = OffsetGuard(hold_s=0.25, clock=clock)
    assert guard.admit("p1", 256, committed=255) == 255  # seek back to 255, drop 256
    assert guard.admit("p1", 257, committed=255) == "drop"  # fetched before the seek
    clock.now = 0.3
    assert guard.admit("p1", 258, committed=255) == 255  # still coming: seek again
    clock.now = 0.4
    assert guard.due() == {}  # sought 0.1 s ago
    clock.now = 0.6
    assert guard.due() == {"p1": 255}  # no early event came since: the timer seeks
    assert [guard.admit("p1", o, committed=255) for o in (255, 256, 257)] == ["process"] * 3
    clock.now = 2.0
    assert guard.due() == {} and guard.holes_accepted == 0


def test_a_hole_the_broker_has_is_accepted_after_three_answers() -> None:
    clock = Clock()
    guard = OffsetGuard(confirmations=3, clock=clock)
    assert guard.admit("p0", 8, committed=7) == 7  # offset 7 is a transaction marker, say
    assert guard.admit("p0", 9, committed=7) == "drop"  # the rest of that fetch
    assert guard.admit("p0", 8, committed=7) == 7  # the seek answered 8: seek again
    clock.now = 1.0
    assert guard.due() == {"p0": 7}
    assert guard.admit("p0", 8, committed=7) == 7
    assert guard.admit("p0", 8, committed=7) == "process"
    assert guard.admit("p0", 9, committed=7) == "process"
    assert guard.holes_accepted == 1 and guard.due() == {}


def test_reset_starts_each_partition_from_its_committed_offset() -> None:
    guard = OffsetGuard()
    assert guard.admit("p0", 5, committed=5) == "process"
    assert guard.admit("p1", 9, committed=3) == 3
    guard.reset()  # another worker had the partitions meanwhile and committed further
    assert guard.admit("p0", 40, committed=40) == "process"
    assert guard.due() == {}
