"""Buffers a pass reads the source into, reused from frame to frame: page-aligned (mmap),
as O_DIRECT needs, and a fixed number of them, so a pass's memory does not grow with the
device (invariant 8). Nothing here reads or sends.
"""

from __future__ import annotations

import mmap
import queue


class BufferPool:
    """Page-aligned buffers (O_DIRECT needs that), reused from frame to frame."""

    def __init__(self, size: int, count: int):
        self.size = size
        self._free: queue.Queue[mmap.mmap] = queue.Queue()
        for _ in range(count):
            self._free.put(mmap.mmap(-1, size))

    def get(self) -> mmap.mmap:
        return self._free.get()

    def put(self, buf: mmap.mmap) -> None:
        self._free.put(buf)
