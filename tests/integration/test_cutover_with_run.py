"""bmigrate cutover beside a running bmigrate run (the catch-up service), with the real
daemons and no manual stop in between.

- The run is idle (caught up): the cutover claims the device's sender slot, the run
  gives it up (its session on the receiver first), the cutover hands over; the run then
  exits 0 by itself, its summary saying ``handed_over``.
- The run is in the middle of a pass: its next checkout is refused, it answers what is
  in flight and gives the device up; the cutover ships the rest and hands over.
- The cutover fails before the handover (a failing hook): the run ships again, and a
  write made afterwards reaches the target.
- The hooks' output never reaches stdout: with --json each line is a ``hook-output``
  event, without it the line goes to stderr; every event has a time; an error is an
  ``error`` event with the message and the exit status.
"""

from __future__ import annotations

import os
import random

from bmig.nbdclient import NbdClient
from tests.daemon import wait_until
from tests.integration.nbd_helpers import start_nbd
from tests.integration.sync_helpers import (CHUNK, MiB, bmigrate, json_lines,  # noqa: F401
                                            migrations, receivers, same_bytes,
                                            start_background, start_receiver)

INTERVAL = "0.1"
CUTOVER_TIMEOUT = 120


def start(breqd, tmp_path, receivers, size: int):
    server = start_nbd(breqd, tmp_path, size)
    with open(server.backing, "r+b") as f:
        f.write(random.Random(1).randbytes(size))
    target = str(tmp_path / "tgt.img")
    r = start_receiver(tmp_path, {"d1": target})
    receivers.append(r)
    return server, r, target


def start_run(migrations, breqd, server, r, *extra: str):
    return start_background(migrations, breqd, "run", "d1", "--source", server.backing,
                            "--to", r.url("d1"), "--secret-file", r.secret_file, "--json",
                            "--interval", INTERVAL, *extra)


def cutover(breqd, server, r, tmp_path, *extra: str, as_json: bool = True):
    done = bmigrate(breqd, "cutover", "d1", "--source", server.backing, "--to", r.url("d1"),
                    "--secret-file", r.secret_file, "--manage-dir", server.manage_dir,
                    "--record-dir", str(tmp_path / "records"), "--timeout", "60",
                    *extra, *(["--json"] if as_json else []), timeout=CUTOVER_TIMEOUT,
                    check=False)
    return done, json_lines(done.stdout) if as_json else []


def write_through(server, offset: int, data: bytes) -> None:
    with NbdClient.connect(server.uri, timeout=30) as client:
        client.pwrite(data, offset)
        client.flush()


def identical(source: str, target: str):
    return lambda: os.path.exists(target) and same_bytes(source, target)


def clean(breqd) -> bool:
    stats = breqd.client().stats("d1")
    return not (stats["dirty_bytes"] or stats["held_bytes"] or stats["inflight_bytes"])


def notes(m, state: str) -> list[dict]:
    return [e for e in m.of("note") if e.get("state") == state]


def test_a_cutover_takes_the_device_from_an_idle_run_which_then_exits_0(
        breqd, tmp_path, receivers, migrations):
    size = 4 * MiB
    server, r, target = start(breqd, tmp_path, receivers, size)
    try:
        m = start_run(migrations, breqd, server, r)
        wait_until(identical(server.backing, target), timeout=60,
                   what="the initial copy")
        write_through(server, 5 * CHUNK, b"\x5a" * CHUNK)
        # Idle: nothing dirty or held in breqd, so the run makes no checkout that a claim
        # could refuse; it must notice the claim in its look for work.
        wait_until(lambda: clean(breqd), timeout=30, what="breqd to be clean")
        done, events = cutover(breqd, server, r, tmp_path, "--pre-handover",
                               "echo stopping the application; echo on stderr >&2")
        assert done.returncode == 0, done.stderr
        assert events[-1]["event"] == "cutover" and events[-1]["handed_over"], events[-1]
        assert all(isinstance(e.get("time"), float) for e in events), events
        yielded = [e for e in events if e.get("yielded_by")]
        assert yielded and yielded[0]["yielded_by"].startswith("bmigrate run"), events
        hook = [(e["stream"], e["line"]) for e in events if e["event"] == "hook-output"]
        assert sorted(hook) == [("stderr", "on stderr"),          # two pipes: either
                                ("stdout", "stopping the application")], hook   # order
        # The run gave the device up, saw the handover, and ended by itself.
        assert m.wait(timeout=60) == 0, m.stderr
        assert notes(m, "paused") and notes(m, "handed-over"), m.events[-5:]
        assert not notes(m, "resumed")
        summary = m.events[-1]
        assert summary["event"] == "summary" and summary["handed_over"] is True, summary
        assert not m.errors(), m.stderr
        assert same_bytes(server.backing, target)
        assert r.record("d1")["role"] == "primary"
        assert breqd.client().stats("d1")["role"] == "handed-over"
    finally:
        server.daemon.stop()


