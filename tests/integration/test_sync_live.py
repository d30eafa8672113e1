"""Sync while an application writes through bmig-nbd, then a last pass once it stops.

The writer is our NBD client on the export; every write is marked in breqd by bmig-nbd.
With writes slower than shipping, sync converges; after the writer stops, a last sync
with --threshold 0 leaves a byte-identical target. With writes faster than a limited
sync can ship, sync says it is not converging and exits 10.
"""

from __future__ import annotations

import json
import random

from bmig.nbdclient import NbdClient
from tests.integration.nbd_helpers import Writer, start_nbd
from tests.integration.sync_helpers import (MiB, receivers, same_bytes,  # noqa: F401
                                            start_receiver, sync)

SIZE = 64 * MiB


def test_sync_under_live_writes_then_a_last_pass_is_identical(breqd, tmp_path, receivers):
    server = start_nbd(breqd, tmp_path, SIZE)
    target = str(tmp_path / "tgt.img")
    r = start_receiver(tmp_path, {"d1": target})
    receivers.append(r)
    with open(server.backing, "r+b") as f:          # some data to begin with
        f.write(random.Random(1).randbytes(16 * MiB))
    writer = Writer(server.uri, per_second=400, size=SIZE)
    writer.start()
    args = ["d1", "--source", server.backing, "--to", r.url("d1"), "--secret-file",
            r.secret_file, "--json"]
    try:
        live = sync(breqd, *args, ok=(15,))          # converged, not identical
        summary = json.loads(live.stdout.splitlines()[-1])
        assert summary["converged"] and summary["writer_active"]
        assert not summary["identical"]
        assert writer.writes > 0 and writer.is_alive()
    finally:
        writer.finish()
    last = json.loads(sync(breqd, *args, "--threshold", "0").stdout.splitlines()[-1])
    assert last["converged"] and last["identical"] and last["dirty_bytes"] == 0
    assert server.daemon.stop() == 0                  # flushed, and nothing more comes
    assert same_bytes(server.backing, target)
    assert r.record("d1")["state"] == "consistent"


def test_writes_faster_than_shipping_are_reported_as_not_converging(breqd, tmp_path,
                                                                    receivers):
    small = 8 * MiB                                   # a pass takes about 4 s at 2 MB/s
    server = start_nbd(breqd, tmp_path, small)
    r = start_receiver(tmp_path, {"d1": str(tmp_path / "tgt.img")})
    receivers.append(r)
    writer = Writer(server.uri, per_second=2000, size=small)   # ~8 MB/s of 4 KiB writes
    writer.start()
    try:
        done = sync(breqd, "d1", "--source", server.backing, "--to", r.url("d1"),
                    "--secret-file", r.secret_file, "--bwlimit", "2M", "--threshold", "0",
                    "--window", "4M", check=False)
    finally:
        writer.finish()
        server.daemon.stop()
    assert done.returncode == 10, done.stderr
    message = [line for line in done.stderr.splitlines() if line.startswith("bmigrate:")]
    assert len(message) == 1 and "not converging: writes at" in message[0]
    assert "protocol C" in message[0]


def test_a_last_pass_ships_what_a_writer_just_wrote_once(breqd, tmp_path, receivers):
    """Right after its last write bmig-nbd still holds the chunks (until they have been
    idle for its hold time, and a sweep), and a held chunk stays dirty through a commit:
    the pass waits for the holds to go instead of shipping the same chunks again and
    again while they are held."""
    server = start_nbd(breqd, tmp_path, SIZE)
    try:
        target = str(tmp_path / "tgt.img")
        r = start_receiver(tmp_path, {"d1": target})
        receivers.append(r)
        args = ["d1", "--source", server.backing, "--to", r.url("d1"), "--secret-file",
                r.secret_file, "--threshold", "0", "--json"]
        sync(breqd, *args)                                # the first copy
        chunk = 64 << 10
        written = [3, 100, 517, SIZE // chunk - 1]
        with NbdClient.connect(server.uri, timeout=60) as client:
            for c in written:
                client.pwrite(b"written just before the last pass", c * chunk + 10)
            client.flush()
        last = json.loads(sync(breqd, *args).stdout.splitlines()[-1])
        assert last["converged"] and last["dirty_bytes"] == 0
        # One pass, each chunk once (holes in the sparse backing file are not read).
        assert last["passes"] == 1 and 0 < last["bytes_read"] <= len(written) * chunk
    finally:
        assert server.daemon.stop() == 0
    assert same_bytes(server.backing, target)


def test_with_nobody_writing_sync_ends_only_when_nothing_is_dirty(breqd, tmp_path, receivers):
    """The writer stopped just before the sync: bmig-nbd still holds what it wrote (for
    its idle time), and a held chunk stays dirty through a commit. Less than the
    threshold (a second of shipping) is left after the first pass, but nobody writes: the sync waits for the
    holds to go and ships the rest, so it ends identical (exit 0), not "converged with
    N still dirty"."""
    server = start_nbd(breqd, tmp_path, SIZE)
    try:
        target = str(tmp_path / "tgt.img")
        r = start_receiver(tmp_path, {"d1": target})
        receivers.append(r)
        args = ["d1", "--source", server.backing, "--to", r.url("d1"), "--secret-file",
                r.secret_file, "--json"]
        sync(breqd, *args)                                # the first copy
        rng = random.Random(5)
        with NbdClient.connect(server.uri, timeout=60) as client:
            for c in range(0, SIZE // (64 << 10), 3):     # a third of the chunks, whole
                client.pwrite(rng.randbytes(64 << 10), c * (64 << 10))
            client.flush()
        # ... and chunks dirty for an earlier reason (nobody holds them), so the first
        # pass starts at once instead of waiting for the holds to go.
        breqd.client().mark("d1", [(1 << 20, 4 << 20)])
        done = sync(breqd, *args)
        last = json.loads(done.stdout.splitlines()[-1])
        assert last["dirty_bytes"] == 0, last
        assert last["identical"] and not last["writer_active"], last
        stats = breqd.client().stats("d1")
        assert stats["dirty_bytes"] == 0 and stats["held_bytes"] == 0
    finally:
        assert server.daemon.stop() == 0
    assert same_bytes(server.backing, target)
