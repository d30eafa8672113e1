"""bmig/processes.py: the children the demo, the benchmarks and the tests start.

Real child processes (small Python programs), real signals, a real notify socket.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

from bmig import processes
from bmig.processes import Child, Children, Group, NotReady, Stopped, child_env
from tests.daemon import alive, wait_until

NOTIFY = ("import os, socket, sys\n"
          "def notify(text):\n"
          "    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:\n"
          "        s.sendto(text.encode(), os.environ['NOTIFY_SOCKET'])\n")


def python(code: str) -> list[str]:
    return [sys.executable, "-c", NOTIFY + code]


@pytest.fixture
def children():
    """A list of its own for each test; everything on it stopped at the end."""
    mine = Children()
    yield mine
    mine.stop_all(timeout=10)


def test_notifications_are_read_after_ready_so_a_blocking_sender_never_waits(children):
    # 500 notifications after READY=1 from a sender that blocks on a full queue (the
    # kernel queues about ten): it finishes only because they are read without anyone
    # waiting for them, and every one of them is kept, in order.
    child = Child(python("notify('READY=1')\n"
                         "for i in range(500):\n"
                         "    notify(f'STATUS=step {i}')\n"),
                  group=Group.SHARED, children=children)
    child.start(child_env(), notify=True)
    child.wait_ready(timeout=30)
    assert child.proc.wait(timeout=60) == 0
    assert child.stop() == 0                    # reads what is still queued, then closes
    assert child.status_lines() == [f"step {i}" for i in range(500)]
    assert not child.listening and child not in children.running


def test_wait_ready_reports_an_early_exit_and_a_timeout(children):
    gone = Child(python("sys.exit(3)"), name="gone", children=children)
    gone.start(child_env(), notify=True)
    with pytest.raises(NotReady, match="gone exited with status 3 before READY=1") as info:
        gone.wait_ready(timeout=30)
    assert info.value.returncode == 3
    silent = Child(python("import time; time.sleep(60)"), name="silent", children=children)
    silent.start(child_env(), notify=True)
    with pytest.raises(NotReady, match="silent: no READY=1 in 0.3 s") as info:
        silent.wait_ready(timeout=0.3)
    assert info.value.returncode is None
    assert silent.stop(timeout=10) == -signal.SIGTERM


def test_stop_takes_the_whole_group_and_what_ignores_sigterm(children):
    # The child starts a grandchild that ignores SIGTERM (inherited SIG_IGN), then goes
    # back to the default itself: SIGTERM to the group ends the child, and the SIGKILL
    # that follows to the group ends the grandchild.
    child = Child(python("import signal, subprocess, time\n"
                         "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
                         "g = subprocess.Popen(['sleep', '300'])\n"
                         "signal.signal(signal.SIGTERM, signal.SIG_DFL)\n"
                         "notify(f'READY=1\\nSTATUS={g.pid}')\n"
                         "time.sleep(300)\n"),
                  group=Group.OWN, children=children)
    child.start(child_env(), notify=True)
    child.wait_ready(timeout=30)
    grandchild = int(child.status_lines()[0])
    assert os.getpgid(grandchild) == child.pid
    assert child.stop(timeout=10) == -signal.SIGTERM
    wait_until(lambda: not alive(grandchild), timeout=10, what="the grandchild to go")


def test_stop_kills_a_child_that_ignores_sigterm_after_the_timeout(children):
    child = Child(python("import signal, time\n"
                         "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
                         "notify('READY=1')\n"
                         "time.sleep(300)\n"),
                  group=Group.SESSION, children=children)
    child.start(child_env(), notify=True)
    child.wait_ready(timeout=30)
    assert os.getsid(child.pid) == child.pid
    assert child.stop(timeout=0.5) == -signal.SIGKILL


def test_a_shared_child_is_signalled_alone_and_kill9_is_a_crash(children):
    child = Child(python("notify('READY=1'); import time; time.sleep(300)"),
                  group=Group.SHARED, children=children)
    child.start(child_env(), notify=True)
    child.wait_ready(timeout=30)
    assert os.getpgid(child.pid) == os.getpgid(0)
    assert child.kill9() == -signal.SIGKILL
    assert child not in children.running and not child.listening
    assert child.stop() == -signal.SIGKILL          # stopped already: nothing more to do


def test_a_signal_during_a_start_waits_until_the_child_is_listed(children):
    before = {sig: signal.getsignal(sig) for sig in processes.STOP_SIGNALS}
    children.install_signal_handlers()
    child = Child(python("import time; time.sleep(300)"), children=children)
    try:
        with pytest.raises(Stopped, match="SIGTERM"):
            with children.starting():
                signal.raise_signal(signal.SIGTERM)     # held back...
                child.start(child_env())
                assert child in children.running       # ...until it is listed
        with pytest.raises(KeyboardInterrupt):          # outside a start: at once
            signal.raise_signal(signal.SIGINT)
    finally:
        for sig, handler in before.items():
            signal.signal(sig, handler)
    assert child.stop(timeout=10) == -signal.SIGTERM


def test_run_captures_the_output_and_leaves_nothing_listed(children):
    done = processes.run([sys.executable, "-c", "print('out'); import sys; "
                          "print('err', file=sys.stderr); sys.exit(4)"],
                         timeout=30, children=children)
    assert (done.returncode, done.stdout, done.stderr) == (4, "out\n", "err\n")
    with pytest.raises(subprocess.TimeoutExpired):
        processes.run([sys.executable, "-c", "import time; time.sleep(300)"],
                      timeout=0.3, children=children)
    assert children.running == []


def test_child_env_drops_what_is_ours_and_adds_what_is_asked(monkeypatch):
    for name in (*processes.MANAGER_VARIABLES, *processes.BMIG_VARIABLES):
        monkeypatch.setenv(name, "ours")
    monkeypatch.setenv("PYTHONPATH", "/elsewhere")
    monkeypatch.setenv("KEPT", "yes")
    env = child_env({"BMIG_CONTROL": "/run/its.sock"}, import_path="/src")
    assert env["KEPT"] == "yes" and env["PYTHONUNBUFFERED"] == "1"
    assert env["BMIG_CONTROL"] == "/run/its.sock"
    assert not {*processes.MANAGER_VARIABLES, "BMIG_NBD_DIR"} & set(env)
    assert env["PYTHONPATH"] == os.pathsep.join(["/src", "/elsewhere"])
    assert child_env(drop=())["NOTIFY_SOCKET"] == "ours"
