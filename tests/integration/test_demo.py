"""make demo, as a test: the quick demo makes an identical copy and leaves nothing behind.

It runs ``python -m bmig.demo --quick --json`` as a user would, with the real daemons;
afterwards no process may still mention its temporary directory (the daemons all take
paths inside it), and the directory must be gone. Stopping it half way with SIGTERM
(while it starts its daemons, or while it syncs) must clean up the same way.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading

import pytest

DEMO_TIMEOUT = 150
DEMO = [sys.executable, "-m", "bmig.demo", "--quick", "--json"]
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def processes_mentioning(text: str) -> list[str]:
    """The command lines of live processes (not zombies) whose arguments contain ``text``."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmdline = f.read().replace(b"\0", b" ").decode(errors="replace")
            with open(f"/proc/{pid}/stat") as f:
                state = f.read().rpartition(")")[2].split()[0]
        except OSError:                      # gone meanwhile, or not ours to read
            continue
        if text in cmdline and state != "Z" and int(pid) != os.getpid():
            found.append(f"{pid}: {cmdline}")
    return found


def last_json(stdout: str) -> dict:
    lines = stdout.strip().splitlines()
    assert lines, "the demo printed nothing on stdout"
    return json.loads(lines[-1])


@pytest.mark.timeout(DEMO_TIMEOUT + 30)
def test_the_quick_demo_makes_an_identical_copy_and_leaves_nothing_running():
    done = subprocess.run(DEMO, capture_output=True, text=True, timeout=DEMO_TIMEOUT,
                          stdin=subprocess.DEVNULL, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    summary = last_json(done.stdout)
    assert summary["identical"] is True, summary
    assert summary["verdict"] == "target identical to source"
    assert summary["source_sha256"] == summary["target_sha256"]
    assert summary["writer"]["writes"] > 0
    assert summary["passes"] >= 2 and summary["bytes_sent"] > 0
    if summary["image"]["kind"] == "ext4":
        assert summary["fsck"] == "clean"
    assert [s["converged"] for s in summary["syncs"]] == [True, True]
    assert summary["syncs"][-1]["dirty_bytes"] == 0
    workdir = summary["workdir"]
    assert workdir in done.stderr                    # told to the user at the start
    assert not os.path.exists(workdir)
    assert processes_mentioning(workdir) == []


@pytest.mark.timeout(DEMO_TIMEOUT + 30)
@pytest.mark.parametrize("when", ["[2/8]", "bmigrate sync src"],
                         ids=["starting-daemons", "syncing"])
def test_sigterm_stops_everything_it_started(when):
    proc = subprocess.Popen(DEMO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            stdin=subprocess.DEVNULL, cwd=ROOT)
    assert proc.stderr is not None
    lines: list[str] = []
    reached = threading.Event()

    def read() -> None:                              # until the sync is under way
        for line in proc.stderr:
            lines.append(line)
            if when in line:
                reached.set()
        reached.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        assert reached.wait(DEMO_TIMEOUT), "".join(lines)
        assert proc.poll() is None, "".join(lines)
        proc.send_signal(signal.SIGTERM)
        assert proc.stdout is not None
        stdout = proc.stdout.read()
        proc.wait(timeout=DEMO_TIMEOUT)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    reader.join(timeout=10)
    assert proc.returncode == 130, "".join(lines)
    summary = last_json(stdout)
    assert summary["identical"] is False and summary["error"] == "interrupted"
    assert not os.path.exists(summary["workdir"])
    assert processes_mentioning(summary["workdir"]) == []
