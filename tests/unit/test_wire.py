"""The wire protocol's pieces one by one: codecs, the bounded decoder, authentication,
target URLs, and frames over a stream."""

from __future__ import annotations

import os
import select
import socket
import threading

import pytest
import zstandard

from bmig.errors import ConfigError, FrameTooLarge, ProtocolError
from bmig.framing import ConnectionClosed
from bmig.wire import auth, codec
from bmig.wire.channel import Channel
from bmig.wire.protocol import (MAX_DATA, MAX_JSON, Message, T, decode_json, pack_data,
                                pack_hashes, pack_seq, pack_zero, unpack_data, unpack_hashes,
                                type_of, unpack_seq, unpack_zero)
from bmig.wire.seal import transcript
from bmig.wire.transports import SocketStream
from bmig.wire.urls import parse_target_url

# -- codecs ------------------------------------------------------------------------------


def test_compressible_data_goes_zstd_and_comes_back():
    data = b"the same line again and again\n" * 10000
    kind, payload = codec.encode(data, 1)
    assert kind == codec.ZSTD and len(payload) < len(data) // 10
    assert bytes(codec.decode(kind, memoryview(payload), len(data))) == data


def test_incompressible_data_goes_raw_after_a_sample():
    data = os.urandom(1 << 20)
    kind, payload = codec.encode(memoryview(data), 1)
    assert kind == codec.RAW and payload is not None and len(payload) == len(data)
    assert codec.encode(data, None)[0] == codec.RAW


def test_a_zstd_payload_that_states_another_size_is_refused_before_decoding():
    bomb = zstandard.ZstdCompressor().compress(bytes(64 << 20))
    with pytest.raises(ProtocolError, match="states"):
        codec.decode(codec.ZSTD, memoryview(bomb), 4096)


@pytest.mark.parametrize("kind,payload,length,match", [
    (codec.ZSTD, b"not zstd at all", 100, "decompress"),
    (codec.RAW, b"abc", 4, "raw payload"),
    (7, b"abcd", 4, "unknown codec"),
])
def test_bad_payloads_are_protocol_errors(kind, payload, length, match):
    with pytest.raises(ProtocolError, match=match):
        codec.decode(kind, memoryview(payload), length)


def test_a_zstd_frame_without_a_size_is_capped_at_the_raw_length():
    c = zstandard.ZstdCompressor(write_content_size=False)
    payload = c.compress(bytes(1 << 20))
    with pytest.raises(ProtocolError):
        codec.decode(codec.ZSTD, memoryview(payload), 4096)
    assert len(codec.decode(codec.ZSTD, memoryview(payload), 1 << 20)) == 1 << 20


def test_zero_detection():
    assert codec.is_zero(bytes(5 << 20))
    data = bytearray(5 << 20)
    data[-1] = 1
    assert not codec.is_zero(data)
    assert not codec.is_zero(b"\x00\x01")


# -- messages ----------------------------------------------------------------------------


def test_json_messages_round_trip_and_unknown_fields_are_kept_for_the_reader():
    body = Message(T.OPEN, {"export": "vm1", "size": 5, "future": [1, 2]}).encode()
    msg = decode_json(memoryview(body))
    assert msg.type == T.OPEN and msg.str("export") == "vm1" and msg.int("size") == 5


@pytest.mark.parametrize("body,match", [
    (b"", "empty"),
    (bytes([99]), "unknown message type"),
    (bytes([T.DATA, 0, 0, 0]), "not a JSON message"),
    (bytes([T.OPEN, 0, 0, 0]) + b"{bad", "not valid JSON"),
    (bytes([T.OPEN, 0, 0, 0]) + b"[1]", "JSON object"),
    (bytes([T.OPEN, 0, 0, 0]) + b"[" * 50000, "nested|JSON"),
    (bytes([T.OPEN, 0, 0, 0]) + b" " * (MAX_JSON + 1), "too large"),
    (bytes([T.STATUS, 0, 0, 0]) + b'{"lag_seconds": NaN}', "not valid JSON.*NaN"),
    (bytes([T.STATUS, 0, 0, 0]) + b'{"lag_seconds": Infinity}', "not valid JSON.*Infinity"),
    (bytes([T.STATUS, 0, 0, 0]) + b'{"a": [-Infinity]}', "not valid JSON.*Infinity"),
    (bytes([T.STATUS, 0, 0, 0]) + b'{"size_x_bytes": 1e999}', "not valid JSON.*finite"),
    (bytes([T.STATUS, 0, 0, 0]) + b'{"size_x_bytes": -1E+400}', "not valid JSON.*finite"),
])
def test_the_decoder_refuses_malformed_messages(body, match):
    with pytest.raises(ProtocolError, match=match):
        decode_json(memoryview(body))


