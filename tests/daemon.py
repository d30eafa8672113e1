"""Start real daemons as subprocesses, wait until they say READY=1, stop them after.

A test hands the daemon a NOTIFY_SOCKET of its own, so readiness is the daemon's own
word, not a guess: no sleeps.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Callable

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


# Daemons started and not stopped (or killed) yet: tests/conftest.py stops what a test
# left running, also when it failed half-way.
RUNNING: list["Daemon"] = []


@dataclass
class Daemon:
    """A running daemon process with its log file."""

    argv: list[str]
    log_path: str
    env: dict[str, str] = field(default_factory=dict)
    pass_fds: tuple[int, ...] = ()      # fds the child inherits (sockets from "systemd")
    proc: subprocess.Popen | None = None
    notifications: list[str] = field(default_factory=list)
    _notify: socket.socket | None = None
    _notify_dir: str | None = None

    def start(self, timeout: float = START_TIMEOUT) -> "Daemon":
        self._notify_dir = tempfile.mkdtemp(prefix="bmig-notify-")
        path = os.path.join(self._notify_dir, "notify")
        self._notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._notify.bind(path)
        env = dict(os.environ, NOTIFY_SOCKET=path, PYTHONUNBUFFERED="1", **self.env)
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(self.argv, stdout=log, stderr=log, env=env,
                                     stdin=subprocess.DEVNULL, pass_fds=self.pass_fds)
        log.close()
        RUNNING.append(self)
        try:
            self.wait_for("READY=1", timeout)
        except BaseException:
            self.kill9()
            raise
        return self

    def wait_for(self, line: str, timeout: float = START_TIMEOUT) -> None:
        """Block until the daemon sends ``line`` to its notify socket."""
        assert self._notify is not None and self.proc is not None
        deadline = time.monotonic() + timeout
        while not any(line in n.split("\n") for n in self.notifications):
            if self.proc.poll() is not None:
                raise AssertionError(
                    f"{self.argv[0]} exited with {self.proc.returncode} before {line}:\n"
                    f"{self.log()}")
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no {line} from {self.argv[0]} in {timeout}s:\n{self.log()}")
            self._notify.settimeout(min(left, 0.2))
            try:
                self.notifications.append(self._notify.recv(4096).decode())
            except socket.timeout:
                pass

    def log(self) -> str:
        try:
            with open(self.log_path, errors="replace") as f:
                return f.read()
        except FileNotFoundError:
            return ""

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(timeout=STOP_TIMEOUT)
        self._close_notify()

    def stop(self, timeout: float = STOP_TIMEOUT) -> int | None:
        """SIGTERM, wait, SIGKILL if it will not go; returns the exit code."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=timeout)
        self._close_notify()
        return None if self.proc is None else self.proc.returncode

    def _close_notify(self) -> None:
        """The notify socket and its directory go once the daemon is gone."""
        if self in RUNNING:
            RUNNING.remove(self)
        if self._notify is not None:
            self._notify.close()
            self._notify = None
        if self._notify_dir is not None:
            shutil.rmtree(self._notify_dir, ignore_errors=True)
            self._notify_dir = None


def python_module(module: str) -> list[str]:
    return [sys.executable, "-m", module]


def breqd_argv(state_dir: str, config_dir: str, control: str, *extra: str) -> list[str]:
    return [sys.executable, "-c", "from bmig.cli.breqd import main; main()",
            "--state-dir", state_dir, "--config-dir", config_dir, "--control", control,
            "--log-level", "debug", *extra]
