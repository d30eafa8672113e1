"""The workload: the application whose device is moved.

A thread that writes 4 KiB to 64 KiB of random or text data at random places of the
writer's file (its extents in the image), at a set pace, through bmig-nbd's NBD export
with bmig's NBD client, then flushes. It touches the device only through the export.
"""

from __future__ import annotations

import bisect
import random
import threading
import time
from typing import Iterator

from bmig.demo.output import reason
from bmig.demo.settings import BLOCK, MAX_WRITE, STOP_TIMEOUT, DemoError
from bmig.nbdclient import NbdClient


class Writer(threading.Thread):
    """Writes of 4 KiB to 64 KiB at random places of ``extents``, ``rate`` bytes a second,
    through the NBD export: the application whose device is being moved."""

    def __init__(self, uri: str, extents: list[tuple[int, int]], rate: int, seed: int = 7):
        super().__init__(name="demo-writer", daemon=True)
        self.uri, self.extents, self.rate = uri, extents, rate
        self.rng = random.Random(seed)
        self._ends = list(_running_sum(n // BLOCK for _, n in extents))
        self.halt = threading.Event()
        self.writes = 0
        self.bytes = 0
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            with NbdClient.connect(self.uri, timeout=60) as client:
                started = time.monotonic()
                while not self.halt.is_set():
                    offset, length = self._pick()
                    client.pwrite(self._data(length), offset)
                    self.writes += 1
                    self.bytes += length
                    ahead = self.bytes / self.rate - (time.monotonic() - started)
                    if ahead > 0:                       # the workload's pace
                        self.halt.wait(ahead)
                client.flush()
        except BaseException as exc:                    # reported by finish()
            self.error = exc

    def _pick(self) -> tuple[int, int]:
        """A random block of the extents, and up to 64 KiB from it within its extent."""
        block = self.rng.randrange(self._ends[-1])
        i = bisect.bisect_right(self._ends, block)
        start, length = self.extents[i]
        first = block - (self._ends[i - 1] if i else 0)
        left = length // BLOCK - first
        return start + first * BLOCK, min(left, self.rng.randint(1, MAX_WRITE // BLOCK)) * BLOCK

    def _data(self, length: int) -> bytes:
        if self.rng.random() < 0.5:
            return self.rng.randbytes(length)
        row = b"order %08d updated %.3f status paid\n" % (self.writes, time.time())
        return (row * (length // len(row) + 1))[:length]

    def finish(self) -> None:
        """Stop, after the last write and a flush."""
        self.halt.set()
        self.join(timeout=STOP_TIMEOUT)
        if self.is_alive():
            raise DemoError(f"the writer did not stop within {STOP_TIMEOUT:.0f} s")
        if self.error is not None:
            raise DemoError(f"the writer failed: {reason(self.error)}")


def _running_sum(values: Iterator[int]) -> Iterator[int]:
    total = 0
    for v in values:
        total += v
        yield total
