"""Synchronous replication from bmig-nbd (bmigrate replicate), against a real breceive.

- Protocols A, B and C: writes through the NBD export land on the target; chunks written
  while replicating are clean in breqd once durable there; the target equals the source,
  also when several NBD connections (multi-conn) write the same blocks at once.
- Invariant 6, with the bad interleaving forced: a resync reads a chunk, the application
  then writes it (forwarded to the target), and the resync's older copy lands after the
  newer one. The chunk is dirty again, and the next pass makes the target right.
- breceive killed (kill -9) in protocol C: with policy degrade the writes go on and every
  acknowledged write is on the source and dirty (so the next sync ships it); with policy
  block they fail with EIO.
"""

from __future__ import annotations

import json
import os
import subprocess

import pytest

from bmig.nbdclient import NbdClient, NbdError
from bmig.sender.lockedtracker import LockedTracker
from bmig.sender.source import Source
from bmig.tracker.blocking_client import TrackerClient
from bmig.wire import codec, handshake
from bmig.wire.protocol import Message, T, decode_json, pack_data, pack_seq, type_of
from tests.certs import make_certificates
from tests.daemon import wait_until
from tests.integration.nbd_helpers import require, start_nbd
from tests.integration.sync_helpers import (CHUNK, MiB, bmigrate, receivers,  # noqa: F401
                                            same_bytes, start_receiver, sync)

SIZE = 16 * MiB


@pytest.fixture
def setup(breqd, tmp_path, receivers):
    server = start_nbd(breqd, tmp_path, SIZE)
    with open(server.backing, "r+b") as f:
        f.write(os.urandom(SIZE))
    target = str(tmp_path / "tgt.img")
    r = start_receiver(tmp_path, {"d1": target})
    receivers.append(r)
    sync(breqd, "d1", "--source", server.backing, "--to", r.url("d1"), "--secret-file",
         r.secret_file, "--threshold", "0")
    yield server, r, target
    server.daemon.stop()


def replicate(breqd, server, r, *extra: str) -> dict:
    done = bmigrate(breqd, "replicate", "d1", "--to", r.url("d1"), "--secret-file",
                    r.secret_file, "--manage-dir", server.manage_dir, "--json", *extra)
    return json.loads(done.stdout)


def stats(breqd) -> dict:
    return breqd.client().stats("d1")


def settled(breqd) -> bool:
    s = stats(breqd)
    return s["held_bytes"] == 0 and s["mirrored_bytes"] == 0


@pytest.mark.parametrize("protocol", ["A", "B", "C"])
def test_writes_while_replicating_land_on_the_target_and_stay_clean(breqd, setup, protocol):
    server, r, target = setup
    status = replicate(breqd, server, r, "--protocol", protocol)
    assert status["replicating"] and status["protocol"] == protocol
    with NbdClient.connect(server.uri) as client:
        for i in range(40):
            client.pwrite(os.urandom(4096 + 512 * i), (i * 97 % 200) * CHUNK + 100)
        client.zero(5 * MiB, 3 * CHUNK)
        client.trim(9 * MiB, CHUNK)
        client.pwrite(b"fua" * 1000, 3 * CHUNK, fua=True)
        client.flush()
    wait_until(lambda: settled(breqd), timeout=30, what="the holds to settle")
    assert stats(breqd)["dirty_bytes"] == 0          # nothing left for a sync to ship
    assert same_bytes(server.backing, target)
    assert not replicate_stop(breqd, server)["replicating"]