def test_every_byte_is_a_known_type_or_a_protocol_error():
    known = {t.value for t in T}
    for byte in range(256):
        for body in (memoryview(bytes([byte, 0, 0, 0])), bytes([byte])):
            if byte in known:
                kind = type_of(body)
                assert kind is T(byte) and isinstance(kind, T)
            else:
                with pytest.raises(ProtocolError, match=f"unknown message type {byte}$"):
                    type_of(body)
    with pytest.raises(ProtocolError, match="empty message"):
        type_of(memoryview(b""))


@pytest.mark.parametrize("fields,getter", [
    ({"size": "5"}, lambda m: m.int("size")),
    ({"size": True}, lambda m: m.int("size")),
    ({"size": -1}, lambda m: m.int("size")),
    ({"export": 3}, lambda m: m.str("export")),
    ({"discard": "yes"}, lambda m: m.bool("discard")),
])
def test_fields_of_the_wrong_type_are_protocol_errors(fields, getter):
    with pytest.raises(ProtocolError):
        getter(decode_json(memoryview(Message(T.OPEN, fields).encode())))


def test_binary_layouts_round_trip():
    head, payload = unpack_data(memoryview(pack_data(1, 0, 4, 9, 4096, 77) + b"abcd"))
    assert (head.codec, head.raw_length, head.seq, head.offset, head.checksum) == \
        (1, 4, 9, 4096, 77) and bytes(payload) == b"abcd"
    assert unpack_zero(memoryview(pack_zero(3, 8192, 100))) == (3, 8192, 100, 0)
    assert unpack_seq(memoryview(pack_seq(T.DURABLE, 12))) == 12
    assert unpack_hashes(memoryview(pack_hashes(65536, [1, 2, 3]))) == (65536, [1, 2, 3])


@pytest.mark.parametrize("body,unpack", [
    (pack_data(0, 0, 0, 1, 0, 0), unpack_data),                 # raw length 0
    (pack_data(0, 0, MAX_DATA + 1, 1, 0, 0), unpack_data),      # above the cap
    (pack_data(0, 0, 1, 1, 0, 0)[:20], unpack_data),             # short header
    (pack_zero(1, 0, 0), unpack_zero),                           # empty range
    (pack_zero(1, 0, 5) + b"x", unpack_zero),                    # trailing bytes
    (pack_seq(T.FLUSH, 1)[:10], unpack_seq),
    (pack_hashes(0, [1, 2])[:-8], unpack_hashes),                # count says 2, holds 1
])
def test_binary_messages_are_checked_before_use(body, unpack):
    with pytest.raises(ProtocolError):
        unpack(memoryview(body))


# -- authentication ------------------------------------------------------------------------


def test_proofs_bind_both_nonces_the_direction_and_the_hellos():
    secret, a, b = b"s" * 32, auth.new_nonce(), auth.new_nonce()
    hellos = transcript(b"sender hello", b"receiver hello")
    proof = auth.client_proof(secret, a, b, hellos)
    assert auth.matches(proof, auth.client_proof(secret, a, b, hellos))
    assert not auth.matches(proof, auth.client_proof(secret, b, a, hellos))
    assert not auth.matches(proof, auth.server_proof(secret, a, b, hellos))
    assert not auth.matches(proof, auth.client_proof(b"t" * 32, a, b, hellos))
    assert not auth.matches(proof, auth.client_proof(
        secret, a, b, transcript(b"sender hello", b"receiver hellO")))
    assert not auth.matches(proof, 123)
    assert auth.valid_nonce(a) and not auth.valid_nonce("xyz") and not auth.valid_nonce(None)


@pytest.mark.parametrize("given", [None, 123, 1.5, [], {}, "", "zz" * 32, "AB" * 32,
                                   "\ud800" * 64, "é" * 64, "ab" * 31, "ab" * 33])
def test_a_malformed_proof_is_a_mismatch_not_an_exception(given):
    expected = auth.client_proof(b"s" * 32, auth.new_nonce(), auth.new_nonce(), b"")
    assert not auth.matches(expected, given)


def test_the_secret_file_must_be_private_regular_and_long_enough(tmp_path):
    path = tmp_path / "secret"
    path.write_text("sixteen-bytes-or-more-here\n")
    os.chmod(path, 0o644)
    with pytest.raises(ConfigError, match="chmod 600"):
        auth.load_secret(str(path))
    os.chmod(path, 0o600)
    assert auth.load_secret(str(path)) == b"sixteen-bytes-or-more-here"
    path.write_text("short")
    with pytest.raises(ConfigError, match="fewer than 16"):
        auth.load_secret(str(path))
    with pytest.raises(ConfigError, match="not a regular file"):
        auth.load_secret(str(tmp_path))
    with pytest.raises(ConfigError, match="secret file .*missing: no such file"):
        auth.load_secret(str(tmp_path / "missing"))


