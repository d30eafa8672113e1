"""What bmigrate run publishes for bmigrate status (bmig.sender.statusfile): the state
while the publisher lives, "not running" once it is gone without a last word (kill -9
of a real process included), a second publisher refused without harm, a damaged file
or an unusable directory never an exception."""

from __future__ import annotations

import fcntl
import json
import os
import signal
import struct
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


# -- planted names and foreign lock holders ------------------------------------------------

HOLD_SHARED_FLOCK = """
import fcntl, os, sys
fd = os.open(sys.argv[1], os.O_RDONLY)
fcntl.flock(fd, fcntl.LOCK_SH)
print("held", flush=True)
sys.stdin.read()
"""


def _victim(tmp_path):
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    os.chmod(victim, 0o600)
    return victim


def _planted_links(directory, victim, basename):
    """A symbolic link to ``victim`` under every name a writer of ``basename`` ever used
    for its temporary file."""
    for name in (f".{basename}.tmp",):
        os.symlink(victim, os.path.join(directory, name))


def test_the_status_file_is_never_written_through_a_planted_link(tmp_path):
    directory = tmp_path / "status"
    directory.mkdir()
    victim = _victim(tmp_path)
    _planted_links(directory, victim, "vm1.json")
    p = Publisher(str(directory), "vm1")
    assert p.open()
    p.write({"state": "caught up"})
    assert statusfile.read(str(directory), "vm1") == {"state": "caught up"}
    p.close()
    assert victim.read_text() == "precious\n"
    assert oct(os.stat(victim).st_mode & 0o777) == "0o600"
    assert os.stat(directory / "vm1.json").st_mode & 0o777 == 0o644
    assert not [n for n in os.listdir(directory) if n.startswith(".vm1.json.")
                and not os.path.islink(directory / n)]


def test_a_lock_file_that_is_a_planted_link_is_not_used(tmp_path, caplog):
    directory = tmp_path / "status"
    directory.mkdir()
    victim = _victim(tmp_path)
    os.symlink(victim, directory / "vm1.lock")
    p = Publisher(str(directory), "vm1")
    assert not p.open()
    p.write({"state": "caught up"})
    assert victim.read_text() == "precious\n"
    assert oct(os.stat(victim).st_mode & 0o777) == "0o600"
    assert not os.path.exists(directory / "vm1.json")
    assert not statusfile.running(str(directory), "vm1")
    assert any("not publishing" in r.getMessage() for r in caplog.records)


def test_the_lock_file_is_private(tmp_path):
    directory = tmp_path / "status"
    directory.mkdir()
    (directory / "vm1.lock").write_text("")
    os.chmod(directory / "vm1.lock", 0o644)          # as an older run left it
    p = Publisher(str(directory), "vm1")
    assert p.open()
    assert os.stat(directory / "vm1.lock").st_mode & 0o777 == 0o600
    p.close()
    os.unlink(directory / "vm1.lock")
    assert Publisher(str(directory), "vm1").open()
    assert os.stat(directory / "vm1.lock").st_mode & 0o777 == 0o600


def test_a_reader_holding_the_lock_file_open_never_keeps_a_run_from_publishing(tmp_path):
    """What bmigrate status did: a shared flock on NAME.lock while it reads. Another
    process doing so (any reader, or a user who could open the file) when the run
    starts must not stop it from publishing; and the readers themselves take nothing."""
    directory = tmp_path / "status"
    directory.mkdir()
    lock = directory / "vm1.lock"
    lock.write_text("")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    holder = subprocess.Popen([sys.executable, "-c", HOLD_SHARED_FLOCK, str(lock)],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env,
                              text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        assert not statusfile.running(str(directory), "vm1")
        p = Publisher(str(directory), "vm1")
        assert p.open() and p.publishing
        p.write({"state": "caught up"})
        assert statusfile.read(str(directory), "vm1") == {"state": "caught up"}
        assert statusfile.running(str(directory), "vm1")
        p.close()
    finally:
        holder.stdin.close()
        holder.wait(timeout=30)
        holder.stdout.close()


def test_a_run_that_finds_the_lock_held_names_the_holder_and_publishes_once_free(
        tmp_path, caplog):
    directory = str(tmp_path / "status")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    child = subprocess.Popen([sys.executable, "-c", PUBLISH_AND_WAIT, directory],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env,
                             text=True)
    try:
        assert child.stdout.readline().strip() == "published"
        waiting = Publisher(directory, "vm1")
        assert not waiting.open()
        waiting.write({"state": "starting"})
        assert statusfile.read(directory, "vm1")["state"] == "caught up"
    finally:
        child.stdin.close()             # it ends: the kernel lets go of its lock
        child.wait(timeout=30)
        child.stdout.close()
    said = [r.getMessage() for r in caplog.records if "not publishing" in r.getMessage()]
    assert len(said) == 1 and f"pid {child.pid} holds" in said[0], said
    waiting.write({"state": "caught up", "lag_bytes": 0})
    assert waiting.publishing
    assert statusfile.read(directory, "vm1") == {"state": "caught up", "lag_bytes": 0}
    waiting.close()


def test_a_stale_pid_in_the_lock_file_is_not_named(tmp_path, caplog):
    """The pid in the file is named only when that very process still lives."""
    directory = tmp_path / "status"
    directory.mkdir()
    lock = directory / "vm1.lock"
    lock.write_text(f"{os.getpid()} 1\n")         # this pid, but another start time
    os.chmod(lock, 0o600)
    fd = os.open(lock, os.O_RDWR)
    try:
        fcntl.fcntl(fd, fcntl.F_OFD_SETLK,
                    struct.pack("hhqqi4x", fcntl.F_WRLCK, 0, 0, 0, 0))
        assert not Publisher(str(directory), "vm1").open()
    finally:
        os.close(fd)
    said = [r.getMessage() for r in caplog.records if "not publishing" in r.getMessage()]
    assert len(said) == 1 and "another process holds" in said[0] and "pid " not in said[0]