def test_replication_over_tls_is_acknowledged_by_the_reader_thread(breqd, tmp_path,
                                                                   receivers):
    """tls:// keeps the reader thread (a TLS socket cannot be read on the event loop, as
    tcp:// is): protocol C over it, with writes, a FUA and a flush."""
    certs = make_certificates(str(tmp_path / "certs"))
    server = start_nbd(breqd, tmp_path, SIZE)
    target = str(tmp_path / "tgt.img")
    r = start_receiver(tmp_path, {"d1": target}, "--tls-cert", certs.server_cert,
                       "--tls-key", certs.server_key)
    receivers.append(r)
    tls = ("--to", r.url("d1", "tls"), "--tls-ca", certs.ca, "--secret-file", r.secret_file)
    try:
        sync(breqd, "d1", "--source", server.backing, *tls, "--threshold", "0")
        done = bmigrate(breqd, "replicate", "d1", *tls, "--manage-dir", server.manage_dir,
                        "--json", "--protocol", "C")
        assert json.loads(done.stdout)["replicating"]
        with NbdClient.connect(server.uri) as client:
            for i in range(30):
                client.pwrite(os.urandom(4096), (i * 37 % 200) * CHUNK)
            client.pwrite(b"fua" * 1000, 3 * CHUNK, fua=True)
            client.flush()
        wait_until(lambda: settled(breqd), timeout=30, what="the holds to settle")
        assert stats(breqd)["dirty_bytes"] == 0
        assert same_bytes(server.backing, target)
        assert not replicate_stop(breqd, server)["replicating"]
    finally:
        server.daemon.stop()


