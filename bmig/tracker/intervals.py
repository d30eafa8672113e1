"""A set of disjoint half-open integer intervals: the chunk runs one connection has
checked out, or holds (sessions.py keeps one set of each per device); and ``merge_spans``.

Plain integers only: the room may not know what the runs mean or touch chunk state.
"""

from __future__ import annotations

import bisect


class IntervalSet:
    def __init__(self) -> None:
        self._starts: list[int] = []
        self._ends: list[int] = []

    def __bool__(self) -> bool:
        return bool(self._starts)

    def __iter__(self):
        return iter(zip(self._starts, self._ends))

    def total(self) -> int:
        return sum(e - s for s, e in self)

    def add(self, start: int, end: int) -> None:
        """Add [start, end), merging with neighbours it touches or overlaps."""
        i = bisect.bisect_left(self._ends, start)
        j = bisect.bisect_right(self._starts, end)
        if i < j:
            start = min(start, self._starts[i])
            end = max(end, self._ends[j - 1])
        self._starts[i:j] = [start]
        self._ends[i:j] = [end]

    def contains(self, start: int, end: int) -> bool:
        """True when all of [start, end) is in the set."""
        i = bisect.bisect_right(self._starts, start) - 1
        return i >= 0 and self._ends[i] >= end

    def __len__(self) -> int:
        """The number of disjoint intervals."""
        return len(self._starts)

    def overlapping(self, start: int, end: int) -> list[tuple[int, int]]:
        """The parts of the set inside [start, end), in order."""
        i = bisect.bisect_right(self._ends, start)
        j = bisect.bisect_left(self._starts, end)
        return [(max(s, start), min(e, end))
                for s, e in zip(self._starts[i:j], self._ends[i:j])]

    def remove(self, start: int, end: int) -> None:
        """Remove [start, end) (parts not in the set are ignored)."""
        i = bisect.bisect_right(self._ends, start)
        j = bisect.bisect_left(self._starts, end)
        if i >= j:
            return
        keep_s: list[int] = []
        keep_e: list[int] = []
        if self._starts[i] < start:
            keep_s.append(self._starts[i])
            keep_e.append(start)
        if self._ends[j - 1] > end:
            keep_s.append(end)
            keep_e.append(self._ends[j - 1])
        self._starts[i:j] = keep_s
        self._ends[i:j] = keep_e


def merge_spans(spans: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Sorted, disjoint spans covering the same chunks.

    A client may send many overlapping ranges in one message; applied one by one to the
    bitarrays, the cost would grow with ranges times device size.
    """
    if len(spans) < 2:
        return spans
    merged: list[tuple[int, int]] = []
    for first, end in sorted(spans):
        if merged and first <= merged[-1][1]:
            if end > merged[-1][1]:
                merged[-1] = (merged[-1][0], end)
        else:
            merged.append((first, end))
    return merged
