"""Sealed frames (bmig.wire.seal through bmig.wire.channel): keys, round trips of every
size, and the frames a man in the middle could change, drop, replay or reorder, each
refused with the frame's number before any of its body is handed on. Also what a
channel costs before its peer has authenticated."""

from __future__ import annotations

import os
import socket
import struct
import threading

import pytest

from bmig.errors import FrameTooLarge, IntegrityError
from bmig.limits import MAX_FRAME, MAX_PREAUTH_FRAME, PREAUTH_BUFFER
from bmig.wire.channel import SEAL_IN_ONE, SEAL_PIECE, Channel
from bmig.wire.seal import TAG_BYTES, derive_keys, transcript
from bmig.wire.transports import SocketStream

SECRET = b"s" * 32
CHALLENGE, NONCE = os.urandom(32), os.urandom(32)
HELLOS = transcript(b"hello from the sender", b"hello from the receiver")
KEYS = derive_keys(SECRET, CHALLENGE, NONCE, HELLOS)


def sealed_pair() -> tuple[Channel, Channel]:
    """(sender, receiver) over a socket pair, authenticated and sealed."""
    a, b = socket.socketpair()
    sender, receiver = Channel(SocketStream(a, "receiver")), Channel(SocketStream(b, "sender"))
    sender.authenticated((KEYS.sender_to_receiver, KEYS.receiver_to_sender))
    receiver.authenticated((KEYS.receiver_to_sender, KEYS.sender_to_receiver))
    return sender, receiver


def wire_frames(frames: list[tuple[bytes, bytes | None]]) -> list[bytes]:
    """The sealed frames, exactly as the sender puts them on the wire."""
    a, b = socket.socketpair()
    sender = Channel(SocketStream(a, "receiver"))
    sender.authenticated((KEYS.sender_to_receiver, KEYS.receiver_to_sender))
    out: list[bytes] = []

    def collect() -> None:
        with b.makefile("rb") as f:
            while head := f.read(4):
                (n,) = struct.unpack("<I", head)
                out.append(head + f.read(n))

    reader = threading.Thread(target=collect)
    reader.start()
    for head, payload in frames:
        sender.send(head, payload)
    sender.close()
    reader.join(timeout=30)
    b.close()
    return out


def receive(raw: list[bytes]) -> tuple[list[bytes], Exception | None]:
    """What a sealed receiving channel makes of ``raw`` frames: the bodies it handed
    on, and the error it stopped with."""
    a, b = socket.socketpair()
    receiver = Channel(SocketStream(b, "sender"))
    receiver.authenticated((KEYS.receiver_to_sender, KEYS.sender_to_receiver))
    def write() -> None:
        try:
            a.sendall(b"".join(raw))
        except OSError:              # the receiver stopped reading: that is the test
            pass
        a.close()

    writer = threading.Thread(target=write)
    writer.start()
    bodies: list[bytes] = []
    error: Exception | None = None
    try:
        for _ in raw:
            bodies.append(bytes(receiver.read()))
    except Exception as exc:         # noqa: BLE001 - the test looks at which
        error = exc
    receiver.close()
    writer.join(timeout=30)
    return bodies, error


# -- keys ----------------------------------------------------------------------------------

def test_keys_differ_per_direction_and_per_session_and_depend_on_the_hellos():
    assert KEYS.sender_to_receiver != KEYS.receiver_to_sender
    assert derive_keys(SECRET, CHALLENGE, NONCE, HELLOS) == KEYS
    others = [derive_keys(SECRET, os.urandom(32), NONCE, HELLOS),
              derive_keys(SECRET, CHALLENGE, os.urandom(32), HELLOS),
              derive_keys(b"t" * 32, CHALLENGE, NONCE, HELLOS),
              derive_keys(SECRET, CHALLENGE, NONCE, transcript(b"x", b"y"))]
    seen = {KEYS.sender_to_receiver, KEYS.receiver_to_sender}
    for keys in others:
        assert not {keys.sender_to_receiver, keys.receiver_to_sender} & seen
    assert transcript(b"ab", b"c") != transcript(b"a", b"bc")


# -- round trips -------------------------------------------------------------------------

@pytest.mark.parametrize("head_size,payload_size", [
    (1, 0), (32, 1), (32, SEAL_IN_ONE - 32), (32, SEAL_IN_ONE - 31), (32, SEAL_PIECE),
    (32, 3 * SEAL_PIECE + 17), (32, MAX_FRAME - 32), (512 * 1024, 0),
])
def test_sealed_frames_of_every_size_cross_in_both_directions(head_size, payload_size):
    sender, receiver = sealed_pair()
    head = os.urandom(head_size)
    payload = os.urandom(payload_size) if payload_size else None
    frames = [(head, payload), (b"\x0d" + bytes(15), None), (head, payload)]
    thread = threading.Thread(target=lambda: [sender.send(h, p) for h, p in frames])
    thread.start()
    for h, p in frames:
        assert bytes(receiver.read()) == h + (p or b"")
    thread.join(timeout=30)
    receiver.send(b"back")                         # the other direction, its own key
    assert bytes(sender.read()) == b"back"
    assert sender.bytes_out == receiver.bytes_in
    sender.close()
    receiver.close()


def test_a_sealed_frame_hides_its_body():
    secret_data = b"the disk's contents " * 100
    raw = wire_frames([(b"\x09" + bytes(31), secret_data)])
    assert secret_data[:20] not in raw[0]
    assert len(raw[0]) == 4 + 32 + len(secret_data) + TAG_BYTES


# -- what a man in the middle can try ------------------------------------------------------

FRAMES = [(bytes([9]) + bytes(31), os.urandom(size))
          for size in (100, 600 * 1024, 3000, 2 * 1024 * 1024, 50)]


