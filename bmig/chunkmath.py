"""Chunk arithmetic, written once: how many chunks cover a size, which chunks a byte
range touches, a value rounded up to a whole unit.

The room is for integer arithmetic only, so any package may import it (the tracker, the
NBD intercept, the sender, the receiver) without importing anything else. It may not
check ranges against a device, raise the toolkit's errors, or do I/O: callers validate
first (``ChunkMap.span`` refuses empty and out-of-device ranges, for example).
"""

from __future__ import annotations


def ceil_div(numerator: int, divisor: int) -> int:
    """``numerator / divisor`` rounded up, for ``divisor > 0`` (exact for any int size)."""
    return -(-numerator // divisor)


def chunk_count(size: int, chunk_size: int) -> int:
    """Chunks of ``chunk_size`` bytes that cover ``size`` bytes (the last may be short)."""
    return ceil_div(size, chunk_size)


def chunk_span(offset: int, length: int, chunk_size: int) -> tuple[int, int]:
    """Chunks [first, end) that bytes [offset, offset + length) touch (length > 0)."""
    return offset // chunk_size, (offset + length - 1) // chunk_size + 1


def round_up(value: int, unit: int) -> int:
    """``value`` rounded up to a multiple of ``unit``."""
    return ceil_div(value, unit) * unit
