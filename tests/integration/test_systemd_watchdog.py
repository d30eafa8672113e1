"""WATCHDOG=1 from bmig-nbd and `bmigrate run`, as their units' WatchdogSec= expects.

The test plays systemd: WATCHDOG_USEC in the daemon's environment, its notify socket
read by tests/daemon.py. The pings must come from the loop that does the work: they go
on while that loop waits on purpose (idle, a frame held back by the bandwidth limit) and
stop while it is stuck (here: on a breqd that was sent SIGSTOP), which is what lets
systemd notice a hung daemon. Under systemd itself, tests/kernel/test_kernel_systemd.py.
"""

from __future__ import annotations

import os
import signal
import time

from tests.daemon import Daemon, wait_until
from tests.integration.nbd_helpers import start_nbd
from tests.integration.sync_helpers import (MiB, bmigrate_argv, make_image, start_receiver,
                                            track)

WATCHDOG = {"WATCHDOG_USEC": "400000"}        # a ping at least every 0.2 s


def pings(daemon: Daemon, count: int = 5, timeout: float = 20) -> None:
    """``count`` fresh WATCHDOG=1 from now on."""
    for _ in range(count):
        daemon.notifications.clear()
        daemon.wait_for("WATCHDOG=1", timeout=timeout)


def quiet_for(daemon: Daemon, seconds: float, timeout: float = 30) -> None:
    """Until the daemon has sent no WATCHDOG=1 for ``seconds`` in a row."""
    def quiet() -> bool:
        daemon.notifications.clear()
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            if any("WATCHDOG=1" in n.split("\n") for n in daemon.notifications):
                return False
            time.sleep(0.05)
        return True
    wait_until(quiet, timeout=timeout, what=f"{seconds} s without WATCHDOG=1")


def run_migration(breqd, tmp_path, *flags: str, size: int = 2 * MiB) -> Daemon:
    source = make_image(str(tmp_path / "src.img"), size, "random")
    track(breqd, "d", source)
    receiver = start_receiver(tmp_path, {"d": str(tmp_path / "tgt.img")})
    argv = bmigrate_argv("run", "d", "--source", source, "--to", receiver.url("d"),
                         "--secret-file", receiver.secret_file, "--control", breqd.control,
                         *flags)
    return Daemon(argv, str(tmp_path / "run.log"), env=WATCHDOG).start()


def test_bmig_nbd_pings_the_watchdog_while_it_serves(breqd, tmp_path):
    server = start_nbd(breqd, tmp_path, 4 * MiB)
    server.daemon.stop()
    daemon = Daemon(server.daemon.argv, str(tmp_path / "nbd-watchdog.log"),
                    env=WATCHDOG).start()
    try:
        pings(daemon)
    finally:
        assert daemon.stop() == 0


def test_bmigrate_run_pings_while_a_frame_waits_at_the_bandwidth_limit(breqd, tmp_path):
    """2 MiB at 1 KiB/s: the first frame waits half an hour, the pass is alive."""
    daemon = run_migration(breqd, tmp_path, "--bwlimit", "1K")
    try:
        client = breqd.client()
        wait_until(lambda: client.stats("d")["inflight_bytes"], timeout=30,
                   what="the pass to check chunks out")
        pings(daemon)
        stats = client.stats("d")
        assert stats["dirty_bytes"] + stats["inflight_bytes"] == 2 * MiB  # nothing went
        client.close()
    finally:
        assert daemon.stop() == 0


def test_bmigrate_run_pings_while_it_idles_longer_than_the_watchdog_interval(breqd,
                                                                            tmp_path):
    daemon = run_migration(breqd, tmp_path, "--interval", "60", size=MiB)
    try:
        client = breqd.client()
        wait_until(lambda: client.stats("d")["dirty_bytes"] == 0, timeout=60,
                   what="the first pass")
        client.close()
        started = time.monotonic()
        pings(daemon)
        assert time.monotonic() - started < 30      # within one idle wait of 60 s
    finally:
        assert daemon.stop() == 0


def test_bmigrate_run_stops_pinging_while_its_loop_is_stuck(breqd, tmp_path):
    """Idle, it pings; stuck on a breqd that does not answer, it does not (systemd would
    restart it); answered again, it pings again."""
    daemon = run_migration(breqd, tmp_path, "--interval", "0.1", size=MiB)
    try:
        client = breqd.client()
        wait_until(lambda: client.stats("d")["dirty_bytes"] == 0, timeout=60,
                   what="the first pass")
        client.close()
        pings(daemon)
        os.kill(breqd.daemon.pid, signal.SIGSTOP)
        try:
            quiet_for(daemon, 1.5)
        finally:
            os.kill(breqd.daemon.pid, signal.SIGCONT)
        pings(daemon)
    finally:
        assert daemon.stop() == 0
