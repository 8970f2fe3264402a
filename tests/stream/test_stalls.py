"""A partition whose records stop reaching the agent is read again (``stream.stalls``).

The rules by hand (``StallWatch``), then a real broker and a real Faust worker whose consumer
stops fetching one partition, as faust-streaming does when it leaves a partition out of its
active set (``PartitionWatch``). Run as a script, this file is that worker.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from persrec.stream.stalls import StallWatch
from persrec.testing.faust_worker import run_on_filled_topic


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def watch(stall_s: float = 30.0) -> tuple[StallWatch, Clock]:
    clock = Clock()
    return StallWatch(stall_s, clock=clock), clock


def test_a_partition_stuck_with_records_waiting_is_stalled_after_stall_s_then_again_after_another() -> None:
    w, clock = watch()
    found = []
    for t in range(0, 95, 5):
        clock.now = t
        found += [(t, tp) for tp in w.check({"p0": 120, "p1": 80}, {"p0": 100, "p1": 80}, admitted=7, agent_idle=True)]
    assert found == [(30, "p0"), (60, "p0"), (90, "p0")]  # p1 is caught up


def test_a_partition_that_moves_or_catches_up_or_is_unknown_is_never_stalled() -> None:
    w, clock = watch()
    for t in range(0, 200, 5):
        clock.now = t
        needs = {"moving": 100 + t, "caught_up": 50, "unknown": None}
        ends = {"moving": 1000, "caught_up": 50, "unknown": 10}
        assert w.check(ends, needs, admitted=t, agent_idle=True) == []


def test_a_busy_agent_that_takes_nothing_blames_no_partition() -> None:
    """An outage being waited out: the agent holds a batch, nothing new is admitted."""
    w, clock = watch()
    for t in range(0, 100, 5):
        clock.now = t
        assert w.check({"p0": 120}, {"p0": 100}, admitted=7, agent_idle=False) == []
    # the agent takes other partitions' events again, first seen at t=100: 30 s from the last
    # check that found it stuck (t=95)
    stalled = []
    for i, t in enumerate(range(100, 140, 5)):
        clock.now = t
        stalled += [(t, tp) for tp in w.check({"p0": 120}, {"p0": 100}, admitted=8 + i, agent_idle=False)]
    assert stalled == [(125, "p0")]


def test_the_watch_starts_again_at_a_rebalance_and_forgets_partitions_no_longer_assigned() -> None:
    w, clock = watch()
    for t in (0, 20):
        clock.now = t
        assert w.check({"p0": 120}, {"p0": 100}, admitted=0, agent_idle=True) == []
    w.reset()
    for t in (25, 50):
        clock.now = t
        assert w.check({"p0": 120}, {"p0": 100}, admitted=0, agent_idle=True) == []
    clock.now = 55
    assert w.check({"p0": 120}, {"p0": 100}, admitted=0, agent_idle=True) == ["p0"]
    w.check({}, {}, admitted=0, agent_idle=True)
    clock.now = 100
    assert w.check({"p0": 120}, {"p0": 100}, admitted=0, agent_idle=True) == []  # watched afresh


# ------------------------------------------------------------- a real broker, a real Faust worker
PARTITIONS, PER_PARTITION, STOP_AT = 4, 3000, 1000  # partition 0 stops being fetched past offset STOP_AT


def worker() -> None:
    import faust

    from persrec.settings import Settings
    from persrec.stream import faust_adapter as fa
    from persrec.stream.offsets import OffsetGuard, Rewinder
    from persrec.stream.pipeline import create_app
    from persrec.stream.stalls import PartitionWatch

    s = Settings()
    fa.install_idle_fetch_backoff(s.kafka_idle_fetch_backoff_ms / 1000)
    fa.install_seek_record()
    app = create_app(s)
    topic = app.topic(s.topic_interactions, key_serializer="raw", value_serializer="raw", partitions=s.partitions)
    guard = OffsetGuard()
    rewinder = Rewinder(guard, lambda: app.consumer)
    watch = PartitionWatch(app, s.topic_interactions, guard, StallWatch(s.partition_stall_s), rewinder.seek)
    out = Path(os.environ["WORKER_REPORT"])
    seen: dict[int, list[int]] = {p: [] for p in range(s.partitions)}
    report: dict = {"stopped": None, "stalled": [], "seeks": 0}

    async def rebalanced(*_args, **_kwargs) -> None:
        rewinder.reset()
        watch.reset()

    app.on_partitions_assigned.connect(rebalanced)
    app.on_partitions_revoked.connect(rebalanced)

    @app.timer(guard.due_every_s)
    async def due() -> None:
        if offsets := guard.due():
            await rewinder.seek(offsets)

    @app.timer(watch.every_s)
    async def check() -> None:
        for tp in await watch.check():
            report["stalled"].append([tp.partition, time.monotonic() - report["stopped"]])

    @app.agent(topic)
    async def agent(stream):
        async for event in stream.noack().events():
            watch.took()
            msg = event.message
            if guard.admit(msg.tp, msg.offset, fa.committed_offset(app, msg.tp)) == "process" \
                    and msg.offset not in seen[msg.partition]:
                seen[msg.partition].append(msg.offset)
                await stream.ack(event)
            if msg.partition == 0 and msg.offset == STOP_AT and report["stopped"] is None:
                # what Faust's back-pressure does (Consumer.on_buffer_full), without the way back
                app.consumer._get_active_partitions().discard(msg.tp)
                report["stopped"] = time.monotonic()
                report["state_at_stop"] = fa.partition_state(app.consumer, msg.tp)
            watch.done()
            if all(len(v) >= PER_PARTITION for v in seen.values()):
                active = app.consumer._get_active_partitions()  # Faust asserts every member is its TP type
                report.update(seen=seen, stalls=watch.stalls,
                              active=sorted(tp.partition for tp in active if tp.topic == s.topic_interactions))
                out.write_text(json.dumps(report))
                os._exit(0)

    faust.Worker(app, loglevel="warning").execute_from_commandline()


@pytest.mark.kafka
def test_a_partition_faust_stops_fetching_is_read_again(tmp_path, kafka_bootstrap) -> None:
    """Without the repair (``faust_adapter.refetch``) the worker never reports: partition 0 is
    never read again, though it is sought."""
    report, worker_log = run_on_filled_topic(__file__, tmp_path, kafka_bootstrap, PARTITIONS, PER_PARTITION,
                                             env={"PERSREC_PARTITION_STALL_S": "3"})

    assert report["state_at_stop"]["active"] is False  # the stall was real: Faust no longer fetched it
    for p, offsets in report["seen"].items():
        assert sorted(offsets) == list(range(PER_PARTITION)), f"partition {p}"
    assert report["stalls"] == 1 and [p for p, _ in report["stalled"]] == [0]
    assert report["active"] == list(range(PARTITIONS))  # back in Faust's active set, as Faust's own type
    assert 3 <= report["stalled"][0][1] <= 3 + 2 * 0.5 + 5  # stall_s, two checks, and the drain of the others
    assert "reading it again" in worker_log and "'active': False" in worker_log


if __name__ == "__main__":
    worker()
