"""Table recovery that stops receiving a changelog partition is read again (``stalls.RecoveryWatch``).

A real broker and a real Faust worker (the pipeline's app) recover a table whose changelog
is already full, and the first time Faust's recovery resumes the changelog partitions, the
resume of partition 0 is lost: Faust leaves it out of the partitions it fetches, as it does
after some rebalances (``stalls``), and recovery waits for it forever. Run as a script, this
file is that worker.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from persrec.testing.faust_worker import run_on_filled_topic

PARTITIONS, PER_PARTITION = 4, 500


def worker() -> None:
    import faust
    from faust.transport.consumer import Consumer

    from persrec.settings import Settings
    from persrec.stream import faust_adapter as fa
    from persrec.stream.pipeline import create_app
    from persrec.stream.stalls import RecoveryWatch, StallWatch

    s = Settings()
    fa.install_seek_record()
    app = create_app(s)
    changelog = app.topic(s.topic_interactions, key_serializer="raw", value_serializer="raw", partitions=s.partitions)
    app.Table("t", default=None, partitions=s.partitions, key_type=bytes, value_type=bytes, changelog_topic=changelog)
    watch = RecoveryWatch(app, StallWatch(s.recovery_stall_s))
    out = Path(os.environ["WORKER_REPORT"])
    report: dict = {"lost": None}
    resume = Consumer.resume_partitions

    def lossy_resume(self, tps) -> None:
        tps = set(tps)
        if report["lost"] is None and (lost := [tp for tp in tps if tp.topic == changelog.get_topic_name()
                                                and tp.partition == 0]):
            tps -= set(lost)
            report["lost"] = time.monotonic()
        resume(self, tps)

    Consumer.resume_partitions = lossy_resume

    check = watch.check

    async def checked() -> list:
        if stalled := await check():
            report.setdefault("repaired_after_s", time.monotonic() - report["lost"])
        return stalled

    watch.check = checked

    async def assigned(*_args, **_kwargs) -> None:
        watch.start()

    app.on_partitions_assigned.connect(assigned)

    @app.timer(0.5)
    async def done() -> None:
        recovery = app.tables.recovery
        if report["lost"] is not None and recovery.completed.is_set() and not recovery.in_recovery:
            report.update(stalls=watch.stalls, offsets={tp.partition: offset for tp, offset
                                                       in recovery.active_offsets.items()})
            out.write_text(json.dumps(report))
            os._exit(0)

    faust.Worker(app, loglevel="warning").execute_from_commandline()


@pytest.mark.kafka
def test_a_changelog_partition_recovery_stops_receiving_is_read_again(tmp_path, kafka_bootstrap) -> None:
    """Without the repair the worker never reports: recovery waits for partition 0 forever."""
    report, worker_log = run_on_filled_topic(__file__, tmp_path, kafka_bootstrap, PARTITIONS, PER_PARTITION,
                                             env={"PERSREC_RECOVERY_STALL_S": "3"}, timeout_s=120)

    assert report["lost"] is not None  # the fault happened
    assert report["stalls"] == 1  # one repair, of partition 0
    assert {int(p): o for p, o in report["offsets"].items()} == {p: PER_PARTITION - 1 for p in range(PARTITIONS)}
    assert 3 <= report["repaired_after_s"] <= 3 + 2 * 1.0 + 5  # stall_s, two checks, slack
    assert "table recovery stuck at offset 0 of 500" in worker_log


if __name__ == "__main__":
    worker()
