"""Invariants 3 and 5 on the sync path, with the bad interleavings forced, not hoped for.

3. Commit after durable: a pass against a target that acknowledges only when the test
   says so. Nothing is committed in breqd before the target says "durable"; what it says
   is durable is committed, a frame it refuses goes back to dirty, a lost target gives
   everything unacknowledged back.
5. Durable means durable: a receiver session in this process, over a socket pair, with
   fdatasync observed: DURABLE leaves only after fdatasync has returned for everything
   written before the FLUSH, and the target record says "inconsistent" on disk before
   the first byte of a pass is written.
"""

from __future__ import annotations

import os
import socket
import threading

import pytest

from bmig.errors import TargetError, UnreachableError
from bmig.lineage import load_target
from bmig.receiver import sessionrecord as session_module
from bmig.receiver import target as target_module
from bmig.receiver.policy import Policy, TargetConfig
from bmig.receiver.session import Session
from bmig.sender.lockedtracker import LockedTracker
from bmig.sender.pacing import RateLimit
from bmig.sender.passes import Pass, PassSettings
from bmig.sender.source import Source
from bmig.tracker.blocking_client import TrackerClient
from bmig.wire import codec, handshake
from bmig.wire.client import SourceInfo
from bmig.wire.channel import Channel
from bmig.wire.protocol import Message, T, decode_json, pack_data, pack_seq, type_of
from bmig.wire.transports import SocketStream
from tests.daemon import wait_until
from tests.integration.sync_helpers import HeldTarget

MiB = 1 << 20
CHUNK = 64 << 10


@pytest.fixture
def device(breqd, tmp_path):
    path = tmp_path / "src.img"
    path.write_bytes(os.urandom(4 * MiB))
    client = breqd.client()
    client.add_device("d", 4 * MiB)           # new: every chunk dirty
    stats = client.stats("d")
    client.close()
    info = SourceInfo("d", int(stats["device_id"], 16), int(stats["generation"], 16),
                      4 * MiB, CHUNK)
    return str(path), info


def start_pass(breqd, device, target, frame_size=MiB, window=4 * MiB, stop=None):
    path, info = device
    tracker = LockedTracker(TrackerClient(breqd.control))
    settings = PassSettings(window=window, frame_size=frame_size, level=None)
    the_pass = Pass(1, tracker, Source(path, info.size), target, info, settings, RateLimit(),
                    stop=stop)
    result: dict = {}
    thread = threading.Thread(target=lambda: result.update(r=the_pass.run(info.size)))
    thread.start()
    return thread, result, tracker


def test_nothing_is_committed_before_the_target_says_durable(breqd, device):
    target = HeldTarget()
    thread, result, tracker = start_pass(breqd, device, target)
    watcher = breqd.client()
    wait_until(lambda: target.flushes and len(target.frames) == 4, timeout=30,
               what="every frame sent and a FLUSH asked for")
    stats = watcher.stats("d")
    assert stats["dirty_bytes"] + stats["inflight_bytes"] == 4 * MiB   # nothing committed
    target.acks.durable(2)                            # frames 1 and 2: the first 2 MiB
    wait_until(lambda: watcher.stats("d")["inflight_bytes"] == 2 * MiB, timeout=30,
               what="the durable half to be committed")
    assert watcher.stats("d")["dirty_bytes"] == 0
    target.acks.failed(3, TargetError("refused by the test"))
    target.acks.durable(4)
    thread.join(timeout=30)
    assert not thread.is_alive()
    assert result["r"].failed_frames == 1 and result["r"].bytes_committed == 3 * MiB
    stats = watcher.stats("d")
    # The refused frame's chunks are dirty again; the others are clean.
    assert stats["inflight_bytes"] == 0 and stats["dirty_bytes"] == MiB
    runs, _ = watcher.query("d", 0, 4 * MiB)
    assert runs == [(2 * MiB, MiB)]
    tracker.client.close()


def test_a_target_lost_before_durable_gives_everything_back(breqd, device):
    target = HeldTarget()
    thread, result, tracker = start_pass(breqd, device, target)
    wait_until(lambda: target.flushes, timeout=30, what="a FLUSH")
    target.acks.fatal(UnreachableError("the test cut the line"))
    thread.join(timeout=30)
    assert isinstance(result["r"].error, UnreachableError)
    stats = breqd.client().stats("d")
    assert stats["inflight_bytes"] == 0 and stats["dirty_bytes"] == 4 * MiB
    tracker.client.close()


