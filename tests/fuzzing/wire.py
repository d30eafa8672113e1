"""Drivers for the replication wire: both halves of the handshake (before
authentication), breceive's Session after it (the frames reach ``_dispatch`` unsealed, as
over SSH), sealed frames with fixed keys, the sender's reader of acknowledgements, and
the codec.

The handshake's random nonces are pinned while a driver runs, so that a seed's proofs
check and an input means the same thing every time it is fed."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import random
import socket
import threading
import zlib
from typing import Callable, Iterator

import zstandard

from bmig.errors import BmigError, UnreachableError
from bmig.framing import ConnectionClosed
from bmig.identity import identify
from bmig.lineage import (ROLE_SECONDARY, STATE_CONSISTENT, TargetRecord, save_target,
                          target_path)
from bmig.receiver.policy import Policy, TargetConfig
from bmig.receiver.session import FEATURES, Session
from bmig.wire.client import WireTarget
from bmig.wire import auth, codec, handshake
from bmig.wire.channel import Channel
from bmig.wire.protocol import (FLAG_ACK_RECEIVED, FLAG_ACK_WRITTEN, FLAG_FUA, MAX_DATA,
                                Message, T, decode_json, pack_data, pack_hashes, pack_seq,
                                pack_zero, unpack_data, unpack_hashes)
from bmig.wire.seal import derive_keys, transcript
from bmig.wire.transports import SocketStream
from tests.fuzzing.engine import Driver, Field, Frame, Seed, Violation, normalize, seed

SECRET = b"fuzzing secret, 32 bytes long..."
NONCES = ("c1" * 32, "5e" * 32)          # the receiver's challenge, the sender's nonce
WIRE_TOKENS = [b'"version":2', b'"auth":"transport"', b'"auth":"hmac-sha256"',
               b'"challenge":"' + NONCES[0].encode() + b'"', b'"mode":"replicate"',
               b'"mode":"inspect"', b'"discard_target_data":true', b'"export":"a"',
               b'"export":"b"', b'"size":', b'"complete":false', b'"fatal":true',
               b'"seq":', b'"code":"lineage"', b'1e999', b'-1', b'null', b'[[[[[[[[',
               b'"generation":"00000000000000a2"', b"\xff" * 8, b"\x00" * 8,
               b"\x28\xb5\x2f\xfd"]


@contextlib.contextmanager
def pinned_nonces() -> Iterator[None]:
    """auth.new_nonce gives the receiver's challenge, then the sender's nonce."""
    old = auth.new_nonce
    given = iter(NONCES * 2)
    auth.new_nonce = lambda: next(given)
    try:
        yield
    finally:
        auth.new_nonce = old


class MemoryStream:
    """A Stream whose peer sent ``data`` (read in pieces of varying size) and then
    closed; what is sent to it is kept."""

    description = "fuzz peer"

    def __init__(self, data: bytes, keep: bool = True):
        self._data = memoryview(data)
        self._pos = 0
        self._rng = random.Random(zlib.crc32(data))
        self.sent = bytearray()
        self._keep = keep
        self.closed = False
        self._lock = threading.Lock()

    def recv_into(self, buf: memoryview) -> int:
        if self.closed:
            raise OSError(errno.EBADF, "closed")
        n = min(len(buf), len(self._data) - self._pos,
                self._rng.choice((1, 3, 16, 100, 4096, 1 << 20)))
        buf[:n] = self._data[self._pos:self._pos + n]
        self._pos += n
        return n

    def recv_nowait(self, buf: memoryview) -> int:      # everything is there at once
        return self.recv_into(buf)

    def send(self, parts) -> None:
        with self._lock:
            if self.closed:
                raise OSError(errno.EPIPE, "closed")
            if self._keep:
                for part in parts:
                    self.sent += part

    def close(self) -> None:
        self.closed = True


def frames_of(data: bytes) -> list[bytes]:
    """Unsealed frame bodies in ``data``."""
    out, pos = [], 0
    while pos + 4 <= len(data):
        n = int.from_bytes(data[pos:pos + 4], "little")
        out.append(data[pos + 4:pos + 4 + n])
        pos += 4 + n
    return out


def first_error(sent: bytes) -> str | None:
    for body in frames_of(sent):
        if body and body[0] == T.ERROR:
            fields = decode_json(body).fields
            return f"ERROR {fields.get('code')}: {normalize(str(fields.get('message')))}"
    return None


def framed(body: bytes, fields: tuple[Field, ...] = ()) -> Frame:
    """A frame as it crosses the wire: length prefix, then body (fields shifted by it)."""
    return Frame(len(body).to_bytes(4, "little") + body,
                 (Field(0, 4),) + tuple(Field(f.offset + 4, f.width, f.order) for f in fields))


def json_frame(kind: T, fields: dict) -> Frame:
    return framed(Message(kind, fields).encode(), (Field(0, 1), Field(1, 1), Field(2, 2)))


DATA_FIELDS = (Field(0, 1), Field(1, 1), Field(2, 2), Field(4, 4), Field(8, 8), Field(16, 8),
               Field(24, 8))


def data_frame(seq: int, offset: int, raw: bytes, zstd: bool = False, flags: int = 0) -> Frame:
    payload = zstandard.ZstdCompressor().compress(raw) if zstd else raw
    head = pack_data(codec.ZSTD if zstd else codec.RAW, flags, len(raw), seq, offset,
                     codec.checksum(raw))
    return framed(head + payload, DATA_FIELDS)


def zero_frame(seq: int, offset: int, length: int, flags: int = 0) -> Frame:
    return framed(pack_zero(seq, offset, length, flags), DATA_FIELDS)


def seq_frame(kind: T, seq: int) -> Frame:
    return framed(pack_seq(kind, seq), (Field(0, 1), Field(4, 4), Field(8, 8)))


def converse(sender: Callable[[Channel], object], receiver: Callable[[Channel], object]
             ) -> tuple[bytes, bytes]:
    """Both halves of a handshake over a socket pair, each in its thread; returns what
    the receiver read (the sender's bytes) and what the sender read."""
    a, b = socket.socketpair()
    got: dict[str, bytearray] = {"sender": bytearray(), "receiver": bytearray()}

    class Recording(SocketStream):
        def __init__(self, sock: socket.socket, who: str):
            super().__init__(sock, who)
            self.who = who

        def recv_into(self, buf: memoryview) -> int:
            n = super().recv_into(buf)
            got[self.who] += buf[:n]
            return n

    errors: list[BaseException] = []

    def side(fn, stream) -> None:
        try:
            fn(Channel(stream))
        except BaseException as exc:   # noqa: BLE001 - a refusal is part of a seed too
            errors.append(exc)
        finally:
            stream.sock.shutdown(socket.SHUT_WR)

    with pinned_nonces():
        threads = [threading.Thread(target=side, args=(sender, Recording(a, "sender"))),
                   threading.Thread(target=side, args=(receiver, Recording(b, "receiver")))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
    a.close()
    b.close()
    return bytes(got["receiver"]), bytes(got["sender"])


def split(data: bytes) -> list[Frame]:
    return [framed(body, (Field(0, 1),)) for body in frames_of(data)]


# -- before authentication --------------------------------------------------------------

RECEIVER_CONFIGS = ((SECRET, False), (None, True), (SECRET, True))
SENDER_CONFIGS = ((SECRET, False), (SECRET, True), (None, True))


def _receive(secret, verified):
    return lambda ch: handshake.receiver(ch, secret, verified, "breceive fuzz", FEATURES)


def _send(secret, verified):
    return lambda ch: handshake.sender(ch, secret, verified)


class WireHandshakeReceiver(Driver):
    name = "wire-handshake-receiver"
    what = "breceive's half of the handshake: HELLO and AUTH from a stranger (bmig/wire/handshake.py)"
    allowed = (BmigError,)
    dictionary = WIRE_TOKENS
    max_size = 16 * 1024

    def seeds(self) -> list[Seed]:
        out = []
        for config, (secret, verified) in enumerate(RECEIVER_CONFIGS):
            for sender in SENDER_CONFIGS:
                read, _ = converse(_send(*sender), _receive(secret, verified))
                out.append(seed(f"{config}", bytes([config]), *split(read)))
        return out

    def run(self, data: bytes) -> None:
        secret, verified = RECEIVER_CONFIGS[data[0] % len(RECEIVER_CONFIGS)] if data \
            else RECEIVER_CONFIGS[0]
        stream = MemoryStream(data[1:])
        channel = Channel(stream)
        with pinned_nonces():
            agreed = handshake.receiver(channel, secret, verified, "breceive fuzz", FEATURES)
        if secret is not None and not verified and agreed.method != auth.METHOD:
            raise Violation("a sender the transport did not authenticate got in without "
                            "the secret")
        if agreed.method == auth.METHOD:        # the proof, checked again independently
            assert secret is not None
            theirs, answer = frames_of(data[1:])[:2]
            fields = decode_json(answer).fields
            expected = auth.client_proof(secret, NONCES[0], str(fields.get("nonce")),
                                         transcript(theirs, frames_of(bytes(stream.sent))[0]))
            if fields.get("proof") != expected:
                raise Violation("authenticated by a proof that does not check")
        if agreed.method == auth.METHOD and agreed.sealed != channel.sealed:
            raise Violation("sealed frames agreed but the channel is not sealed")


class WireHandshakeSender(Driver):
    name = "wire-handshake-sender"
    what = "bmigrate's half of the handshake: HELLO and AUTH_OK from a receiver (bmig/wire/handshake.py)"
    allowed = (BmigError,)
    dictionary = WIRE_TOKENS
    max_size = 16 * 1024

    def seeds(self) -> list[Seed]:
        out = []
        for config, (secret, verified) in enumerate(SENDER_CONFIGS):
            for receiver in RECEIVER_CONFIGS:
                _, read = converse(_send(secret, verified), _receive(*receiver))
                out.append(seed(f"{config}", bytes([config]), *split(read)))
        return out

    def run(self, data: bytes) -> None:
        secret, verified = SENDER_CONFIGS[data[0] % len(SENDER_CONFIGS)] if data \
            else SENDER_CONFIGS[0]
        channel = Channel(MemoryStream(data[1:]))
        with pinned_nonces():
            agreed = handshake.sender(channel, secret, verified)
        if not verified and not (agreed.method == auth.METHOD and agreed.sealed
                                 and channel.sealed):
            raise Violation("the sender went on with a receiver that did not prove the "
                            "secret, unsealed")


# -- after authentication: breceive's session ----------------------------------------------

TARGET_SIZE = 256 * 1024
MAX_TARGET = 1 << 20                  # both targets' max_size
SOURCE_A = ("00000000000000a1", "00000000000000a2")      # device id, generation of "a"


class WireSession(Driver):
    name = "wire-session"
    what = "breceive's Session after authentication: OPEN, passes, DATA/ZERO/FLUSH, PROMOTE (bmig/receiver/session.py)"
    allowed = ()             # Session.run answers ERROR and ends; it raises nothing
    dictionary = WIRE_TOKENS
    max_size = 256 * 1024
    time_limit = 5.0

    def __init__(self, workdir: str):
        super().__init__(workdir)
        self.state = os.path.join(workdir, "state")
        os.makedirs(self.state, exist_ok=True)
        self.path_a = os.path.join(workdir, "target-a")
        self.path_b = os.path.join(workdir, "target-b")
        with open(self.path_a, "wb") as f:
            f.truncate(TARGET_SIZE)
        self.policy = Policy(
            {"a": TargetConfig("a", self.path_a, allow_discard=True, max_size=MAX_TARGET,
                               allow_discard_primary=True),
             "b": TargetConfig("b", self.path_b, max_size=MAX_TARGET)}, self.state)
        fd = os.open(self.path_a, os.O_RDONLY)
        self.identity_a = identify(fd)
        os.close(fd)
        record = TargetRecord("a", int(SOURCE_A[0], 16), int(SOURCE_A[1], 16),
                              STATE_CONSISTENT, ROLE_SECONDARY, TARGET_SIZE, passes=1,
                              identity=self.identity_a)
        save_target(self.state, record)
        with open(target_path(self.state, "a"), "rb") as f:
            self.record_a = f.read()
        with pinned_nonces():
            self.hello = converse(_send(None, True), _receive(None, True))[0]

    def _reset(self) -> None:
        """Target "a" as a consistent copy of SOURCE_A (the same inode, zeros), no "b"."""
        fd = os.open(self.path_a, os.O_WRONLY)
        try:
            os.ftruncate(fd, 0)
            os.ftruncate(fd, TARGET_SIZE)
        finally:
            os.close(fd)
        for path in (self.path_b, target_path(self.state, "b")):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
        with open(target_path(self.state, "a"), "wb") as f:
            f.write(self.record_a)

    def seeds(self) -> list[Seed]:
        a = {"export": "a", "device": "vm1", "device_id": SOURCE_A[0],
             "generation": SOURCE_A[1], "size": TARGET_SIZE, "chunk_size": 65536,
             "discard_target_data": False, "mode": "pass", "previous": []}
        text = bytes(range(256)) * 16
        pass_frames = [json_frame(T.PASS_BEGIN, {}), data_frame(1, 0, text),
                       data_frame(2, 65536, text * 4, zstd=True), zero_frame(3, 4096, 8192),
                       seq_frame(T.FLUSH, 3), json_frame(T.PASS_END, {"complete": True})]
        return [
            seed("same-pass-promote", json_frame(T.OPEN, a), *pass_frames,
                 json_frame(T.HASHES_REQ, {"offset": 0, "length": TARGET_SIZE,
                                           "chunk_size": 65536}),
                 json_frame(T.PROMOTE, {"generation": "00000000000000a3"}),
                 json_frame(T.STATUS_REQ, {}), json_frame(T.BYE, {})),
            seed("new", json_frame(T.OPEN, {**a, "export": "b", "size": 128 * 1024}),
                 *pass_frames),
            seed("discard", json_frame(T.OPEN, {**a, "generation": "00000000000000b2",
                                                "discard_target_data": True}), *pass_frames),
            seed("replicate", json_frame(T.OPEN, {**a, "mode": "replicate"}),
                 data_frame(1, 0, text, flags=FLAG_FUA), data_frame(2, 4096, text,
                                                                   flags=FLAG_ACK_RECEIVED),
                 data_frame(3, 8192, text, flags=FLAG_ACK_WRITTEN),
                 zero_frame(4, 0, 4096, FLAG_FUA), seq_frame(T.FLUSH, 4)),
            seed("inspect", json_frame(T.OPEN, {**a, "mode": "inspect"}),
                 json_frame(T.HASHES_REQ, {"offset": 65536, "length": 65536,
                                           "chunk_size": 4096})),
            seed("refused", json_frame(T.STATUS_REQ, {}), json_frame(T.OPEN, {**a, "export": "x"}),
                 json_frame(T.PASS_BEGIN, {}), data_frame(1, 0, b"x"),
                 json_frame(T.OPEN, {**a, "size": TARGET_SIZE * 2})),
        ]

    def run(self, data: bytes) -> str | None:
        self._reset()
        stream = MemoryStream(self.hello + data)
        session = Session(Channel(stream), self.policy, True, "fuzz")
        session.run()
        if not stream.closed:
            raise Violation("the session ended without closing its stream")
        for path in (self.path_a, self.path_b):
            with contextlib.suppress(FileNotFoundError):
                if os.path.getsize(path) > MAX_TARGET:
                    raise Violation(f"{path} grew to {os.path.getsize(path)} bytes, past "
                                    f"its max_size of {MAX_TARGET}")
        return first_error(bytes(stream.sent))


# -- sealed frames ------------------------------------------------------------------------

KEYS = derive_keys(SECRET, bytes.fromhex(NONCES[0]), bytes.fromhex(NONCES[1]),
                   transcript(b"sender hello", b"receiver hello"))


class WireSealed(Driver):
    name = "wire-sealed"
    what = "sealed frames with fixed keys: AES-256-GCM, counters, large frames (bmig/wire/channel.py, seal.py)"
    allowed = (BmigError,)
    dictionary = WIRE_TOKENS
    max_size = 1 << 20

    def __init__(self, workdir: str):
        super().__init__(workdir)
        self._sealed: set[tuple[int, bytes]] = set()     # (frame number, digest of body)

    def seeds(self) -> list[Seed]:
        rng = random.Random(5)
        bodies = [[b"\x09" + bytes(40)], [rng.randbytes(n) for n in (1, 100, 4000, 70000)],
                  [rng.randbytes(600 * 1024), b"\x0d" + bytes(15)],
                  [bytes(200 * 1024), pack_seq(T.DURABLE, 7), rng.randbytes(3)]]
        out = []
        for i, plain in enumerate(bodies):
            stream = MemoryStream(b"")
            sender = Channel(stream)
            sender.authenticated((KEYS.sender_to_receiver, KEYS.receiver_to_sender))
            for body in plain:
                sender.send(body)
            for number, body in enumerate(plain):
                self._sealed.add((number, hashlib.sha256(body).digest()))
            out.append(seed(f"sealed-{i}", *[framed(b) for b in frames_of(bytes(stream.sent))]))
        return out

    def run(self, data: bytes) -> None:
        self.seed_list()
        channel = Channel(MemoryStream(data))
        channel.authenticated((KEYS.receiver_to_sender, KEYS.sender_to_receiver))
        number = 0
        while True:
            try:
                body = channel.read()
            except ConnectionClosed:
                return
            if (number, hashlib.sha256(body).digest()) not in self._sealed:
                raise Violation(f"frame {number} opened to a body that was never sealed as "
                                "that frame")
            number += 1


# -- the sender's reader of acknowledgements -------------------------------------------------

class _Acks:
    def __init__(self) -> None:
        self.events: list[tuple] = []

    def durable(self, seq: int) -> None:
        self.events.append(("durable", seq))

    def failed(self, seq: int, error: BmigError) -> None:
        if not isinstance(error, BmigError):
            raise Violation(f"failed() with {error!r}")
        self.events.append(("failed", seq))

    def fatal(self, error: BmigError) -> None:
        if not isinstance(error, BmigError):
            raise Violation(f"fatal() with {error!r}")
        self.events.append(("fatal",))

    def received(self, seq: int) -> None:
        self.events.append(("received", seq))

    def written(self, seq: int) -> None:
        self.events.append(("written", seq))


class WireAcks(Driver):
    name = "wire-acks"
    what = "the sender's reader of acknowledgements and replies (WireTarget._read_loop, bmig/sender/targets.py)"
    allowed = ()          # the reader thread never raises: it ends with the reason
    dictionary = WIRE_TOKENS
    max_size = 64 * 1024

    def seeds(self) -> list[Seed]:
        record = TargetRecord("a").to_json()
        return [
            seed("acks", seq_frame(T.DURABLE, 1), seq_frame(T.RECEIVED, 2),
                 seq_frame(T.WRITTEN, 2), seq_frame(T.DURABLE, 2)),
            seed("replies", json_frame(T.OPENED, {"relation": "same", "target": record}),
                 json_frame(T.PASS_DONE, {"target": record}),
                 framed(pack_hashes(0, [1, 2, 3]), (Field(0, 1), Field(4, 4), Field(8, 8))),
                 json_frame(T.STATUS, {"targets": [record]}),
                 json_frame(T.PROMOTED, {"target": record})),
            seed("errors", json_frame(T.ERROR, {"code": "checksum", "message": "bad",
                                                "seq": 3, "fatal": False}),
                 json_frame(T.ERROR, {"code": "lineage", "message": "no", "fatal": False}),
                 json_frame(T.ERROR, {"code": "target-io", "message": "EIO", "fatal": True}),
                 seq_frame(T.DURABLE, 4)),
        ]

    def run(self, data: bytes) -> str | None:
        target = WireTarget.__new__(WireTarget)
        target._unread(Channel(MemoryStream(data)), "fuzz receiver", "a")
        target.channel.authenticated()
        target._acks = _Acks()
        self.read(target)
        replies = []
        while not target._replies.empty():
            replies.append(target._replies.get_nowait())
        why = replies[-1] if replies else None
        if not isinstance(why, BmigError):
            raise Violation(f"the reader ended without a reason: {why!r}")
        for reply in replies[:-1]:
            if isinstance(reply, memoryview):
                try:
                    unpack_hashes(reply)
                except BmigError:
                    pass
            elif not isinstance(reply, (Message, BmigError)):
                raise Violation(f"reply of type {type(reply).__name__}")
        if target._acks.events[-1:] != [("fatal",)]:
            raise Violation("the acknowledgements did not end with fatal()")
        if isinstance(why, UnreachableError) and why.message.endswith("closed the connection"):
            return None          # every frame read: the receiver closed, as it may
        return f"{type(why).__name__}: {normalize(why.message)}"


    def read(self, target: WireTarget) -> None:
        target._read_loop()


class WireAcksOnLoop(WireAcks):
    name = "wire-acks-loop"
    what = ("the same read on bmig-nbd's event loop over tcp:// (WireTarget._readable, "
            "Channel.fill_nowait and buffered)")

    def read(self, target: WireTarget) -> None:
        for _ in range(1 << 20):       # each call takes at least a byte, or ends
            if target._read_ended.is_set():
                return
            target._readable()
        raise Violation("the loop's reader never ended")


# -- the codec -----------------------------------------------------------------------------

class WireCodec(Driver):
    name = "wire-codec"
    what = "DATA headers and payload decoding, zstd bombs included (bmig/wire/protocol.py, codec.py)"
    allowed = (BmigError,)
    dictionary = WIRE_TOKENS + [zstandard.ZstdCompressor().compress(bytes(1 << 20))]
    max_size = 256 * 1024

    def seeds(self) -> list[Seed]:
        rng = random.Random(3)
        text = (b"the quick brown fox " * 300)[:4096]
        bomb = zstandard.ZstdCompressor(write_content_size=False).compress(bytes(64 << 20))
        stated = zstandard.ZstdCompressor().compress(bytes(MAX_DATA))
        small = zstandard.ZstdCompressor().compress(text)

        def body(codec_id: int, raw_length: int, payload: bytes, raw: bytes | None = None
                 ) -> Frame:
            digest = codec.checksum(raw) if raw is not None else 0
            return Frame(pack_data(codec_id, 0, raw_length, 1, 0, digest) + payload,
                         DATA_FIELDS)

        return [
            seed("raw", body(codec.RAW, 4096, text, text)),
            seed("zstd", body(codec.ZSTD, 4096, small, text)),
            seed("zstd-random", body(codec.ZSTD, 3000, zstandard.ZstdCompressor().compress(
                rng.randbytes(3000)))),
            seed("bomb-no-size", body(codec.ZSTD, 4096, bomb)),
            seed("bomb-stated", body(codec.ZSTD, 4096, stated)),
            seed("two-frames", body(codec.ZSTD, 4096, small + bomb, text)),
            seed("max", body(codec.ZSTD, MAX_DATA, stated, bytes(MAX_DATA))),
        ]

    def run(self, data: bytes) -> None:
        head, payload = unpack_data(memoryview(data))
        raw = codec.decode(head.codec, payload, head.raw_length)
        if len(raw) != head.raw_length:
            raise Violation(f"decoded {len(raw)} bytes, {head.raw_length} announced")
        codec.checksum(raw)


DRIVERS = (WireHandshakeReceiver, WireHandshakeSender, WireSession, WireSealed, WireAcks,
           WireAcksOnLoop, WireCodec)