# -- target URLs ---------------------------------------------------------------------------


@pytest.mark.parametrize("text,kind,host,port,user,export", [
    ("tcp://backup:10810/vm1", "tcp", "backup", 10810, None, "vm1"),
    ("tls://10.0.0.2/vm1", "tls", "10.0.0.2", 10810, None, "vm1"),
    ("ssh://root@backup/vm1", "ssh", "backup", 22, "root", "vm1"),
    ("ssh://backup:2222/vm%201", "ssh", "backup", 2222, None, "vm 1"),
    ("tcp://[::1]:7/x", "tcp", "::1", 7, None, "x"),
])
def test_target_urls(text, kind, host, port, user, export):
    url = parse_target_url(text)
    assert (url.kind, url.host, url.port, url.user, url.export) == (kind, host, port, user,
                                                                   export)


def test_nbd_urls_are_kept_whole():
    url = parse_target_url("nbd+unix:///vm1?socket=/run/x.sock")
    assert url.kind == "nbd" and url.nbd_uri == "nbd+unix:///vm1?socket=/run/x.sock"


@pytest.mark.parametrize("text", ["backup:/vm1", "ftp://x/y", "tcp://backup:10810",
                                  "tcp://backup:10810/a/b", "tcp://:10810/x",
                                  "tcp://backup:99999/x", "tcp://u@backup/x",
                                  "tcp://backup/x?y=1"])
def test_bad_target_urls_are_one_line_config_errors(text):
    with pytest.raises(ConfigError) as exc:
        parse_target_url(text)
    assert "\n" not in exc.value.message


# -- frames over a stream ------------------------------------------------------------------


def channel_pair(authenticated: bool = True) -> tuple[Channel, Channel]:
    a, b = socket.socketpair()
    left, right = Channel(SocketStream(a, "a")), Channel(SocketStream(b, "b"))
    if authenticated:
        left.authenticated()
        right.authenticated()
    return left, right


def test_frames_cross_a_stream_in_order_with_payloads_unjoined():
    left, right = channel_pair()
    payload = os.urandom(3 << 20)
    sender = threading.Thread(target=lambda: [left.send(b"head%d" % i, payload)
                                              for i in range(3)])
    sender.start()
    for i in range(3):
        body = right.read()
        assert bytes(body[:5]) == b"head%d" % i and bytes(body[5:]) == payload
    sender.join()
    left.close()
    with pytest.raises(ConnectionClosed):
        right.read()
    right.close()


def test_a_length_above_the_cap_is_refused_before_the_body_is_read():
    left, right = channel_pair()
    left.stream.sock.sendall((5000).to_bytes(4, "little"))
    with pytest.raises(FrameTooLarge):
        right.read(cap=4096)
    left.close()
    right.close()


def test_a_stream_that_ends_inside_a_frame_is_a_protocol_error():
    left, right = channel_pair()
    left.stream.sock.sendall((100).to_bytes(4, "little") + b"x" * 10)
    left.close()
    with pytest.raises(ProtocolError, match="inside a frame"):
        right.read()
    right.close()


def test_a_socket_made_non_blocking_under_the_stream_still_sends_everything(monkeypatch):
    """An event loop that watches the socket may make its descriptor non-blocking (libuv
    does): a send that finds the socket full waits for room all the same, and nothing
    is lost or sent twice. Nothing is read until the sender has found it full."""
    waiting = threading.Event()
    real_poll = select.poll

    class Poll:
        def __init__(self):
            self._poll = real_poll()
            self.register = self._poll.register

        def poll(self, *timeout):
            waiting.set()
            return self._poll.poll(*timeout)

    monkeypatch.setattr(select, "poll", Poll)
    left, right = channel_pair()
    os.set_blocking(left.stream.sock.fileno(), False)
    payload = os.urandom(3 << 20)                   # far more than the socket holds
    sender = threading.Thread(target=lambda: [left.send(b"h%d" % i, payload)
                                              for i in range(2)])
    sender.start()
    assert waiting.wait(10), "the send never waited for room"
    right.stream.sock.settimeout(10)
    for i in range(2):
        body = right.read()
        assert bytes(body[:2]) == b"h%d" % i and bytes(body[2:]) == payload
    sender.join(10)
    assert not sender.is_alive()
    left.close()
    right.close()


