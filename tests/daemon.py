"""Start real daemons as subprocesses, wait until they say READY=1, stop them after.

A test hands the daemon a NOTIFY_SOCKET of its own, so readiness is the daemon's own
word, not a guess: no sleeps. The starting, the reading of the notify socket (all the
time, so the daemon's notifications are never dropped for a full queue) and the stopping
are bmig/processes.py's, as for the demo and the benchmarks; a test's daemon stays in the
test's process group and a stop signals it alone. This module may not touch the daemons'
state: it only starts, watches and stops.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from typing import Callable

from bmig.processes import CHILDREN, Child, Group, NotReady, child_env

START_TIMEOUT = 30.0
STOP_TIMEOUT = 30.0


def wait_until(condition: Callable[[], object], timeout: float = 10.0,
               what: str = "condition") -> object:
    """Poll ``condition`` until it is truthy; fail the test after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    delay = 0.005
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(delay)
        delay = min(delay * 2, 0.1)


def alive(pid: int) -> bool:
    """Whether ``pid`` runs: a zombie waiting for its reaper does not. A SIGKILL takes
    effect after kill() returns, so a test that killed ``pid`` waits for ``not alive``."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] != "Z"
    except OSError:
        return False


# Daemons started and not stopped (or killed) yet: tests/conftest.py stops what a test
# left running, also when it failed half-way.
RUNNING: list[Child] = CHILDREN.running


@dataclass(eq=False)
class Daemon:
    """A running daemon process with its log file."""

    argv: list[str]
    log_path: str
    env: dict[str, str] = field(default_factory=dict)
    pass_fds: tuple[int, ...] = ()      # fds the child inherits (sockets from "systemd")
    _child: Child | None = field(default=None, init=False, repr=False)
    _unread: int = field(default=0, init=False, repr=False)   # not passed by a wait_for yet

    def start(self, timeout: float = START_TIMEOUT) -> "Daemon":
        self._child = Child(self.argv, log_path=self.log_path, group=Group.SHARED)
        self._child.start(child_env(self.env), notify=True, pass_fds=self.pass_fds)
        try:
            self.wait_for("READY=1", timeout)
        except BaseException:
            self.kill9()
            raise
        return self

    def wait_for(self, line: str, timeout: float = START_TIMEOUT) -> None:
        """Block until the daemon sends ``line`` to its notify socket."""
        assert self._child is not None
        try:
            self._unread = self._child.wait_notified(
                lambda notes: next((i + 1 for i, n in enumerate(notes)
                                    if line in n.split("\n")), None), line, timeout)
        except NotReady as exc:
            if exc.returncode is None:
                raise AssertionError(f"no {line} from {self.argv[0]} in {timeout}s:\n"
                                     f"{self.log()}") from None
            raise AssertionError(f"{self.argv[0]} exited with {exc.returncode} before "
                                 f"{line}:\n{self.log()}") from None

    @property
    def proc(self):
        return None if self._child is None else self._child.proc

    @property
    def notifications(self) -> list[str]:
        """Every notification received so far (a test may clear() it)."""
        return [] if self._child is None else self._child.notifications

    @property
    def _notify(self) -> "_Unread | None":
        """What the notify socket still held in the days it was read only by wait_for:
        the notifications after the one the last wait_for() found."""
        return _Unread(self) if self._child is not None and self._child.listening else None

    def log(self) -> str:
        try:
            with open(self.log_path, errors="replace") as f:
                return f.read()
        except FileNotFoundError:
            return ""

    @property
    def pid(self) -> int:
        assert self._child is not None
        return self._child.pid

    def kill9(self) -> None:
        assert self._child is not None
        self._child.kill9(STOP_TIMEOUT)

    def stop(self, timeout: float = STOP_TIMEOUT) -> int | None:
        """SIGTERM, wait, SIGKILL if it will not go; returns the exit code."""
        return None if self._child is None else self._child.stop(timeout)


class _Unread:
    """recv() and setblocking() over the notifications no wait_for() has passed yet, each
    once, for tests that read what the daemon sent last (STOPPING=1, say)."""

    def __init__(self, daemon: Daemon):
        self.daemon = daemon

    def setblocking(self, flag: bool) -> None:
        pass

    def recv(self, size: int) -> bytes:
        child = self.daemon._child
        assert child is not None
        child.sync_notifications()             # all it sent so far is in notifications
        notes = child.notifications
        if self.daemon._unread >= len(notes):
            self.daemon._unread = len(notes)
            raise BlockingIOError
        self.daemon._unread += 1
        return notes[self.daemon._unread - 1].encode()[:size]


def python_module(module: str) -> list[str]:
    return [sys.executable, "-m", module]


def breqd_argv(state_dir: str, config_dir: str, control: str, *extra: str) -> list[str]:
    return [sys.executable, "-c", "from bmig.cli.breqd import main; main()",
            "--state-dir", state_dir, "--config-dir", config_dir, "--control", control,
            "--log-level", "debug", *extra]
