"""A killed sender's frames never land after the next session's.

breceive writes a sender's frames in the session's own thread, in order; the target's
lock is let go only when that session has read and written all it was sent and synced,
so a sender that reconnects after a kill -9 (its frames still in breceive's socket
buffer) waits for the old session to finish before its OPEN is answered. Were the lock
released earlier, an older copy of a chunk could land after the newer one that the next
session shipped and breqd then marked clean: a silent difference.

The test runs two sessions in-process over socket pairs and records, in order, every
write to the target and every take and release of the lock: each of the first session's
writes comes before its release, which comes before the second session's take.
"""

from __future__ import annotations

import os
import socket
import threading

from bmig.receiver import session as session_module
from bmig.receiver import target as target_module
from bmig.receiver.policy import Policy, TargetConfig
from bmig.receiver.session import Session
from bmig.wire import codec, handshake
from bmig.wire.channel import Channel
from bmig.wire.protocol import Message, T, decode_json, pack_data, pack_seq, unpack_seq
from bmig.wire.transports import SocketStream

MiB = 1 << 20
SECRET = b"an in-process secret, 32 bytes!!"
FRAMES = 48


def open_session(policy: Policy, name: str) -> tuple[Channel, threading.Thread]:
    a, b = socket.socketpair()
    receiver = Session(Channel(SocketStream(a, "sender")), policy, False, name)
    thread = threading.Thread(target=receiver.run, name=name, daemon=True)
    thread.start()
    sender = Channel(SocketStream(b, "receiver"))
    handshake.sender(sender, SECRET, receiver_verified=False)
    sender.send(Message(T.OPEN, {"export": "t", "device_id": "00000000000000aa",
                                 "generation": "00000000000000bb", "size": 4 * MiB}).encode())
    return sender, thread


def data(seq: int, payload: bytes) -> tuple[bytes, bytes]:
    return pack_data(codec.RAW, 0, len(payload), seq, 0, codec.checksum(payload)), payload


def test_a_killed_senders_frames_are_all_written_before_the_next_session_opens(
        tmp_path, monkeypatch):
    events: list[str] = []
    lock = threading.Lock()

    def log(what: str) -> None:
        with lock:
            events.append(f"{threading.current_thread().name}: {what}")

    real_write, real_acquire, real_release = (target_module.TargetDevice.write,
                                              target_module.TargetLock.acquire,
                                              target_module.TargetLock.release)

    def write(self, offset, payload):
        real_write(self, offset, payload)
        log(f"write {bytes(payload[:1])!r}")

    def acquire(self, *args, **kw):
        real_acquire(self, *args, **kw)
        if not self.kind:
            log("take")

    def release(self):
        if not self.kind and self._fd is not None:
            log("release")
        real_release(self)

    monkeypatch.setattr(target_module.TargetDevice, "write", write)
    monkeypatch.setattr(target_module.TargetLock, "acquire", acquire)
    monkeypatch.setattr(target_module.TargetLock, "release", release)
    target = str(tmp_path / "t.img")
    with open(target, "wb") as f:
        f.truncate(4 * MiB)
    policy = Policy({"t": TargetConfig("t", target)}, str(tmp_path), SECRET)

    first, first_thread = open_session(policy, "first")
    assert decode_json(first.read()).type == T.OPENED
    first.send(Message(T.PASS_BEGIN, {}).encode())
    old = b"A" * MiB
    for seq in range(1, FRAMES + 1):             # more than the socket buffers hold
        first.send(*data(seq, old))
    first.close()                                # killed: no FLUSH, no BYE

    second, second_thread = open_session(policy, "second")
    assert decode_json(second.read()).type == T.OPENED
    second.send(Message(T.PASS_BEGIN, {}).encode())
    new = b"B" * MiB
    second.send(*data(1, new))
    second.send(pack_seq(T.FLUSH, 1))
    durable = second.read()
    assert unpack_seq(durable) == 1
    second.send(Message(T.BYE, {}).encode())
    second_thread.join(timeout=30)
    first_thread.join(timeout=30)
    assert not first_thread.is_alive() and not second_thread.is_alive()

    firsts = [i for i, e in enumerate(events) if e.startswith("first: write")]
    released = events.index("first: release")
    taken = events.index("second: take")
    assert firsts and max(firsts) < released < taken, events
    with open(target, "rb") as f:
        assert f.read(MiB) == new                # the newer copy stays
    assert os.path.getsize(target) == 4 * MiB