def test_a_reader_that_may_not_wait_takes_frames_whole_however_the_bytes_come():
    """fill_nowait and buffered (an event loop's reader): a frame is handed on only
    once whole, whether its bytes come a few at a time or with the next frame's."""
    left, right = channel_pair()
    assert right.fill_nowait() is False            # nothing there: no wait, no error
    frames = [b"first", b"second frame", b"3"]
    wire = b"".join(len(f).to_bytes(4, "little") + f for f in frames)
    got: list[bytes] = []
    for cut in (3, 4, 5, 11, 20):                  # inside a length, at its end, inside a body
        left.stream.sock.sendall(wire[:cut])
        assert right.fill_nowait() is True
        while (body := right.buffered()) is not None:
            got.append(bytes(body))
        left.stream.sock.sendall(wire[cut:])
        assert right.fill_nowait() is True
        while (body := right.buffered()) is not None:
            got.append(bytes(body))
        assert got == frames, cut
        got.clear()
    left.close()
    with pytest.raises(ConnectionClosed):
        right.fill_nowait()
    right.close()


def test_a_reader_that_may_not_wait_refuses_a_large_frame_before_its_body():
    from bmig.wire.channel import LOOP_FRAME

    left, right = channel_pair()
    left.stream.sock.sendall((LOOP_FRAME + 1).to_bytes(4, "little"))
    assert right.fill_nowait()
    with pytest.raises(FrameTooLarge):
        right.buffered()
    other, far = channel_pair()
    other.stream.sock.sendall((10).to_bytes(4, "little") + b"x" * 3)
    other.close()
    assert far.fill_nowait() and far.buffered() is None
    with pytest.raises(ProtocolError, match="inside a frame"):
        far.fill_nowait()
    for c in (left, right, far):
        c.close()


def test_a_reader_that_may_not_wait_takes_sealed_frames_up_to_the_limit():
    """Sealed, the limit counts the body, not the tag: a body of LOOP_FRAME bytes is
    taken, one more is refused, and a length too short for a tag fails its check."""
    from bmig.errors import IntegrityError
    from bmig.wire.channel import LOOP_FRAME

    keys = (b"k" * 32, b"j" * 32)
    left, right = channel_pair(authenticated=False)
    left.authenticated(keys)
    right.authenticated((keys[1], keys[0]))
    body = os.urandom(LOOP_FRAME)
    sender = threading.Thread(target=left.send, args=(body,))
    sender.start()
    got = None
    while got is None:
        if not right.fill_nowait():
            select.select([right.stream.sock], [], [], 10)
        got = right.buffered()
    sender.join(10)
    assert bytes(got) == body
    left.send(body + b"x")
    while not right.fill_nowait():
        select.select([right.stream.sock], [], [], 10)
    with pytest.raises(FrameTooLarge):
        right.buffered()
    other, far = channel_pair(authenticated=False)
    other.authenticated(keys)
    far.authenticated((keys[1], keys[0]))
    other.stream.sock.sendall((5).to_bytes(4, "little") + b"12345")
    while not far.fill_nowait():
        select.select([far.stream.sock], [], [], 10)
    with pytest.raises(IntegrityError):
        far.buffered()
    for c in (left, right, other, far):
        c.close()


def test_a_reader_that_may_not_wait_keeps_room_for_a_whole_frame(monkeypatch):
    """A frame begun near the end of the buffer, then one of the largest kind: the
    buffer is compacted so that the frame fits, and nothing is lost on the way."""
    from bmig.wire import channel as channel_module
    from bmig.wire.channel import LOOP_FRAME

    monkeypatch.setattr(channel_module, "READ_AHEAD", LOOP_FRAME + 30_000)
    left, right = channel_pair()
    small = [os.urandom(1000) for _ in range(LOOP_FRAME // 1004 + 20)]
    big = os.urandom(LOOP_FRAME)
    wire = b"".join(len(f).to_bytes(4, "little") + f for f in [*small, big])
    first = len(small) * 1004 - 500            # the last small frame cut in half

    def take(until: int) -> None:
        while right.bytes_in < until:
            if right.fill_nowait() is False:
                select.select([right.stream.sock], [], [], 10)
                continue
            while (body := right.buffered()) is not None:
                got.append(bytes(body))

    got: list[bytes] = []
    sender = threading.Thread(target=left.stream.sock.sendall, args=(wire[:first],))
    sender.start()
    take(first)
    sender.join(10)
    sender = threading.Thread(target=left.stream.sock.sendall, args=(wire[first:],))
    sender.start()
    take(len(wire))
    sender.join(10)
    assert got == [*small, big]
    left.close()
    right.close()


def test_enlarge_pipe_sizes_a_pipe_from_either_end_and_leaves_other_files_alone():
    import fcntl

    from bmig.wire.transports import enlarge_pipe

    r, w = os.pipe()
    try:
        assert enlarge_pipe(r, 1 << 20) == 1 << 20
        assert fcntl.fcntl(w, fcntl.F_GETPIPE_SZ) == 1 << 20
    finally:
        os.close(r)
        os.close(w)
    a, b = socket.socketpair()
    with a, b:
        assert enlarge_pipe(a.fileno()) is None