def test_a_run_in_the_middle_of_a_pass_gives_the_device_up(breqd, tmp_path, receivers,
                                                          migrations):
    size = 32 * MiB
    server, r, target = start(breqd, tmp_path, receivers, size)
    try:
        # A slow run: its first pass takes about 8 s; the cutover comes 1 MiB into it.
        m = start_run(migrations, breqd, server, r, "--bwlimit", "4M", "--window", "4M",
                      "--level", "0")
        m.wait_event(lambda e: e["event"] == "progress" and e["bytes_done"] >= MiB,
                     timeout=30, what="the first pass to be under way")
        done, events = cutover(breqd, server, r, tmp_path)
        assert done.returncode == 0, done.stderr
        assert events[-1]["event"] == "cutover" and events[-1]["handed_over"], events[-1]
        assert m.wait(timeout=60) == 0, m.stderr
        summary = m.events[-1]
        assert summary["event"] == "summary" and summary["handed_over"] is True, summary
        assert summary["passes"] == 1 and 0 < summary["bytes_committed"] < size, summary
        assert not m.of("pass")                        # the pass was cut short
        paused = notes(m, "paused")
        assert paused and "bmigrate cutover" in paused[0]["message"], m.events[-5:]
        assert same_bytes(server.backing, target)
        stats = breqd.client().stats("d1")
        assert stats["inflight_bytes"] == 0 and stats["role"] == "handed-over"
    finally:
        server.daemon.stop()


def test_a_cutover_that_fails_gives_the_device_back_to_the_run(breqd, tmp_path, receivers,
                                                              migrations):
    size = 4 * MiB
    server, r, target = start(breqd, tmp_path, receivers, size)
    try:
        m = start_run(migrations, breqd, server, r)
        wait_until(identical(server.backing, target), timeout=60,
                   what="the initial copy")
        done, events = cutover(breqd, server, r, tmp_path, "--pre-handover",
                               "echo cannot stop it; exit 3", as_json=False)
        assert done.returncode == 12, done.stderr
        assert "cannot stop it" not in done.stdout               # hooks never on stdout
        assert "d1: pre-handover: cannot stop it" in done.stderr
        m.wait_event(lambda e: e.get("state") == "resumed", timeout=30,
                     what="the run to ship again")
        assert m.proc.poll() is None
        write_through(server, 7 * CHUNK, b"\xa5" * CHUNK)
        wait_until(identical(server.backing, target), timeout=60,
                   what="the run to ship a write made after the failed cutover")
        assert breqd.client().stats("d1")["role"] == "primary"
        assert m.stop() == 0, m.stderr
        assert m.events[-1]["event"] == "summary" and not m.events[-1]["handed_over"]
    finally:
        server.daemon.stop()


def test_a_failed_cutover_with_json_says_so_in_an_error_event(breqd, tmp_path, receivers):
    size = 1 * MiB
    server, r, target = start(breqd, tmp_path, receivers, size)
    try:
        done, events = cutover(breqd, server, r, tmp_path, "--pre-handover",
                               "echo one; echo two; exit 4")
        assert done.returncode == 12, done.stderr
        hook = [e["line"] for e in events if e["event"] == "hook-output"]
        assert hook == ["one", "two"], events
        error = events[-1]
        assert error["event"] == "error" and error["exit_code"] == 12, error
        assert "exit status 4" in error["message"] and isinstance(error["time"], float)
        lines = [line for line in done.stderr.splitlines() if line.startswith("bmigrate: ")]
        assert len(lines) == 1 and "exit status 4" in lines[0], done.stderr
    finally:
        server.daemon.stop()


def test_a_paused_run_tells_systemd_why_and_keeps_its_watchdog_fed(breqd, tmp_path,
                                                                   receivers):
    """Under systemd (a notify socket, WatchdogSec=2) the paused run says why it ships
    nothing (STATUS=) and keeps sending WATCHDOG=1 while the cutover has the device."""
    import sys

    from tests.daemon import Daemon

    server, r, target = start(breqd, tmp_path, receivers, 1 * MiB)
    run = Daemon([sys.executable, "-c", "from bmig.cli.main import main; main()", "run",
                  "d1", "--source", server.backing, "--to", r.url("d1"), "--secret-file",
                  r.secret_file, "--interval", INTERVAL, "--control", breqd.control],
                 str(tmp_path / "run.log"), env={"WATCHDOG_USEC": "2000000"}).start()
    try:
        wait_until(identical(server.backing, target), timeout=60, what="the initial copy")
        wait_until(lambda: clean(breqd), timeout=30, what="breqd to be clean")
        # A hook that waits long enough for a few looks of the paused run.
        done, events = cutover(breqd, server, r, tmp_path, "--pre-handover", "sleep 3")
        assert done.returncode == 0, done.stderr
        run.proc.wait(timeout=30)                    # it ends by itself after the handover
        assert run.stop() == 0, run.log()
        notes = run.notifications
        paused = [i for i, n in enumerate(notes) if n.startswith("STATUS=d1: bmigrate "
                                                                 "cutover")]
        assert paused and "paused until it is done" in notes[paused[0]], "\n".join(notes)
        during = notes[paused[0]:]
        assert sum("WATCHDOG=1" in n.split("\n") for n in during) >= 2, during
    finally:
        server.daemon.stop()
