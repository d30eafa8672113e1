"""A man in the middle on tcp://: every frame after the handshake is sealed, so a frame
altered, dropped, replayed or reordered on the way ends the session with a clear error
(exit 7), nothing is committed that is not on the target, and the next sync, on a clean
path, finishes the copy.

The relay (tests/relay.py, TamperingRelay) sits between a real bmigrate and a real
breceive on 127.0.0.1 and acts once, on one frame.
"""

from __future__ import annotations

import socket
import threading

import pytest

from tests.integration.sync_helpers import (CHUNK, MiB, make_image, receivers,  # noqa: F401
                                            same_bytes, start_receiver, sync, track)
from tests.integration.wire_helpers import assert_clean_chunks_are_on_the_target
from tests.relay import TamperingRelay

SIZE = 24 * MiB
EXIT_PROTOCOL = 7


def nth_large_frame(n: int):
    """Pick the n-th frame above 64 KiB (a DATA frame, sealed or not)."""
    seen = [0]

    def pick(index: int, length: int) -> bool:
        if index < 2 or length <= 64 * 1024:
            return False
        seen[0] += 1
        return seen[0] == n

    return pick


def first_after_open(index: int, length: int) -> bool:
    """Downstream: 0 HELLO, 1 AUTH_OK, 2 OPENED, then the acknowledgements."""
    return index >= 3


@pytest.mark.parametrize("action,direction,pick", [
    ("flip", "up", nth_large_frame(3)),        # the offset of a DATA frame, in the clear
    ("drop", "up", nth_large_frame(3)),
    ("replay", "up", nth_large_frame(3)),
    ("reorder", "up", nth_large_frame(3)),
    ("replay", "down", first_after_open),       # a DURABLE, twice
    ("flip", "down", first_after_open),         # the seq of a DURABLE, in the clear
], ids=["flip-data", "drop-data", "replay-data", "reorder-data", "replay-durable",
        "flip-durable"])
def test_a_tampered_frame_ends_the_session_and_nothing_unwritten_is_committed(
        breqd, tmp_path, receivers, action, direction, pick):
    source = make_image(str(tmp_path / "src.img"), SIZE, "random")
    target = str(tmp_path / "tgt.img")
    track(breqd, "d", source)
    r = start_receiver(tmp_path, {"d": target})
    receivers.append(r)
    relay = TamperingRelay(("127.0.0.1", r.port), action, direction, pick=pick,
                           flip_at=18 if direction == "up" else 10).start()
    try:
        done = sync(breqd, "d", "--source", source, "--to", r.url("d", port=relay.port),
                    "--secret-file", r.secret_file, "--window", "8M", "--level", "0",
                    check=False, timeout=120)
    finally:
        relay.stop()
    assert relay.acted.is_set()
    dirty = assert_clean_chunks_are_on_the_target(breqd, "d", source, target, CHUNK)
    assert done.returncode == EXIT_PROTOCOL, done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("bmigrate: ")]
    assert len(errors) == 1 and "failed its integrity check" in errors[0], done.stderr
    assert "Traceback" not in done.stderr
    assert dirty, "the session ended before the end, so something is still dirty"
    log = open(r.daemon.log_path).read()
    assert "Traceback" not in log and "internal error" not in log
    # The same receiver, on a clean path, takes the rest.
    sync(breqd, "d", "--source", source, "--to", r.url("d"), "--secret-file", r.secret_file,
         "--threshold", "0")
    assert same_bytes(source, target)


def test_the_receivers_reason_wins_over_the_broken_pipe_it_leaves(monkeypatch):
    """A receiver that finds a bad frame sends its ERROR and closes without reading the
    rest: the sender's next send breaks, and what the sender reports is the receiver's
    reason (exit 7), not the broken pipe (exit 4), even when the reader thread is slow
    to pass the ERROR on."""
    from bmig.errors import IntegrityError
    from bmig.wire import client as targets
    from bmig.wire.client import WireTarget
    from bmig.wire.options import ConnectOptions
    from bmig.wire.urls import parse_target_url
    from bmig.wire import handshake
    from bmig.wire.channel import Channel
    from bmig.wire.protocol import Message, T
    from bmig.wire.transports import SocketStream

    monkeypatch.setattr(targets, "REASON_WAIT", 1.0)
    ours, theirs = socket.socketpair()
    listening = threading.Event()

    def receiver() -> None:
        channel = Channel(SocketStream(theirs, "sender"))
        handshake.receiver(channel, None, True, "test", [])
        listening.wait(30)                       # until the sender hears acknowledgements
        channel.send(Message(T.ERROR, {"code": "integrity", "message": "frame 3 ...",
                                       "fatal": True}).encode())
        theirs.close()                           # with unread data

    class SlowAcks:
        released = threading.Event()

        def durable(self, seq): pass
        def failed(self, seq, error): pass

        def fatal(self, error):
            self.released.wait(30)               # the reader is slow to pass it on

    thread = threading.Thread(target=receiver)
    thread.start()
    url = parse_target_url("tcp://127.0.0.1:1/d")
    target = WireTarget(SocketStream(ours, str(url)), url, ConnectOptions(), True)
    acks = SlowAcks()
    target.set_acks(acks)
    listening.set()
    thread.join(timeout=30)
    payload = bytes(1 << 20)
    with pytest.raises(IntegrityError, match="frame 3"):
        for seq in range(1, 1000):
            target.send_data(seq, seq << 20, 0, payload, len(payload), 0)
    acks.released.set()
    target.close()