def bodies_of(frames) -> list[bytes]:
    return [h + (p or b"") for h, p in frames]


def test_untouched_frames_all_arrive():
    bodies, error = receive(wire_frames(FRAMES))
    assert error is None and bodies == bodies_of(FRAMES)


@pytest.mark.parametrize("index", [0, 1, 3, 4])
@pytest.mark.parametrize("where", ["length", "body", "tag"])
def test_a_changed_byte_is_refused_with_the_frames_number(index, where):
    raw = wire_frames(FRAMES)
    frame = bytearray(raw[index])
    at = {"length": 0, "body": 4 + len(frame) // 3, "tag": len(frame) - 1}[where]
    frame[at] ^= 0x01
    raw[index] = bytes(frame)
    bodies, error = receive(raw)
    assert bodies == bodies_of(FRAMES)[:index]
    assert isinstance(error, (IntegrityError, FrameTooLarge)) or where == "length", error
    if where != "length":
        assert f"frame {index} " in str(error) and "integrity" in str(error)


def test_a_dropped_frame_is_refused_at_the_next():
    raw = wire_frames(FRAMES)
    bodies, error = receive(raw[:2] + raw[3:])
    assert bodies == bodies_of(FRAMES)[:2]
    assert isinstance(error, IntegrityError) and "frame 2 " in str(error)


def test_a_replayed_frame_is_refused():
    raw = wire_frames(FRAMES)
    bodies, error = receive(raw[:2] + [raw[1]] + raw[2:])
    assert bodies == bodies_of(FRAMES)[:2]
    assert isinstance(error, IntegrityError) and "frame 2 " in str(error)


def test_reordered_frames_are_refused():
    raw = wire_frames(FRAMES)
    bodies, error = receive([raw[0], raw[2], raw[1]] + raw[3:])
    assert bodies == bodies_of(FRAMES)[:1]
    assert isinstance(error, IntegrityError)


def test_a_frame_sealed_for_the_other_direction_is_refused():
    a, b = socket.socketpair()
    reflected = Channel(SocketStream(a, "x"))
    reflected.authenticated((KEYS.receiver_to_sender, KEYS.sender_to_receiver))
    reflected.send(b"\x0d" + bytes(15))
    reflected.close()
    raw = b.recv(1024)
    b.close()
    bodies, error = receive([raw])
    assert bodies == [] and isinstance(error, IntegrityError)


def test_a_sealed_length_above_the_cap_is_refused_before_the_body_is_read():
    bodies, error = receive([struct.pack("<I", MAX_FRAME + TAG_BYTES + 1)])
    assert isinstance(error, FrameTooLarge)
    bodies, error = receive([struct.pack("<I", 3) + b"abc"])    # shorter than a tag
    assert isinstance(error, IntegrityError)


# -- before authentication ------------------------------------------------------------------

def test_a_channel_costs_a_few_kib_until_its_peer_authenticates():
    a, b = socket.socketpair()
    channel = Channel(SocketStream(a, "stranger"))
    assert len(channel._buf) == PREAUTH_BUFFER < 10 * 1024
    assert channel._body_view is None and channel._out_view is None
    b.sendall(struct.pack("<I", MAX_PREAUTH_FRAME + 1))
    with pytest.raises(FrameTooLarge):
        channel.read()
    channel.close()
    b.close()


def test_authentication_keeps_what_was_already_buffered():
    left, right = socket.socketpair()
    sender, receiver = Channel(SocketStream(left, "a")), Channel(SocketStream(right, "b"))
    sender.send(b"first")
    sender.send(b"x" * 100000)             # read ahead with the first, before the raise
    assert bytes(receiver.read()) == b"first"
    with pytest.raises(FrameTooLarge):
        receiver.read()
    left.close()
    right.close()
    left, right = socket.socketpair()
    sender, receiver = Channel(SocketStream(left, "a")), Channel(SocketStream(right, "b"))
    sender.send(b"first")
    sender.send(b"second")
    assert bytes(receiver.read()) == b"first"
    receiver.authenticated()
    assert bytes(receiver.read()) == b"second"
    left.close()
    right.close()


# -- several frames in one write, and without waiting --------------------------------------

@pytest.mark.parametrize("sealed", [True, False])
def test_frames_sent_together_or_without_waiting_arrive_whole_and_in_order(sealed):
    """send_many, then try_send_many of more than the socket holds: it never waits, and
    what it leaves, sent by send_rest, arrives after what it sent and before the next
    frame; a whole frame is buffered (has_frame) only once all of it arrived."""
    a, b = socket.socketpair()
    sender, receiver = Channel(SocketStream(a, "receiver")), Channel(SocketStream(b, "sender"))
    if sealed:
        sender.authenticated((KEYS.sender_to_receiver, KEYS.receiver_to_sender))
        receiver.authenticated((KEYS.receiver_to_sender, KEYS.sender_to_receiver))
    else:
        sender.authenticated()
        receiver.authenticated()
    bodies = [struct.pack("<I", i) + os.urandom(4096) for i in range(600)]
    sender.send_many([(body[:4], body[4:]) for body in bodies[:3]])
    assert not receiver.has_frame()                   # nothing read yet
    rest = sender.try_send_many([(body[:4], body[4:]) for body in bodies[3:599]])
    assert rest, "a socket pair holds less than 2 MiB: something is left"
    sending = threading.Thread(target=lambda: (sender.send_rest(rest),
                                               sender.send(bodies[599])))
    sending.start()
    got = [bytes(receiver.read()) for _ in bodies]
    sending.join(10)
    assert got == bodies
    a.close()
    b.close()
