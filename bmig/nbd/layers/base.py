"""The contract every layer keeps.

A layer passes reads, flushes and block status through to the next one by default (reads
it does not override are bound, when it is made, to the read methods of the layer below:
they skip it, and reach the nearest layer down that handles them). The
write-like commands (WRITE, TRIM, WRITE_ZEROES) have no default: a layer that forgot one
would let a write slip past it, so each layer must handle each of them by name.

Reads and writes also have a synchronous fast path, ``read_now`` and ``write_now``: done
at once, returning True, or refused with False, in which case the caller uses the async
method. ``write_now`` defaults to False, so a layer that does not know it still sees every
write through its own ``write``. The fast path is what keeps small requests cheap: no
task, no await, the reply written in the same event-loop turn as the request was read.

A write that must wait for something outside the process (a replicated write's answer
from the target) but needs nothing else first has a third path, ``write_later``: it is
started at once, with no task, and ``done(result, error)`` is called once it is over,
from the event loop (perhaps before ``write_later`` returns). False: nothing was done,
use ``write``. It defaults to False too.

The contract does no I/O. A layer knows the one below it (``inner``, fixed when it is
made) and may not reach past it into the chain; the read binding above is the contract's
own doing, not a layer's.
"""

from __future__ import annotations

import abc
import errno
from dataclasses import dataclass
from typing import Any, Callable

# ``write_later``'s completion: (what ``write`` returns, or None; the error, or None).
WriteDone = Callable[[Any, "BaseException | None"], None]


class ExportFailed(OSError):
    """The export stopped acknowledging writes and flushes (a failed fdatasync of the
    backing): an EIO that is expected, and already logged once."""

    def __init__(self, message: str):
        super().__init__(errno.EIO, message)


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
        if inner is not None:
            # A layer that leaves reads alone hands them straight to the layer below
            # (which did the same when it was made): a read of the tracked chain is one
            # call into the file layer, not two per layer on the way down.
            cls = type(self)
            if cls.read_now is Layer.read_now:
                self.read_now = inner.read_now  # type: ignore[method-assign]
            if cls.read is Layer.read:
                self.read = inner.read  # type: ignore[method-assign]

    def _next(self) -> "Layer":
        if self.inner is None:
            raise NotImplementedError(f"{type(self).__name__} is the bottom layer")
        return self.inner

    @property
    def size(self) -> int:
        return self._next().size

    def capabilities(self) -> Capabilities:
        return self._next().capabilities()

    @property
    def failure(self) -> str | None:
        """Why this export fails every write and flush until it is restarted (a flush of
        the backing failed), or None."""
        return self.inner.failure if self.inner is not None else None

    async def read(self, buf: memoryview, offset: int) -> None:
        """Fill ``buf`` with the bytes at ``offset``."""
        await self._next().read(buf, offset)

    def read_now(self, buf: memoryview, offset: int) -> bool:
        """Fill ``buf`` at once if this layer can; False means: use ``read``."""
        return self._next().read_now(buf, offset)

    def write_now(self, data: memoryview, offset: int, fua: bool) -> bool:
        """Write at once if this layer can; False means: use ``write``. ``data`` is only
        valid during the call."""
        return False

    def write_later(self, data: memoryview, offset: int, fua: bool,
                    done: "WriteDone") -> bool:
        """Start the write at once, with no task, if this layer can: True, and ``done``
        is called exactly once when it is over (with what ``write`` would have returned,
        or the error it would have raised); False: nothing was done, use ``write``.
        ``data`` is only valid during the call."""
        return False

    async def flush(self) -> None:
        await self._next().flush()

    def extents(self, offset: int, length: int) -> list[tuple[int, bool]]:
        """(length, is_hole) runs covering at least the first byte of the range."""
        return self._next().extents(offset, length)

    def contexts(self) -> tuple[str, ...]:
        """Meta contexts beyond base:allocation that this chain can answer."""
        return self.inner.contexts() if self.inner is not None else ()

    async def context_extents(self, context: str, offset: int,
                              length: int) -> list[tuple[int, int]]:
        """(length, flags) runs of a meta context from ``contexts``."""
        if self.inner is None:
            raise KeyError(context)
        return await self.inner.context_extents(context, offset, length)

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
