"""Fixtures for every test: a real breqd on directories of its own, and no daemon left
running after a test, whatever happened in it (daemons are started with tests/daemon.py).
These fixtures touch only the test's tmp_path."""

from __future__ import annotations

import os
import signal
from dataclasses import dataclass
from typing import Iterator

import pytest

from bmig.tracker.blocking_client import TrackerClient
from tests.daemon import RUNNING, Daemon, breqd_argv

# tests/kernel needs a kernel of its own: tests/integration/test_kernel_vm.py boots a
# throw-away one (which sets RUN_IN_VM) and runs that directory there, failing on any skip.
# Collected here as well, its tests would only be reported skipped, and a summary that
# always says "skipped" hides the skip that means a test did not run.
collect_ignore = [] if os.environ.get("RUN_IN_VM") else ["kernel"]

# A shell without job control starts a command put in the background with SIGINT ignored,
# and the commands it runs inherit that: the tests that stop `bmigrate events` or `status
# --watch` with Ctrl-C (SIGINT) would wait for ever. The suite gives its children SIGINT as
# a terminal would, however it was started.
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

@dataclass
class BreqdInstance:
    daemon: Daemon
    state_dir: str
    config_dir: str
    control: str

    def client(self) -> TrackerClient:
        return TrackerClient(self.control, timeout=30)

    def restart(self) -> None:
        """Start a new breqd on the same directories (after stop or kill9)."""
        self.daemon = Daemon(self.daemon.argv, self.daemon.log_path).start()

    def stop(self) -> int | None:
        return self.daemon.stop()


@pytest.fixture(autouse=True)
def no_daemon_left_running() -> Iterator[None]:
    """Whatever daemon a test started and did not stop (it failed half-way, say) is
    stopped when the test ends, newest first."""
    yield
    for daemon in reversed(list(RUNNING)):
        daemon.stop()


@pytest.fixture
def breqd(tmp_path) -> Iterator[BreqdInstance]:
    """A real breqd subprocess on directories of its own, stopped at teardown."""
    state_dir = str(tmp_path / "state")
    config_dir = str(tmp_path / "devices.d")
    control = str(tmp_path / "breqd.sock")
    daemon = Daemon(breqd_argv(state_dir, config_dir, control), str(tmp_path / "breqd.log"))
    instance = BreqdInstance(daemon.start(), state_dir, config_dir, control)
    yield instance
    instance.daemon.stop()


@pytest.fixture
def cli_env(breqd) -> dict[str, str]:
    return dict(os.environ, BMIG_CONTROL=breqd.control)
