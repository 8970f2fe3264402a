"""OffsetGuard: an event past a missing offset is held back and the partition read again."""

from __future__ import annotations

from persrec.stream.offsets import OffsetGuard


def test_contiguous_offsets_and_redeliveries_pass() -> None:
    guard = OffsetGuard()
    assert [guard.admit("p0", o, committed=10) for o in (10, 11, 12)] == ["process"] * 3
    assert guard.admit("p0", 11, committed=10) == "process"  # a redelivery: the window knows it
    assert guard.admit("p1", 0, committed=None) == "process"  # nothing committed yet: any start


def test_a_missing_offset_is_read_again() -> None:
    """The broker-restart case: committed 255, the stream's first event after the rebalance 256."""
    guard = OffsetGuard()
    assert guard.admit("p1", 256, committed=255) == 255  # seek back to 255, drop 256
    assert guard.admit("p1", 257, committed=255) == 255  # fetched before the seek: seek again
    assert [guard.admit("p1", o, committed=255) for o in (255, 256, 257)] == ["process"] * 3
    assert guard.holes_accepted == 0


def test_a_hole_the_broker_has_is_accepted_after_the_same_answer_three_times() -> None:
    guard = OffsetGuard(confirmations=3)
    assert guard.admit("p0", 8, committed=7) == 7  # offset 7 is a transaction marker, say
    assert guard.admit("p0", 9, committed=7) == 7  # the rest of that fetch
    assert guard.admit("p0", 8, committed=7) == 7  # the seek answered 8 again
    assert guard.admit("p0", 8, committed=7) == "process"
    assert guard.admit("p0", 9, committed=7) == "process"
    assert guard.holes_accepted == 1


def test_reset_starts_each_partition_from_its_committed_offset() -> None:
    guard = OffsetGuard()
    assert guard.admit("p0", 5, committed=5) == "process"
    guard.reset()  # another worker had the partition meanwhile and committed up to 40
    assert guard.admit("p0", 40, committed=40) == "process"
