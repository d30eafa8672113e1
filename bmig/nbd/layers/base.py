"""The contract every layer keeps.

A layer passes reads, flushes and block status through to the next one by default. The
write-like commands (WRITE, TRIM, WRITE_ZEROES) have no default: a layer that forgot one
would let a write slip past it, so each layer must handle each of them by name.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass


@dataclass(frozen=True)
class Capabilities:
    """What a layer can do; asked once per export and advertised to clients."""

    writable: bool
    trim: bool
    zero: bool
    fast_zero: bool
    multi_conn: bool


class Layer(abc.ABC):
    def __init__(self, inner: "Layer | None" = None):
        self.inner = inner

    def _next(self) -> "Layer":
        if self.inner is None:
            raise NotImplementedError(f"{type(self).__name__} is the bottom layer")
        return self.inner

    @property
    def size(self) -> int:
        return self._next().size

    def capabilities(self) -> Capabilities:
        return self._next().capabilities()

    async def read(self, buf: memoryview, offset: int) -> None:
        """Fill ``buf`` with the bytes at ``offset``."""
        await self._next().read(buf, offset)

    async def flush(self) -> None:
        await self._next().flush()

    def extents(self, offset: int, length: int) -> list[tuple[int, bool]]:
        """(length, is_hole) runs covering at least the first byte of the range."""
        return self._next().extents(offset, length)

    async def close(self) -> None:
        if self.inner is not None:
            await self.inner.close()

    @abc.abstractmethod
    async def write(self, data: memoryview, offset: int, fua: bool) -> None: ...

    @abc.abstractmethod
    async def trim(self, offset: int, length: int, fua: bool) -> None: ...

    @abc.abstractmethod
    async def zero(self, offset: int, length: int, fua: bool, may_trim: bool,
                   fast: bool) -> None:
        """Zero the range; ``may_trim``: a hole is fine; ``fast``: fail with ENOTSUP
        rather than write zeros slowly."""
