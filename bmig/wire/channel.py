"""Frames over a Stream: a buffered, bounded reader and a thread-safe writer.

A frame is a u32 little-endian length and that many bytes (as in bmig.framing, which does
the same for sockets and asyncio). The length is checked against a cap before the body is
read. Until the peer has authenticated, the cap is MAX_PREAUTH_FRAME and the channel holds
one small buffer; ``authenticated`` raises the cap and, when it is given keys, seals every
frame from then on (bmig.wire.seal: the body becomes ciphertext and a 16-byte tag, the
length counts both). The body a read returns is valid until the next read.

Several small frames can leave in one write (``send_many``), and a reader can ask whether
the next frame is already buffered (``has_frame``), to answer a batch at once. A reader on
an event loop (a plain socket only) takes what the socket holds without waiting
(``fill_nowait``) and then the frames that are whole (``buffered``); it takes small frames
only (LOOP_FRAME: acknowledgements and replies, never data).

Large frames (DATA) are never joined or copied whole: unsealed, the body is received
straight into a body buffer; sealed, it is deciphered from the read buffer into the body
buffer piece by piece, and sealed into a piece-sized buffer that is sent as it fills.

It knows lengths, caps and seals, not what a frame means (bmig.wire.protocol).
"""

from __future__ import annotations

import struct
import threading
from typing import Sequence

from bmig.errors import FrameTooLarge, ProtocolError, UnreachableError
from bmig.framing import ConnectionClosed
from bmig.limits import MAX_FRAME, MAX_JSON, MAX_PREAUTH_FRAME, PREAUTH_BUFFER
from bmig.wire.seal import TAG_BYTES, Opener, Sealer
from bmig.wire.transports import Buffer, Stream

LENGTH = struct.Struct("<I")
READ_AHEAD = 1024 * 1024
REASON_LINGER = 2.0             # seconds a fatal reason's sender reads on before closing
SEAL_PIECE = 256 * 1024          # a large frame is sealed and sent in pieces of this size
SEAL_IN_ONE = 128 * 1024         # frames up to this size are sealed in one call
SLACK = 32                       # room a cipher may want past its output
MANY_PARTS = 512                 # buffers per sendmsg of send_many (IOV_MAX is 1024)
LOOP_FRAME = MAX_JSON + 1024     # the largest frame a reader on an event loop takes:
                                 # any message but DATA and HASHES


