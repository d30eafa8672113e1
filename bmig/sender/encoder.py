"""From checked-out ranges to frames: read the source, ship holes and zero chunks as
ZERO ranges, compress when it pays, checksum; with ``--checksum``, compare each chunk's
hash with the target's first and send only what differs.

``Run`` is a piece of a checked-out range (committed on its own once its frames are
durable); ``Frame`` is one message of it. The encoder reads the source and asks the
target for hashes; it never sends, commits or talks to breqd (bmig.sender.passes does).
Its memory is the buffer pool's: a fixed number of frame-sized buffers.
"""

from __future__ import annotations

import mmap
import time
from dataclasses import dataclass
from typing import Iterator, Protocol

from bmig.constants import MiB
from bmig.sender.buffers import BufferPool
from bmig.sender.pacing import CompressionPacer
from bmig.sender.source import Source
from bmig.wire import codec

HOLE_WEIGHT = 1 * MiB    # a hole's weight in the window and between FLUSHes


@dataclass(eq=False)         # identity: pieces live in a set
class Run:
    """A piece of a checked-out range, committed on its own once its frames are
    durable: whole chunks, a frame's worth of data or one hole of any size."""

    offset: int
    length: int
    hole: bool = False       # wholly a hole in the source: one ZERO frame
    frames: int = 0          # frames not yet durable
    planned: bool = False    # every frame of it is known
    failed: bool = False
    done: bool = False

    @property
    def weight(self) -> int:
        """What it counts for in the window: its bytes, or HOLE_WEIGHT for a hole
        (resending a hole costs a message, not its size)."""
        return min(self.length, HOLE_WEIGHT) if self.hole else self.length


@dataclass
class Frame:
    run: Run
    offset: int
    length: int
    kind: str                        # "data", "zero" or "same" (checksum equal: no bytes)
    codec: int = codec.RAW
    payload: object = None
    digest: int = 0
    buffer: object = None            # the pooled buffer the payload may point into
    seq: int = 0
    zstd_seconds: float | None = None    # spent compressing it; None: not tried


class EncodeSettings(Protocol):
    frame_size: int              # raw bytes per DATA frame
    level: int | None            # zstd level; None: never compress
    compress_all: bool           # every frame; else as many as the pacer says pay
    checksum: bool               # compare per-chunk hashes, send what differs
    skip_holes: bool             # SEEK_DATA/SEEK_HOLE on the source


class Counts(Protocol):
    bytes_read: int
    bytes_same: int              # found equal by --checksum


class HashingTarget(Protocol):
    compresses: bool
    def hashes(self, offset: int, length: int, chunk: int) -> list[int]: ...


class Encoder:
    """Frames of runs, for one pass; ``counts`` hears of bytes read and found equal."""

    def __init__(self, source: Source, target: HashingTarget, chunk_size: int,
                 settings: EncodeSettings, pool: BufferPool, pacer: CompressionPacer,
                 counts: Counts):
        self._source = source
        self._target = target
        self._chunk_size = chunk_size
        self._settings = settings
        self._pool = pool
        self._pacer = pacer
        self._counts = counts

    def frames(self, run: Run, offset: int, length: int) -> Iterator[Frame]:
        """The frames of ``run`` from ``offset`` for ``length`` bytes, read as they are
        taken."""
        if run.hole:
            yield Frame(run, offset, length, "zero")
            return
        pieces = [(length, False)]
        if self._settings.skip_holes and not self._settings.checksum:
            pieces = self._source.holes(offset, length)
        pos = offset
        for n, hole in pieces:
            if hole:
                yield Frame(run, pos, n, "zero")
            else:
                for start in range(pos, pos + n, self._settings.frame_size):
                    yield from self._data_frames(
                        run, start, min(self._settings.frame_size, pos + n - start))
            pos += n

    def _data_frames(self, run: Run, offset: int, length: int) -> Iterator[Frame]:
        buf = self._pool.get()
        view = memoryview(buf)[:length]
        self._source.read_into(view, offset)
        self._counts.bytes_read += length
        if self._settings.checksum:
            yield from self._differing(run, offset, view, buf)
            return
        if codec.is_zero(view):
            view.release()
            self._pool.put(buf)
            yield Frame(run, offset, length, "zero")
            return
        yield self._data(run, offset, view, buf)

    def _level(self) -> int | None:
        """The zstd level for the next data frame; None: sent raw."""
        if not self._target.compresses or self._settings.level is None:
            return None
        if self._settings.compress_all or self._pacer.compress():
            return self._settings.level
        return None

    def _encoded(self, data: memoryview | bytes) -> tuple[int, bytes | memoryview,
                                                          float | None]:
        """(codec, payload, seconds zstd took or None when not tried)."""
        level = self._level()
        if level is None:
            return codec.RAW, data, None
        began = time.monotonic()
        kind, payload = codec.encode(data, level)
        return kind, payload, time.monotonic() - began

    def _data(self, run: Run, offset: int, view: memoryview, buf: mmap.mmap) -> Frame:
        kind, payload, took = self._encoded(view)
        frame = Frame(run, offset, len(view), "data", kind, payload, codec.checksum(view), buf,
                      zstd_seconds=took)
        if kind != codec.RAW:                 # the buffer is free again
            view.release()
            self._pool.put(buf)
            frame.buffer = None
        return frame

    def _differing(self, run: Run, offset: int, view: memoryview,
                   buf: mmap.mmap) -> Iterator[Frame]:
        """--checksum: per chunk, the target's hash against ours; equal chunks cost no
        bytes, differing ones are sent (adjacent ones together)."""
        chunk = self._chunk_size
        theirs = self._target.hashes(offset, len(view), chunk)
        start = None
        pieces = []
        for i, h in enumerate(theirs):
            a = i * chunk
            part = view[a:a + chunk]
            same = codec.checksum(part) == h
            if same:
                if start is not None:
                    pieces.append((start, a))
                    start = None
                self._counts.bytes_same += len(part)
            elif start is None:
                start = a
        if start is not None:
            pieces.append((start, len(view)))
        if not pieces:
            length = len(view)
            view.release()
            self._pool.put(buf)
            yield Frame(run, offset, length, "same")
            return
        for a, b in pieces:
            part = bytes(view[a:b])          # the pooled buffer goes back below
            kind, payload, took = self._encoded(part)
            yield Frame(run, offset + a, b - a, "data", kind, payload, codec.checksum(part),
                        zstd_seconds=took)
        view.release()
        self._pool.put(buf)

    def free(self, frame: Frame) -> None:
        """The frame is sent or dropped: its pooled buffer, if any, is free again."""
        if frame.buffer is not None:
            if isinstance(frame.payload, memoryview):
                frame.payload.release()
            self._pool.put(frame.buffer)
            frame.buffer = None
        frame.payload = None
