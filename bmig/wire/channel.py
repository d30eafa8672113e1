"""Frames over a Stream: a buffered, bounded reader and a thread-safe writer.

A frame is a u32 little-endian length and that many bytes (as in bmig.framing, which does
the same for sockets and asyncio). The length is checked against a cap before the body is
read; the cap can be lowered per read (an unauthenticated peer gets a small one). The
body a read returns is a view into the reader's buffer, valid until the next read.
"""

from __future__ import annotations

import struct
import threading
from typing import Sequence

from bmig.errors import FrameTooLarge, ProtocolError, UnreachableError
from bmig.framing import ConnectionClosed
from bmig.wire.protocol import MAX_FRAME
from bmig.wire.transports import Buffer, Stream

LENGTH = struct.Struct("<I")
READ_AHEAD = 1024 * 1024


class Channel:
    def __init__(self, stream: Stream, cap: int = MAX_FRAME):
        self.stream = stream
        self.cap = cap
        self._buf = bytearray(READ_AHEAD + LENGTH.size)
        self._view = memoryview(self._buf)
        self._body = bytearray(cap)          # large bodies are received straight here
        self._body_view = memoryview(self._body)
        self._start = 0
        self._end = 0
        self._send_lock = threading.Lock()
        self.bytes_in = 0
        self.bytes_out = 0

    @property
    def description(self) -> str:
        return self.stream.description

    # -- reading ---------------------------------------------------------------------

    def _fill(self, n: int, inside: bool) -> None:
        """Make ``n`` bytes available from ``_start``."""
        while self._end - self._start < n:
            if len(self._buf) - self._start < n:
                left = self._end - self._start
                self._buf[:left] = self._view[self._start:self._end]
                self._start, self._end = 0, left
            try:
                got = self.stream.recv_into(self._view[self._end:])
            except OSError as exc:
                raise UnreachableError(f"lost {self.description}: "
                                       f"{exc.strerror or exc}") from None
            if got == 0:
                if not inside and self._start == self._end:
                    raise ConnectionClosed(f"{self.description} closed the connection")
                raise ProtocolError(f"{self.description} closed the connection inside a "
                                    "frame")
            self._end += got
            self.bytes_in += got

    def read(self, cap: int | None = None) -> memoryview:
        """The next frame's body; ConnectionClosed at a clean end of stream."""
        limit = self.cap if cap is None else min(cap, self.cap)
        self._fill(LENGTH.size, inside=False)
        (length,) = LENGTH.unpack_from(self._buf, self._start)
        if length > limit:
            raise FrameTooLarge(f"frame of {length} bytes from {self.description} exceeds "
                                f"the limit of {limit}")
        self._start += LENGTH.size
        if length > len(self._buf) // 2:
            return self._read_large(length)
        self._fill(length, inside=True)
        body = self._view[self._start:self._start + length]
        self._start += length
        return body

    def _read_large(self, length: int) -> memoryview:
        """A body larger than the read-ahead buffer: what is buffered is copied, the rest
        received straight into the body buffer, so no buffer is ever shuffled."""
        have = min(self._end - self._start, length)
        body = self._body_view[:length]
        body[:have] = self._view[self._start:self._start + have]
        self._start += have
        while have < length:
            try:
                got = self.stream.recv_into(body[have:])
            except OSError as exc:
                raise UnreachableError(f"lost {self.description}: "
                                       f"{exc.strerror or exc}") from None
            if got == 0:
                raise ProtocolError(f"{self.description} closed the connection inside a "
                                    "frame")
            have += got
            self.bytes_in += got
        return body

    # -- writing ---------------------------------------------------------------------

    def send(self, head: Buffer, payload: Buffer | None = None) -> None:
        """One frame: ``head`` then ``payload``, never interleaved with another send."""
        size = len(head) + (len(payload) if payload is not None else 0)
        parts: Sequence[Buffer] = ((LENGTH.pack(size) + bytes(head), payload)
                                   if payload is not None and len(payload)
                                   else (LENGTH.pack(size) + bytes(head),))
        with self._send_lock:
            try:
                self.stream.send(parts)
            except OSError as exc:
                raise UnreachableError(f"lost {self.description}: "
                                       f"{exc.strerror or exc}") from None
            self.bytes_out += size + LENGTH.size

    def close(self) -> None:
        self.stream.close()
