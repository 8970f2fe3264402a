"""stream/members.py: which group members a starting worker may remove (never a live one)."""

import json
import os
import socket
import subprocess
import sys

from persrec.stream import members


def test_only_members_recorded_dead_on_this_host_are_named(tmp_path) -> None:
    members.record(tmp_path, "alive-me")  # this process
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / "dead-1.json").write_text(json.dumps({"member_id": "dead-1", "host": socket.gethostname(),
                                                      "pid": dead.pid, "started": "1"}))
    # the pid runs, but it is another process than the one recorded (the pid was reused)
    (tmp_path / "reused.json").write_text(json.dumps({"member_id": "reused", "host": socket.gethostname(),
                                                      "pid": os.getpid(), "started": "not-this-start"}))
    (tmp_path / "elsewhere.json").write_text(json.dumps({"member_id": "elsewhere", "host": "another-host",
                                                         "pid": dead.pid, "started": None}))
    ids = ["alive-me", "dead-1", "reused", "elsewhere", "no-record"]
    assert members.known_dead(tmp_path, ids) == ["dead-1", "reused"]


def test_a_record_is_rewritten_atomically_per_member(tmp_path) -> None:
    members.record(tmp_path, "m/1")
    members.record(tmp_path, "m/1")
    body = json.loads((tmp_path / "m_1.json").read_text())
    assert body["pid"] == os.getpid() and body["member_id"] == "m/1"
    assert [p.name for p in tmp_path.iterdir()] == ["m_1.json"]