def test_several_connections_writing_the_same_blocks_leave_the_target_equal(breqd, setup,
                                                                          tmp_path):
    """bmig-nbd offers NBD_FLAG_CAN_MULTI_CONN, so a client that uses it (the kernel's
    nbd-client -C, libnbd's tools) opens several connections to one export. Four fio
    jobs, one connection each, write fresh random data at random over the same 1 MiB at
    once (writes of one frame, 4-128 KiB: many land on a block another connection writes
    in the same loop turn); then a flush. Every chunk ends clean and the target equals
    the source: the writes reached both sides in one order."""
    require("fio")
    server, r, target = setup
    replicate(breqd, server, r, "--protocol", "C")
    done = subprocess.run(
        ["fio", "--name=multi", "--ioengine=nbd", f"--uri={server.uri}", "--numjobs=4",
         "--thread", "--rw=randwrite", "--bsrange=4k-128k", "--iodepth=8", "--offset=1M",
         "--size=1M", "--io_size=6M", "--norandommap", "--randseed=42", "--refill_buffers",
         "--end_fsync=1", "--group_reporting", "--output-format=json",
         f"--output={tmp_path / 'fio.json'}"],
        capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    text = (tmp_path / "fio.json").read_text()
    report = json.loads(text[text.index("{"):])
    assert report["jobs"][0]["write"]["io_bytes"] >= 4 * 6 * MiB
    wait_until(lambda: settled(breqd), timeout=30, what="the holds to settle")
    assert stats(breqd)["dirty_bytes"] == 0
    assert same_bytes(server.backing, target)
    assert not replicate_stop(breqd, server)["replicating"]


def replicate_stop(breqd, server) -> dict:
    return json.loads(bmigrate(breqd, "replicate", "d1", "--stop", "--manage-dir",
                               server.manage_dir, "--json").stdout)


def test_an_older_resync_copy_landing_after_a_newer_write_is_shipped_again(breqd, setup):
    """Invariant 6, forced: resync reads X, the application writes X (replicated),
    then the resync's older copy of X lands on the target."""
    server, r, target = setup
    replicate(breqd, server, r)
    x = 7 * CHUNK
    tracker = LockedTracker(TrackerClient(breqd.control))
    tracker.client.mark("d1", [(x, 1)])                          # X waits for resync
    assert tracker.checkout("d1", CHUNK) == [(x, CHUNK)]          # ... and is in flight
    old = bytearray(CHUNK)
    Source(server.backing, SIZE).read_into(memoryview(old), x)   # the resync read it
    new = os.urandom(CHUNK)
    with NbdClient.connect(server.uri) as client:                 # the application writes
        client.pwrite(new, x)
        client.flush()
    with open(target, "rb") as f:
        f.seek(x)
        assert f.read(CHUNK) == new                               # replicated at once
    stale_pass(r, x, bytes(old))                                  # the old copy lands
    with open(target, "rb") as f:
        f.seek(x)
        assert f.read(CHUNK) == bytes(old)                        # the bad state exists
    tracker.commit("d1", [(x, CHUNK)])                            # the resync commits it
    wait_until(lambda: stats(breqd)["held_bytes"] == 0, timeout=30, what="holds to go")
    assert stats(breqd)["dirty_bytes"] == CHUNK                   # ... but X stays dirty
    tracker.client.close()
    sync(breqd, "d1", "--source", server.backing, "--to", r.url("d1"), "--secret-file",
         r.secret_file, "--threshold", "0")
    assert same_bytes(server.backing, target)


def stale_pass(r, offset: int, data: bytes) -> None:
    """A pass session that writes ``data`` at ``offset``: the resync's delayed frame."""
    import socket

    from bmig.wire.channel import Channel
    from bmig.wire.transports import SocketStream

    with open(r.secret_file, "rb") as f:
        secret = f.read().strip()
    channel = Channel(SocketStream(socket.create_connection(("127.0.0.1", r.port),
                                                            timeout=30), "receiver"))
    try:
        handshake.sender(channel, secret, receiver_verified=False)
        record = r.record("d1")
        channel.send(Message(T.OPEN, {"export": "d1",
                                      "device_id": record["source_device_id"],
                                      "generation": record["generation"],
                                      "size": SIZE}).encode())
        assert decode_json(channel.read()).type == T.OPENED
        channel.send(Message(T.PASS_BEGIN, {}).encode())
        channel.send(pack_data(codec.RAW, 0, len(data), 1, offset, codec.checksum(data)), data)
        channel.send(pack_seq(T.FLUSH, 1))
        assert type_of(channel.read()) == T.DURABLE
        channel.send(Message(T.PASS_END, {}).encode())
        assert decode_json(channel.read()).type == T.PASS_DONE
    finally:
        channel.close()


@pytest.mark.parametrize("policy", ["degrade", "block"])
def test_breceive_killed_in_protocol_c(breqd, setup, receivers, tmp_path, policy):
    server, r, target = setup
    replicate(breqd, server, r, "--policy", policy)
    acknowledged: dict[int, bytes] = {}
    with NbdClient.connect(server.uri) as client:
        for i in range(10):
            data = os.urandom(4096)
            client.pwrite(data, i * CHUNK)
            acknowledged[i * CHUNK] = data
        r.daemon.kill9()
        failures = 0
        for i in range(10, 30):
            data = os.urandom(4096)
            try:
                client.pwrite(data, i * CHUNK)
            except NbdError as exc:
                assert exc.errno_name == "EIO"
                failures += 1
            else:
                acknowledged[i * CHUNK] = data
        if policy == "degrade":
            assert failures <= 1            # the write that met the failure, at most
        else:
            assert failures >= 19
    status = json.loads(bmigrate(breqd, "replicate", "d1", "--status", "--manage-dir",
                                 server.manage_dir, "--json").stdout)
    assert not status["replicating"] and status["failed"]
    assert status["blocked"] == (policy == "block")
    with open(server.backing, "rb") as f:           # nothing acknowledged is missing
        for offset, data in acknowledged.items():
            f.seek(offset)
            assert f.read(len(data)) == data
    wait_until(lambda: stats(breqd)["held_bytes"] == 0, timeout=30, what="holds to go")
    # Everything written since the failure is dirty: after recovery a sync fixes it.
    again = start_receiver(tmp_path, {"d1": target})       # the same state directory
    receivers.append(again)
    replicate_stop(breqd, server)
    sync(breqd, "d1", "--source", server.backing, "--to", again.url("d1"), "--secret-file",
         again.secret_file, "--threshold", "0")
    assert same_bytes(server.backing, target)


# -- a target that refuses writes (no space): nothing it refused is ever called clean --------

def chunks_of_runs(runs) -> set[int]:
    return {c for o, n in runs for c in range(o // CHUNK, (o + n - 1) // CHUNK + 1)}


def fill(directory: str) -> str:
    """Take every free byte of the file system of ``directory``."""
    path = os.path.join(directory, "filler")
    block = b"\xff" * (64 << 10)
    with open(path, "wb") as f:
        try:
            while True:
                f.write(block)
                f.flush()
        except OSError as exc:
            assert exc.errno == 28, exc                   # ENOSPC
    return path


@pytest.fixture
def full_target(mounts, breqd, tmp_path, receivers):
    """bmig-nbd on a 16 MiB device whose chunks 0-7 hold data and the rest are holes, and
    its copy on a small tmpfs, synced: the target's holes are holes too. The test fills
    the tmpfs with ``fill``: from then on every write into a hole of the target fails
    with ENOSPC, while writes over its data chunks still succeed."""
    small = mounts.tmpfs(str(tmp_path / "small"), "8m")
    server = start_nbd(breqd, tmp_path, SIZE)
    with open(server.backing, "r+b") as f:
        f.write(os.urandom(8 * CHUNK))
    target = os.path.join(small, "tgt.img")
    with open(target, "wb") as f:     # sparse, larger than its file system: breceive
        f.truncate(SIZE)              # would not grow a file that far itself
    r = start_receiver(tmp_path, {"d1": target})
    receivers.append(r)
    sync(breqd, "d1", "--source", server.backing, "--to", r.url("d1"), "--secret-file",
         r.secret_file, "--threshold", "0")
    yield server, r, target, small
    server.daemon.stop()


@pytest.mark.parametrize("protocol", ["A", "B", "C"])
def test_a_write_the_target_refuses_for_lack_of_space_stays_dirty(breqd, full_target,
                                                                  protocol):
    """Invariant 11 under protocols A, B and C: the application writes a chunk that is a
    hole on the full target (refused: ENOSPC) and chunks that are not; the refused one
    must stay dirty in breqd (never marked clean by the DURABLE of a later FLUSH), every
    chunk breqd calls clean must equal the source, and the failure is in the status."""
    server, r, target, small = full_target
    replicate(breqd, server, r, "--protocol", protocol)
    filler = fill(small)
    hole = 100 * CHUNK
    with NbdClient.connect(server.uri) as client:
        client.pwrite(os.urandom(4096), hole)        # the local write succeeds: degrade
        for c in (1, 2, 3):
            client.pwrite(os.urandom(4096), c * CHUNK)
        client.flush()
    wait_until(lambda: stats(breqd)["held_bytes"] == 0, timeout=30, what="holds to go")
    runs, _ = breqd.client().query("d1", 0, SIZE)
    dirty = chunks_of_runs(runs)
    assert hole // CHUNK in dirty, f"the refused write's chunk is clean: {sorted(dirty)}"
    with open(server.backing, "rb") as a, open(target, "rb") as b:
        for c in range(SIZE // CHUNK):
            if c not in dirty:
                a.seek(c * CHUNK)
                b.seek(c * CHUNK)
                assert a.read(CHUNK) == b.read(CHUNK), f"chunk {c} is clean but differs"
    status = json.loads(bmigrate(breqd, "replicate", "d1", "--status", "--manage-dir",
                                 server.manage_dir, "--json").stdout)
    assert not status["replicating"], status
    assert "No space left on device" in status["failed"], status
    shown = json.loads(bmigrate(breqd, "status", "d1", "--manage-dir", server.manage_dir,
                                "--json").stdout)
    assert shown["nbd"]["failed"] == status["failed"] and shown["dirty_bytes"] >= CHUNK
    os.unlink(filler)                                  # room again: a sync makes it right
    sync(breqd, "d1", "--source", server.backing, "--to", r.url("d1"), "--secret-file",
         r.secret_file, "--threshold", "0")
    assert same_bytes(server.backing, target)
