"""What bmigrate run publishes for bmigrate status (bmig.sender.statusfile): the state
while the publisher lives, "not running" once it is gone without a last word (kill -9
of a real process included), a second publisher refused without harm, a damaged file
or an unusable directory never an exception."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

from bmig.sender import statusfile
from bmig.sender.statusfile import Publisher

PUBLISH_AND_WAIT = """
import sys
from bmig.sender.statusfile import Publisher
p = Publisher(sys.argv[1], "vm1")
assert p.open()
p.write({"state": "caught up", "pid": 1, "lag_bytes": 0})
print("published", flush=True)
sys.stdin.read()
"""


def test_while_the_publisher_lives_its_word_is_read(tmp_path):
    directory = str(tmp_path / "status")
    p = Publisher(directory, "vm1")
    assert p.open() and p.publishing
    p.write({"state": "caught up", "lag_bytes": 0, "pid": os.getpid()})
    assert statusfile.read(directory, "vm1") == {"state": "caught up", "lag_bytes": 0,
                                                 "pid": os.getpid()}
    assert statusfile.running(directory, "vm1")
    p.write({"state": "retrying", "pid": os.getpid()})
    assert statusfile.read(directory, "vm1")["state"] == "retrying"
    assert not [n for n in os.listdir(directory) if n.endswith(".tmp")]
    p.close()
    gone = statusfile.read(directory, "vm1")
    assert gone["state"] == "not running" and "'retrying'" in gone["message"]
    assert statusfile.read(directory, "vm2") is None


def test_a_last_word_stays_true_after_the_end(tmp_path):
    directory = str(tmp_path)
    for last in ("stopped", "failed"):
        p = Publisher(directory, "vm1")
        assert p.open()
        p.write({"state": last})
        p.close()
        assert statusfile.read(directory, "vm1") == {"state": last}


def test_a_publisher_killed_with_sigkill_is_not_running(tmp_path):
    directory = str(tmp_path / "status")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    child = subprocess.Popen([sys.executable, "-c", PUBLISH_AND_WAIT, directory],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env,
                             text=True)
    try:
        assert child.stdout.readline().strip() == "published"
        assert statusfile.read(directory, "vm1")["state"] == "caught up"
        # Another run of the same device gets no lock: it does not publish, and says so.
        second = Publisher(directory, "vm1")
        assert not second.open() and not second.publishing
        second.write({"state": "starting"})
        assert statusfile.read(directory, "vm1")["state"] == "caught up"
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=30)
        child.stdin.close()
        child.stdout.close()
    assert statusfile.read(directory, "vm1")["state"] == "not running"
    third = Publisher(directory, "vm1")          # the next run takes over
    assert third.open()
    third.close()


def test_damage_and_unusable_directories_are_no_exception(tmp_path, caplog):
    directory = str(tmp_path)
    with open(os.path.join(directory, "vm1.json"), "w") as f:
        f.write("{not json")
    damaged = statusfile.read(directory, "vm1")
    assert damaged["state"] == "unreadable" and "not valid JSON" in damaged["error"]
    with open(os.path.join(directory, "vm1.json"), "w") as f:
        json.dump([1, 2], f)
    assert statusfile.read(directory, "vm1")["state"] == "unreadable"
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    p = Publisher(str(blocker / "status"), "vm1")       # a directory under a file
    assert not p.open()
    p.write({"state": "starting"})
    p.write({"state": "caught up"})
    p.close()
    warnings = [r for r in caplog.records if "not publishing" in r.getMessage()]
    assert len(warnings) == 1, caplog.records
