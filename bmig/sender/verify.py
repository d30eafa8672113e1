"""Online verify, as DRBD has it: compare per-chunk hashes of source and target.

The device may be in use. A chunk that breqd has dirty, in flight or held before or
after it is read is skipped and counted: it is being written, and a later pass ships it.
The others are compared (xxh3-64, the same on both sides); those that differ are
reported, and with ``repair`` marked dirty so that the next pass fixes them.

Reading and comparing only; with ``repair`` it marks chunks dirty in breqd, and it
never writes either side.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from bmig.chunkmath import chunk_count, chunk_span
from bmig.sender.lockedtracker import LockedTracker
from bmig.sender.source import Source
from bmig.wire import codec

WINDOW_CHUNKS = 256              # chunks compared per request to the target


@dataclass
class VerifyResult:
    chunks: int = 0              # compared
    skipped: int = 0             # busy (dirty, in flight, held) while compared
    differing: list[int] = field(default_factory=list)   # chunk numbers
    repaired: bool = False

    def to_json(self, chunk_size: int) -> dict:
        return {"event": "verify", "chunks_compared": self.chunks,
                "chunks_skipped": self.skipped, "chunks_differing": len(self.differing),
                "differing": [(c * chunk_size, chunk_size) for c in self.differing[:1000]],
                "repaired": self.repaired}


def _busy(tracker: LockedTracker, device: str, offset: int, length: int,
          chunk: int) -> set[int]:
    runs, _ = tracker.query(device, offset, length)
    return {c for o, n in runs for c in range(*chunk_span(o, n, chunk))}


def verify(tracker: LockedTracker, source: Source, target, device: str, size: int,
           chunk: int, sample: float | None = None, repair: bool = False,
           seed: int | None = None) -> VerifyResult:
    result = VerifyResult()
    nchunks = chunk_count(size, chunk)
    chosen = list(range(nchunks))
    if sample is not None and sample < 1:
        rng = random.Random(seed)
        chosen = sorted(rng.sample(chosen, max(1, int(nchunks * sample))))
    buf = bytearray(chunk)
    view = memoryview(buf)
    for start in range(0, len(chosen), WINDOW_CHUNKS):
        batch = chosen[start:start + WINDOW_CHUNKS]
        first, last = batch[0], batch[-1]
        offset = first * chunk
        length = min((last + 1) * chunk, size) - offset
        busy = _busy(tracker, device, offset, length, chunk)
        theirs = target.hashes(offset, length, chunk)
        ours = {}
        for c in batch:
            if c in busy:
                continue
            n = min(chunk, size - c * chunk)
            source.read_into(view[:n], c * chunk)
            ours[c] = codec.checksum(view[:n])
        busy |= _busy(tracker, device, offset, length, chunk)
        for c in batch:
            if c in busy:
                result.skipped += 1
                continue
            result.chunks += 1
            if ours[c] != theirs[c - first]:
                result.differing.append(c)
    if repair and result.differing:
        ranges = [(c * chunk, min(chunk, size - c * chunk)) for c in result.differing]
        for i in range(0, len(ranges), 65536):
            tracker.mark(device, ranges[i:i + 65536])
        result.repaired = True
    return result