def test_a_stop_once_all_is_sent_still_completes_the_pass(breqd, device):
    """The stop arrives after the last chunk was checked out and sent: the pass waits
    for "durable" and ends complete, so the target is marked consistent."""
    target, stop = HeldTarget(), threading.Event()
    thread, result, tracker = start_pass(breqd, device, target, stop=stop)
    wait_until(lambda: target.flushes and len(target.frames) == 4, timeout=30,
               what="every frame sent and a FLUSH asked for")
    stop.set()
    target.acks.durable(4)
    thread.join(timeout=30)
    assert not thread.is_alive()
    assert target.ended == [True] and result["r"].bytes_committed == 4 * MiB
    assert breqd.client().stats("d")["dirty_bytes"] == 0
    tracker.client.close()


def test_a_stop_that_cuts_a_pass_short_leaves_it_incomplete(breqd, device):
    """Stopped while dirty chunks were still to be checked out: what was sent and made
    durable is committed, the rest stays dirty, and the pass does not end complete."""
    target, stop = HeldTarget(), threading.Event()
    thread, result, tracker = start_pass(breqd, device, target, window=MiB, stop=stop)
    wait_until(lambda: target.flushes and len(target.frames) == 1, timeout=30,
               what="the first window sent")
    stop.set()
    target.acks.durable(1)
    thread.join(timeout=30)
    assert not thread.is_alive()
    assert target.ended == [False] and result["r"].bytes_committed == MiB
    stats = breqd.client().stats("d")
    assert stats["inflight_bytes"] == 0 and stats["dirty_bytes"] == 3 * MiB
    tracker.client.close()


# -- invariant 5: the receiver ----------------------------------------------------------------

SECRET = b"an in-process secret, 32 bytes!!"


def test_durable_is_sent_only_after_fdatasync_returned(tmp_path, monkeypatch):
    events: list[str] = []
    real_fdatasync = os.fdatasync
    fsync_gate = threading.Event()

    def observed_fdatasync(fd):
        events.append("fdatasync-start")
        fsync_gate.wait(30)              # the test decides when the disk is done
        real_fdatasync(fd)
        events.append("fdatasync-done")

    real_write = target_module.TargetDevice.write
    real_save = session_module.save_target
    real_send_seq = Session.send_seq

    def observed_write(self, offset, data):
        events.append(f"write {offset}")
        real_write(self, offset, data)

    def observed_save(state_dir, record):
        real_save(state_dir, record)
        events.append(f"record {load_target(state_dir, record.export).state}")

    def observed_send_seq(self, kind, seq):
        if kind == T.DURABLE:
            events.append("DURABLE sent")
        real_send_seq(self, kind, seq)

    monkeypatch.setattr(target_module.os, "fdatasync", observed_fdatasync)
    monkeypatch.setattr(target_module.TargetDevice, "write", observed_write)
    monkeypatch.setattr(session_module, "save_target", observed_save)
    monkeypatch.setattr(Session, "send_seq", observed_send_seq)

    a, b = socket.socketpair()
    policy = Policy({"t": TargetConfig("t", str(tmp_path / "t.img"))}, str(tmp_path), SECRET)
    receiver = Session(Channel(SocketStream(a, "sender")), policy, False, "test")
    server = threading.Thread(target=receiver.run)
    server.start()
    sender = Channel(SocketStream(b, "receiver"))
    try:
        handshake.sender(sender, SECRET, receiver_verified=False)
        sender.send(Message(T.OPEN, {"export": "t", "device_id": "00000000000000aa",
                                     "generation": "00000000000000bb",
                                     "size": MiB}).encode())
        assert decode_json(sender.read()).type == T.OPENED
        sender.send(Message(T.PASS_BEGIN, {}).encode())
        data = os.urandom(4096)
        for seq in (1, 2):
            sender.send(pack_data(codec.RAW, 0, 4096, seq, seq * 4096, codec.checksum(data)),
                        data)
        sender.send(pack_seq(T.FLUSH, 2))
        wait_until(lambda: "fdatasync-start" in events, timeout=30, what="fdatasync")
        assert "DURABLE sent" not in events      # fdatasync is held at the gate
        fsync_gate.set()
        body = sender.read()
        assert type_of(body) == T.DURABLE
    finally:
        fsync_gate.set()
        sender.close()
        server.join(timeout=30)
    assert events.index("record inconsistent") < events.index("write 4096")
    # Recorded by the receiver's own threads as it goes: no waiting to see that nothing
    # comes, the order says it.
    assert events.index("write 8192") < events.index("fdatasync-start") \
        < events.index("fdatasync-done") < events.index("DURABLE sent")
