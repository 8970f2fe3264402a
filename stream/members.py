"""Group members known to be dead, and their removal when a worker starts.

A worker that dies without leaving its consumer group (``kill -9``, a crash) stays a member
until the broker expires it. Apache Kafka does so after the session timeout (Faust's default:
60 s; a group of live workers then rebalances without it). The embedded broker of the demo and
the tests (noida-db 0.2.2) never does, and keeps naming the dead member leader, so a restarted
worker waited forever for an assignment.

So every worker records, in ``work_dir/members/<app id>/``, one file per group member id it held:
its host name, pid and the process's start time. A starting worker asks the broker for its
group's members and removes those recorded as dead: on this host, whose pid no longer runs, or
runs a process that started at another time (the pid was reused). A member with no record, or
recorded on another host, is never removed: its liveness is unknown here.
"""

from __future__ import annotations

import json
import logging
import os
import socket
from pathlib import Path

log = logging.getLogger(__name__)


def registry(work_dir: Path, app_id: str) -> Path:
    return Path(work_dir) / "members" / app_id


def process_start(pid: int) -> str | None:
    """A token that changes when ``pid`` is reused: the start time from /proc (Linux), else
    None (then only whether the pid runs at all can be told)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]  # field 22, starttime, counted after the command


def is_running(pid: int, started: str | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # runs, as another user
        return True
    return started is None or process_start(pid) in (None, started)


def record(directory: Path, member_id: str) -> None:
    """Note that this process holds ``member_id`` (atomically: write, then rename)."""
    directory.mkdir(parents=True, exist_ok=True)
    body = {"member_id": member_id, "host": socket.gethostname(), "pid": os.getpid(),
            "started": process_start(os.getpid())}
    tmp = directory / f".{os.getpid()}.tmp"
    tmp.write_text(json.dumps(body))
    os.replace(tmp, directory / _file_name(member_id))


def known_dead(directory: Path, member_ids: list[str]) -> list[str]:
    """The members of ``member_ids`` recorded on this host by a process that no longer runs."""
    host, dead = socket.gethostname(), []
    for member_id in member_ids:
        path = directory / _file_name(member_id)
        try:
            body = json.loads(path.read_text())
        except (OSError, ValueError):
            continue  # no record: unknown, never removed
        if body.get("host") == host and not is_running(int(body["pid"]), body.get("started")):
            dead.append(member_id)
    return dead


def evict_dead(bootstrap: str, group: str, directory: Path) -> list[str]:
    """Remove the group's members that ``known_dead`` names; returns their ids. Errors are
    logged, not raised: the broker's own expiry remains the fallback."""
    from kafka import KafkaAdminClient
    from kafka.admin import MemberToRemove
    from kafka.errors import KafkaError

    try:
        admin = KafkaAdminClient(bootstrap_servers=bootstrap, client_id="persrec-members")
    except KafkaError as exc:
        log.warning("could not check group %s for dead members: %s", group, exc)
        return []
    try:
        described = admin.describe_groups([group]).get(group) or {}
        members = [m["member_id"] for m in described.get("members", [])]
        dead = known_dead(directory, members)
        if dead:
            admin.remove_group_members(group, [MemberToRemove(member_id=m) for m in dead])
            for m in dead:
                (directory / _file_name(m)).unlink(missing_ok=True)
            log.warning("removed %d dead member(s) of group %s left by killed workers: %s", len(dead), group, dead)
        return dead
    except KafkaError as exc:
        log.warning("could not remove dead members of group %s: %s", group, exc)
        return []
    finally:
        admin.close()


def _file_name(member_id: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in member_id) + ".json"