class Channel:
    def __init__(self, stream: Stream):
        self.stream = stream
        self.cap = MAX_PREAUTH_FRAME
        self._buf = bytearray(PREAUTH_BUFFER)
        self._view = memoryview(self._buf)
        self._body_view: memoryview | None = None   # allocated at the first large frame
        self._out_view: memoryview | None = None    # ditto, for sealing one
        self._start = 0
        self._end = 0
        self._send_lock = threading.Lock()
        self._sealer: Sealer | None = None
        self._opener: Opener | None = None
        self.bytes_in = 0
        self.bytes_out = 0

    @property
    def description(self) -> str:
        return self.stream.description

    @property
    def sealed(self) -> bool:
        return self._sealer is not None

    def authenticated(self, keys: tuple[bytes, bytes] | None = None,
                      cap: int = MAX_FRAME) -> None:
        """The peer has authenticated: frames up to ``cap`` from now on, sealed with
        ``keys`` (this side's sending key, then its receiving key) when given. Called
        between frames, while no other thread sends."""
        if len(self._buf) < READ_AHEAD + LENGTH.size:
            bigger = bytearray(READ_AHEAD + LENGTH.size)
            left = self._end - self._start
            bigger[:left] = self._view[self._start:self._end]
            self._buf, self._view = bigger, memoryview(bigger)
            self._start, self._end = 0, left
        self.cap = cap
        if keys is not None:
            self._sealer = Sealer(keys[0])
            self._opener = Opener(keys[1], self.description)

    # -- reading ---------------------------------------------------------------------

    def _recv(self, into: memoryview, inside: bool) -> int:
        try:
            got = self.stream.recv_into(into)
        except OSError as exc:
            raise UnreachableError(f"lost {self.description}: "
                                   f"{exc.strerror or exc}") from None
        if got == 0:
            if not inside:
                raise ConnectionClosed(f"{self.description} closed the connection")
            raise ProtocolError(f"{self.description} closed the connection inside a frame")
        self.bytes_in += got
        return got

    def _fill(self, n: int, inside: bool) -> None:
        """Make ``n`` bytes available from ``_start``."""
        while self._end - self._start < n:
            if len(self._buf) - self._start < n:
                left = self._end - self._start
                self._buf[:left] = self._view[self._start:self._end]
                self._start, self._end = 0, left
            self._end += self._recv(self._view[self._end:],
                                    inside or self._start != self._end)

    def read(self, cap: int | None = None) -> memoryview:
        """The next frame's body; ConnectionClosed at a clean end of stream."""
        limit = self.cap if cap is None else min(cap, self.cap)
        self._fill(LENGTH.size, inside=False)
        prefix = bytes(self._view[self._start:self._start + LENGTH.size])
        (length,) = LENGTH.unpack(prefix)
        body_length = length - TAG_BYTES if self._opener is not None else length
        if body_length > limit:
            raise FrameTooLarge(f"frame of {body_length} bytes from {self.description} "
                                f"exceeds the limit of {limit}")
        self._start += LENGTH.size
        if length > len(self._buf) // 2:
            return self._read_large(length) if self._opener is None \
                else self._open_large(prefix, length)
        self._fill(length, inside=True)
        body = self._view[self._start:self._start + length]
        self._start += length
        if self._opener is not None:
            return memoryview(self._opener.open(prefix, body))
        return body

    def has_frame(self) -> bool:
        """A whole frame is buffered already: the next ``read`` needs no ``recv``."""
        have = self._end - self._start
        if have < LENGTH.size:
            return False
        (length,) = LENGTH.unpack_from(self._buf, self._start)
        return have >= LENGTH.size + length

    def fill_nowait(self) -> bool:
        """Receive what the stream holds now, without waiting (a stream with
        ``recv_nowait``: a plain socket), for a reader on an event loop: False when
        there was nothing; ConnectionClosed at a clean end of stream."""
        if self._start == self._end:
            self._start = self._end = 0
        elif len(self._buf) - self._end < LOOP_FRAME + LENGTH.size + TAG_BYTES:
            left = self._end - self._start
            self._buf[:left] = self._view[self._start:self._end]
            self._start, self._end = 0, left
        try:
            got = self.stream.recv_nowait(self._view[self._end:])  # type: ignore[attr-defined]
        except (BlockingIOError, InterruptedError):
            return False
        except OSError as exc:
            raise UnreachableError(f"lost {self.description}: "
                                   f"{exc.strerror or exc}") from None
        if got == 0:
            if self._start == self._end:
                raise ConnectionClosed(f"{self.description} closed the connection")
            raise ProtocolError(f"{self.description} closed the connection inside a frame")
        self.bytes_in += got
        self._end += got
        return True

    def buffered(self) -> memoryview | None:
        """The next frame's body if it is whole in the buffer (``fill_nowait`` brought
        it), else None; a frame longer than LOOP_FRAME is refused before it is waited
        for, so that a frame always fits in what ``fill_nowait`` fills."""
        have = self._end - self._start
        if have < LENGTH.size:
            return None
        (length,) = LENGTH.unpack_from(self._buf, self._start)
        if length - (TAG_BYTES if self._opener is not None else 0) > min(LOOP_FRAME,
                                                                            self.cap):
            raise FrameTooLarge(f"frame of {length} bytes from {self.description} "
                                f"exceeds the limit of {LOOP_FRAME} for an "
                                "acknowledgement")
        if have < LENGTH.size + length:
            return None
        return self.read()

    def _body(self, length: int) -> memoryview:
        if self._body_view is None:
            self._body_view = memoryview(bytearray(self.cap + SLACK))
        return self._body_view

    def _read_large(self, length: int) -> memoryview:
        """A body larger than half the read buffer: what is buffered is copied, the rest
        received straight into the body buffer, so no buffer is ever shuffled."""
        have = min(self._end - self._start, length)
        body = self._body(length)[:length]
        body[:have] = self._view[self._start:self._start + have]
        self._start += have
        while have < length:
            have += self._recv(body[have:], inside=True)
        return body

    def _open_large(self, prefix: bytes, length: int) -> memoryview:
        """A large sealed frame: deciphered from the read buffer into the body buffer as
        it arrives; handed on only once its tag has checked."""
        assert self._opener is not None
        if length < TAG_BYTES:
            raise self._opener.failed(self._opener.frames)
        size = length - TAG_BYTES
        body = self._body(size)
        opening = self._opener.start(prefix)
        have = 0
        while have < size:
            if self._start == self._end:
                self._start = self._end = 0
                self._end = self._recv(self._view, inside=True)
            take = min(self._end - self._start, size - have)
            opening.update_into(self._view[self._start:self._start + take],
                                body[have:have + take + SLACK // 2])
            self._start += take
            have += take
        self._fill(TAG_BYTES, inside=True)
        opening.finish(self._view[self._start:self._start + TAG_BYTES])
        self._start += TAG_BYTES
        return body[:size]

    # -- writing ---------------------------------------------------------------------

    def send(self, head: Buffer, payload: Buffer | None = None) -> None:
        """One frame: ``head`` then ``payload``, never interleaved with another send."""
        size = len(head) + (len(payload) if payload is not None else 0)
        with self._send_lock:
            try:
                if self._sealer is None:
                    parts: Sequence[Buffer] = (
                        (LENGTH.pack(size) + bytes(head), payload)
                        if payload is not None and len(payload)
                        else (LENGTH.pack(size) + bytes(head),))
                    self.stream.send(parts)
                    self.bytes_out += size + LENGTH.size
                    return
                prefix = LENGTH.pack(size + TAG_BYTES)
                if size <= SEAL_IN_ONE:
                    body = bytes(head) + bytes(payload) if payload is not None else head
                    self.stream.send((prefix + self._sealer.seal(prefix, body),))
                else:
                    self._seal_large(prefix, head, payload)
                self.bytes_out += size + TAG_BYTES + LENGTH.size
            except OSError as exc:
                raise UnreachableError(f"lost {self.description}: "
                                       f"{exc.strerror or exc}") from None

    def send_many(self, frames: Sequence[tuple[Buffer, Buffer | None]]) -> None:
        """Several frames, each ``(head, payload)``, in order and never interleaved with
        another send: the small ones leave together, in one ``sendmsg`` of up to
        MANY_PARTS buffers (the receiver reads them with one wake-up); a large sealed one
        goes through ``send`` on its own, in its place."""
        with self._send_lock:
            try:
                parts: list[Buffer] = []
                for head, payload in frames:
                    size = len(head) + (len(payload) if payload is not None else 0)
                    if self._sealer is None:
                        parts.append(LENGTH.pack(size) + bytes(head))
                        if payload is not None and len(payload):
                            parts.append(payload)
                        self.bytes_out += size + LENGTH.size
                    elif size <= SEAL_IN_ONE:
                        prefix = LENGTH.pack(size + TAG_BYTES)
                        body = bytes(head) + bytes(payload) if payload is not None else head
                        parts.append(prefix + self._sealer.seal(prefix, body))
                        self.bytes_out += size + TAG_BYTES + LENGTH.size
                    else:
                        if parts:
                            self.stream.send(parts)
                            parts = []
                        self._seal_large(LENGTH.pack(size + TAG_BYTES), head, payload)
                        self.bytes_out += size + TAG_BYTES + LENGTH.size
                    if len(parts) >= MANY_PARTS:
                        self.stream.send(parts)
                        parts = []
                if parts:
                    self.stream.send(parts)
            except OSError as exc:
                raise UnreachableError(f"lost {self.description}: "
                                       f"{exc.strerror or exc}") from None

    def try_send_many(self, frames: Sequence[tuple[Buffer, Buffer | None]]
                      ) -> list[memoryview] | None:
        """``send_many`` without waiting, for a caller that must not block (an event
        loop): None when it was not tried (another send is under way, a frame is large,
        or the stream cannot send without waiting); else what is left to send, in order
        and before anything else (``send_rest``; also after an error, which ``send_rest``
        then reports), an empty list when all went out."""
        if not getattr(self.stream, "nowait", False) \
                or not self._send_lock.acquire(blocking=False):
            return None
        send_nowait = self.stream.send_nowait      # type: ignore[attr-defined]
        try:
            parts: list[memoryview] = []
            for head, payload in frames:
                size = len(head) + (len(payload) if payload is not None else 0)
                if self._sealer is not None and size > SEAL_IN_ONE:
                    return None
            for head, payload in frames:
                size = len(head) + (len(payload) if payload is not None else 0)
                if self._sealer is None:
                    parts.append(memoryview(LENGTH.pack(size) + bytes(head)))
                    if payload is not None and len(payload):
                        parts.append(memoryview(payload).cast("B"))
                    self.bytes_out += size + LENGTH.size
                else:
                    prefix = LENGTH.pack(size + TAG_BYTES)
                    body = bytes(head) + bytes(payload) if payload is not None else head
                    parts.append(memoryview(prefix + self._sealer.seal(prefix, body)))
                    self.bytes_out += size + TAG_BYTES + LENGTH.size
            while parts:
                try:
                    sent = send_nowait(parts[:MANY_PARTS])
                except OSError:          # send_rest, which may wait, finds out why
                    return parts
                if not sent:
                    return parts
                while parts and sent >= len(parts[0]):
                    sent -= len(parts[0])
                    parts.pop(0)
                if parts and sent:
                    parts[0] = parts[0][sent:]
            return parts
        finally:
            self._send_lock.release()

    def send_rest(self, parts: Sequence[Buffer]) -> None:
        """What ``try_send_many`` left, as it is (framed and sealed already)."""
        with self._send_lock:
            try:
                for start in range(0, len(parts), MANY_PARTS):
                    self.stream.send(parts[start:start + MANY_PARTS])
            except OSError as exc:
                raise UnreachableError(f"lost {self.description}: "
                                       f"{exc.strerror or exc}") from None

    def _seal_large(self, prefix: bytes, head: Buffer, payload: Buffer | None) -> None:
        """Seal into a piece-sized buffer and send each piece as it fills, the tag with
        the last one."""
        assert self._sealer is not None
        if self._out_view is None:
            self._out_view = memoryview(bytearray(SEAL_PIECE + LENGTH.size + TAG_BYTES
                                                  + SLACK))
        out = self._out_view
        context = self._sealer.start(prefix)
        out[:LENGTH.size] = prefix
        pos = LENGTH.size
        for part in (head, payload):
            if part is None:
                continue
            view = memoryview(part).cast("B")
            done = 0
            while done < len(view):
                take = min(len(view) - done, SEAL_PIECE - pos)
                pos += context.update_into(view[done:done + take],
                                           out[pos:pos + take + SLACK // 2])
                done += take
                if pos >= SEAL_PIECE:
                    self.stream.send((out[:pos],))
                    pos = 0
        context.finalize()
        out[pos:pos + TAG_BYTES] = context.tag
        self.stream.send((out[:pos + TAG_BYTES],))

    def close(self) -> None:
        self.stream.close()

    def close_after_reason(self, linger: float = REASON_LINGER) -> None:
        """Close once a fatal reason was sent, so that the peer can still read it (a
        socket lingers; other streams just close)."""
        closer = getattr(self.stream, "close_after_reason", None)
        if closer is None:
            self.stream.close()
        else:
            closer(linger)
