"""A pass broken in the middle, then resumed: the target ends identical, and what is
sent again is bounded by the window (invariant 3: only durable chunks were committed).

Breaks: kill -9 of bmigrate, kill -9 of breceive, and a connection reset by a relay
between them. The sync runs with a bandwidth limit so that the break falls inside it.
"""

from __future__ import annotations

import json
import os
import subprocess

from tests.daemon import wait_until
from tests.integration.sync_helpers import (MiB, bmigrate_argv, make_image,  # noqa: F401
                                            receivers, same_bytes, start_receiver, sync,
                                            track)
from tests.relay import Relay

SIZE = 64 * MiB
WINDOW = 8 * MiB


def start_sync(breqd, tmp_path, url: str, secret: str, *extra: str) -> subprocess.Popen:
    source = str(tmp_path / "src.img")
    env = dict(os.environ, BMIG_CONTROL=breqd.control)
    return subprocess.Popen(
        bmigrate_argv("sync", "d", "--source", source, "--to", url, "--secret-file", secret,
                      "--window", str(WINDOW), "--level", "0", "--json", *extra),
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(proc: subprocess.Popen) -> tuple[int, str, str]:
    try:
        out, err = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate(timeout=30)
    return proc.returncode, out, err


def midway(breqd) -> dict:
    """Wait until a window or more is committed and two or more are still to go."""
    client = breqd.client()

    def halfway() -> dict | None:
        s = client.stats("d")
        done = SIZE - s["dirty_bytes"] - s["inflight_bytes"]
        return s if done >= WINDOW and s["dirty_bytes"] >= 2 * WINDOW else None

    return wait_until(halfway, timeout=60, what="the pass to be half way")


def resume_and_check(breqd, tmp_path, url: str, secret: str, before: dict) -> None:
    stats = breqd.client().stats("d")
    assert stats["inflight_bytes"] == 0                     # aborted by breqd
    resent_at_most = stats["dirty_bytes"] - before["dirty_bytes"]
    assert resent_at_most <= WINDOW, (stats, before)
    assert stats["dirty_bytes"] < SIZE                      # committed work was kept
    done = sync(breqd, "d", "--source", str(tmp_path / "src.img"), "--to", url,
                "--secret-file", secret, "--json")
    summary = json.loads(done.stdout.splitlines()[-1])
    assert summary["relation"] == "same"
    assert summary["bytes_committed"] == stats["dirty_bytes"]
    assert same_bytes(str(tmp_path / "src.img"), str(tmp_path / "tgt.img"))


def setup(breqd, tmp_path, receivers):
    source = make_image(str(tmp_path / "src.img"), SIZE, "random")
    track(breqd, "d", source)
    r = start_receiver(tmp_path, {"d": str(tmp_path / "tgt.img")})
    receivers.append(r)
    return r


def test_kill9_of_bmigrate_in_a_pass_then_resume(breqd, tmp_path, receivers):
    r = setup(breqd, tmp_path, receivers)
    proc = start_sync(breqd, tmp_path, r.url("d"), r.secret_file, "--bwlimit", "12M")
    try:
        before = midway(breqd)
        proc.kill()
    finally:
        finish(proc)
    wait_until(lambda: breqd.client().stats("d")["inflight_bytes"] == 0, timeout=30,
               what="breqd to abort the dead sender's checkouts")
    assert r.record("d")["state"] == "inconsistent"
    resume_and_check(breqd, tmp_path, r.url("d"), r.secret_file, before)
    assert r.record("d")["state"] == "consistent"


def test_kill9_of_breceive_in_a_pass_then_resume(breqd, tmp_path, receivers):
    r = setup(breqd, tmp_path, receivers)
    proc = start_sync(breqd, tmp_path, r.url("d"), r.secret_file, "--bwlimit", "12M")
    try:
        before = midway(breqd)
        r.daemon.kill9()
        code, out, err = finish(proc)
    finally:
        if proc.poll() is None:
            proc.kill()
            finish(proc)
    assert code == 4, err                                  # unreachable: the receiver died
    assert len([line for line in err.splitlines() if line.startswith("bmigrate:")]) == 1
    assert r.record("d")["state"] == "inconsistent"
    again = start_receiver(tmp_path, {"d": str(tmp_path / "tgt.img")})   # same state dir
    receivers.append(again)
    resume_and_check(breqd, tmp_path, again.url("d"), again.secret_file, before)


def test_a_connection_reset_in_a_pass_then_resume(breqd, tmp_path, receivers):
    r = setup(breqd, tmp_path, receivers)
    relay = Relay(("127.0.0.1", r.port)).start()
    try:
        relay.reset_after(20 * MiB)
        proc = start_sync(breqd, tmp_path, r.url("d", port=relay.port), r.secret_file)
        code, out, err = finish(proc)
        assert relay.resets >= 1
        assert code == 4, err
        assert "bmigrate: " in err and "Traceback" not in err
        before = breqd.client().stats("d")
        assert before["dirty_bytes"] < SIZE
        resume_and_check(breqd, tmp_path, r.url("d", port=relay.port), r.secret_file,
                         {"dirty_bytes": before["dirty_bytes"]})
    finally:
        relay.stop()
