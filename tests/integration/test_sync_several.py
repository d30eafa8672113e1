"""Several syncs at once against one breceive.

Two devices to two targets at the same time: both arrive identical. A second sync of a
device to the target a first sync is writing is refused by breceive (the target's lock:
busy, exit 5) without touching breqd's bitmap; the first goes on and the copy ends
identical. And the unsafe case breqd does not prevent: two syncs of one device to two
different targets at once split the dirty chunks between them.
"""

from __future__ import annotations

import json
import signal

import pytest

from tests.daemon import wait_until
from tests.integration.sync_helpers import (MiB, make_image, migrations,  # noqa: F401
                                            receivers, same_bytes, start_background,
                                            start_receiver, summary_of, sync, track)


def sync_args(name: str, source: str, url: str, secret: str, *extra: str) -> list[str]:
    return [name, "--source", source, "--to", url, "--secret-file", secret, "--json",
            *extra]


def process_state(pid: int) -> str:
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0]


def finished(m) -> dict:
    assert m.wait(timeout=60) == 0, m.stderr
    summary = m.events[-1]
    assert summary["event"] == "summary" and summary["converged"], m.events[-3:]
    return summary


def test_two_devices_to_two_targets_at_once(breqd, tmp_path, receivers, migrations):
    size = 24 * MiB
    sources = {"d1": make_image(str(tmp_path / "d1.img"), size, "random", seed=1),
               "d2": make_image(str(tmp_path / "d2.img"), size + 4321, "mixed", seed=2)}
    targets = {"t1": str(tmp_path / "t1.img"), "t2": str(tmp_path / "t2.img")}
    for name, path in sources.items():
        track(breqd, name, path)
    r = start_receiver(tmp_path, targets)
    receivers.append(r)
    # A limit, so that each pass lasts and the two overlap for sure.
    one = start_background(migrations, breqd, "sync",
                           *sync_args("d1", sources["d1"], r.url("t1"), r.secret_file,
                                      "--bwlimit", "12M", "--level", "0"))
    two = start_background(migrations, breqd, "sync",
                           *sync_args("d2", sources["d2"], r.url("t2"), r.secret_file,
                                      "--bwlimit", "12M", "--level", "0"))
    first, second = finished(one), finished(two)
    # They overlapped: each pass began before the other one ended.
    starts = [m.of("pass-start")[0]["time"] for m in (one, two)]
    ends = [m.of("pass")[0]["time"] for m in (one, two)]
    assert starts[0] < ends[1] and starts[1] < ends[0], (starts, ends)
    assert same_bytes(sources["d1"], targets["t1"])
    assert same_bytes(sources["d2"], targets["t2"])
    client = breqd.client()
    for device, export, summary in (("d1", "t1", first), ("d2", "t2", second)):
        assert summary["relation"] == "new" and summary["dirty_bytes"] == 0
        record = r.record(export)
        stats = client.stats(device)
        assert record["state"] == "consistent"
        assert record["source_device_id"] == stats["device_id"]
        assert record["generation"] == stats["generation"]
        assert stats["dirty_bytes"] == 0 and stats["inflight_bytes"] == 0


def test_a_second_sync_to_a_busy_target_is_refused(breqd, tmp_path, receivers, migrations):
    size = 32 * MiB
    source = make_image(str(tmp_path / "src.img"), size, "random")
    target = str(tmp_path / "tgt.img")
    track(breqd, "d", source)
    r = start_receiver(tmp_path, {"d": target})
    receivers.append(r)
    args = sync_args("d", source, r.url("d"), r.secret_file)
    first = start_background(migrations, breqd, "sync", *args, "--bwlimit", "8M",
                             "--level", "0", "--window", "8M")
    first.wait_event(lambda e: e["event"] == "progress" and e["bytes_done"] >= 4 * MiB,
                     timeout=30, what="the first sync to be in its pass")
    # Freeze the first sync in the middle of its pass: its session (and the target's
    # lock) stays open, and breqd's counters stay still while the second one tries.
    first.signal(signal.SIGSTOP)
    try:
        wait_until(lambda: process_state(first.proc.pid) == "T", timeout=10,
                   what="the first sync to be stopped")
        client = breqd.client()
        before = client.stats("d")
        assert before["inflight_bytes"] > 0
        second = sync(breqd, *args, check=False)
        after = client.stats("d")
    finally:
        first.signal(signal.SIGCONT)
    assert second.returncode == 17, second.stderr        # busy
    lines = second.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("bmigrate: receiver: "), second.stderr
    assert "is being written by another session" in lines[0]
    assert not second.stdout.strip() or all(
        json.loads(line)["event"] != "summary" for line in second.stdout.splitlines())
    # The refused sync changed nothing in breqd: no checkout, no set-all-dirty (a commit
    # of the first one's, sent just before it stopped, may still land: it only lowers).
    for key in ("dirty_bytes", "inflight_bytes"):
        assert after[key] <= before[key], (before, after)
    # The first one goes on as if nothing happened.
    summary = finished(first)
    assert summary["dirty_bytes"] == 0 and summary["bytes_committed"] == size
    assert same_bytes(source, target)
    assert r.record("d")["state"] == "consistent"
    last = summary_of(sync(breqd, *args, "--threshold", "0"))
    assert last["relation"] == "same" and last["converged"] and last["dirty_bytes"] == 0
    assert last["bytes_committed"] == 0                 # nothing was left over
    assert same_bytes(source, target)


def test_one_device_to_two_targets_at_once_gives_two_complete_copies(breqd, tmp_path,
                                                                     receivers, migrations):
    size = 32 * MiB
    source = make_image(str(tmp_path / "src.img"), size, "random")
    targets = {"a": str(tmp_path / "a.img"), "b": str(tmp_path / "b.img")}
    track(breqd, "d", source)
    r = start_receiver(tmp_path, targets)
    receivers.append(r)
    one = start_background(migrations, breqd, "sync",
                           *sync_args("d", source, r.url("a"), r.secret_file,
                                      "--bwlimit", "16M", "--level", "0", "--window", "8M"))
    one.wait_event(lambda e: e["event"] == "progress" and e["bytes_done"] >= 4 * MiB,
                   timeout=30, what="the first sync to be in its pass")
    two = start_background(migrations, breqd, "sync",
                           *sync_args("d", source, r.url("b"), r.secret_file,
                                      "--bwlimit", "16M", "--level", "0", "--window", "8M"))
    codes = (one.wait(timeout=60), two.wait(timeout=60))
    if codes == (0, 17):                 # safe: the second one refused as busy
        assert same_bytes(source, targets["a"])
        return
    # Otherwise safe only if each copy is complete once a last sync says it is identical.
    for export, path in targets.items():
        last = sync(breqd, "d", "--source", source, "--to", r.url(export),
                    "--secret-file", r.secret_file, "--threshold", "0", check=False)
        assert last.returncode == 0, (codes, export, last.stderr)
        assert same_bytes(source, path), (
            f"target {export} differs from the source after a sync that says the copy is "
            f"identical (codes {codes}): {last.stderr.strip()}")
