"""The activity log: the chunks written most recently stay dirty on disk, whatever a
sender commits, so that the next write to one of them needs no bitmap flush.

DRBD's activity log is the model: a write to a hot extent costs no metadata update. Here
the log is the last ``capacity`` distinct chunks marked, kept in least-recently-marked
order. A chunk in the log has its bit set in the on-disk image (``ChunkMap.disk_image``)
even when a commit made it clean in memory: the sender sees it clean and skips it, and
a mark of it finds its bit durable already, so it is answered with no fdatasync.

Invariant 4 holds at every instant: the on-disk image only gains the logged bits, so it
stays a superset of dirty and in flight. What a crash costs is bounded by ``capacity``:
after one, the logged chunks are dirty and ship again (more work, never loss). A chunk
that leaves the log (evicted by newer ones, or the whole log emptied at a clean stop
and by CLEAR_ALL) loses its extra bit with the next lazy write of its page; a mark
after that waits for a flush again, as any mark of a clean chunk does.

The room is pure state, like chunks.py: no I/O, no knowledge of pages or sessions.
"""

from __future__ import annotations

from collections import OrderedDict

from bitarray import bitarray


NONE: list[int] = []      # what add returns when nothing left the log (never changed)


class ActivityLog:
    """The last ``capacity`` distinct chunks marked, of a device of ``nchunks`` chunks.

    ``bits`` has a bit set for each chunk in the log (None when ``capacity`` is 0: no
    log, and no array allocated for it)."""

    def __init__(self, nchunks: int, capacity: int):
        if capacity < 0:
            raise ValueError(f"activity log capacity {capacity} is negative")
        self.capacity = capacity
        self.bits: bitarray | None = None
        if capacity:
            self.bits = bitarray(nchunks, endian="little")
            self.bits.setall(0)
        self._order: OrderedDict[int, None] = OrderedDict()   # oldest first

    def __len__(self) -> int:
        return len(self._order)

    def add(self, first: int, end: int) -> list[int]:
        """Chunks [first, end) were marked: they become the newest in the log. Returns the
        chunks evicted to make room (their bits are clear now)."""
        bits = self.bits
        if bits is None:
            return NONE
        order = self._order
        if end - first == 1:                   # the usual case, kept short
            if first in order:
                order.move_to_end(first)
                return NONE
            order[first] = None
            bits[first] = 1
        else:
            # Of a run longer than the log only its last ``capacity`` chunks would stay.
            for c in range(max(first, end - self.capacity), end):
                if c in order:
                    order.move_to_end(c)
                else:
                    order[c] = None
                    bits[c] = 1
        if len(order) <= self.capacity:
            return NONE
        evicted: list[int] = []
        while len(order) > self.capacity:
            c, _ = order.popitem(last=False)
            bits[c] = 0
            evicted.append(c)
        return evicted

    def clear(self) -> list[int]:
        """Empty the log; returns the chunks that were in it."""
        chunks = list(self._order)
        self._order.clear()
        if self.bits is not None:
            self.bits.setall(0)
        return chunks
