"""bmig/sender/encoder.py: which frames are compressed.

A real source file and the real codec; the pacer and the target are small stand-ins (a
pacer that says yes or no, a target that takes compressed frames and whose hashes never
match). By default a frame is compressed when the pacer says it pays; --compress always
compresses every frame that shrinks, whatever the pacer says; --level 0 none; with
--checksum, what differs by the same rule; and the pacer hears how long zstd took.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from bmig.constants import MiB
from bmig.sender.buffers import BufferPool
from bmig.sender.encoder import Encoder, Run
from bmig.sender.source import Source
from bmig.wire import codec

FRAME = 1 * MiB
TEXT = b"the quick brown fox jumps over the lazy dog, and again; " * 19000


@dataclass
class Settings:
    frame_size: int = FRAME
    level: int | None = codec.DEFAULT_LEVEL
    compress_all: bool = False
    checksum: bool = False
    skip_holes: bool = False


class Target:
    compresses = True

    def hashes(self, offset: int, length: int, chunk: int) -> list[int]:
        return [0] * (length // chunk)        # --checksum: every chunk differs


@dataclass
class Counts:
    bytes_read: int = 0
    bytes_same: int = 0


class Pacer:
    def __init__(self, says: bool):
        self.says = says

    def compress(self) -> bool:
        return self.says


def frames(tmp_path, settings: Settings, pacer_says: bool) -> list[tuple[int, float | None]]:
    path = tmp_path / "source"
    data = (TEXT * 5)[:4 * FRAME]
    path.write_bytes(data)
    source = Source(str(path), len(data))
    try:
        encoder = Encoder(source, Target(), 64 * 1024, settings, BufferPool(FRAME, 8),
                          Pacer(pacer_says), Counts())
        out = []
        for frame in encoder.frames(Run(0, len(data)), 0, len(data)):
            out.append((frame.codec, frame.zstd_seconds))
            encoder.free(frame)
        return out
    finally:
        source.close()


@pytest.mark.parametrize("says", [True, False])
def test_by_default_a_frame_is_compressed_when_the_pacer_says_so(tmp_path, says):
    got = frames(tmp_path, Settings(), says)
    assert len(got) == 4
    assert all((c == codec.ZSTD) == says for c, _ in got)
    assert all((took is not None) == says for _, took in got)


def test_compress_always_compresses_every_frame_whatever_the_pacer_says(tmp_path):
    got = frames(tmp_path, Settings(compress_all=True), False)
    assert [c for c, _ in got] == [codec.ZSTD] * 4
    assert all(took is not None and took >= 0 for _, took in got)


def test_level_0_compresses_nothing_even_always(tmp_path):
    got = frames(tmp_path, Settings(level=None, compress_all=True), True)
    assert got == [(codec.RAW, None)] * 4


@pytest.mark.parametrize("always,says,compressed", [(False, False, False), (False, True, True),
                                                  (True, False, True)])
def test_checksum_sends_what_differs_by_the_same_rule(tmp_path, always, says, compressed):
    got = frames(tmp_path, Settings(checksum=True, compress_all=always), says)
    assert len(got) == 4
    assert all((c == codec.ZSTD) == compressed for c, _ in got)
    assert all((took is not None) == compressed for _, took in got)
