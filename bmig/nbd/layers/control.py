"""The top of the chain: writes held back (frozen, for a cutover) or refused (read-only,
after a handover), at run time.

bmigrate cutover freezes writes through bmig-nbd's control socket (bmig.nbd.manage)
while it drains and verifies, and makes the source read-only once the target took over
(invariant 7); bmig.nbd.service makes a device breqd records as handed over read-only at
start. A freeze waits for the writes already running. A write to a read-only export
fails with EROFS, and one to an export whose backing failed (a failed fdatasync) with
EIO, before any mark or replica. The layer also counts the bytes the application wrote.

It may not mark, replicate or write anything itself: it only lets a request on or not.
"""

from __future__ import annotations

import asyncio
import errno
import logging

from typing import Any

from bmig.nbd.layers.base import ExportFailed, Layer, WriteDone

log = logging.getLogger("bmig-nbd")


class ControlLayer(Layer):
    """The top of the chain: writes can be frozen (held back, for a cutover) or refused
    (read-only, after a handover), at run time."""

    def __init__(self, inner: Layer, name: str):
        super().__init__(inner)
        self.name = name
        self._read_only = False
        self._open = asyncio.Event()
        self._open.set()
        self._writable = True            # neither read-only nor frozen: the fast path's test
        self._writing = 0
        self._quiet = asyncio.Event()
        self._quiet.set()
        self.bytes_written = 0           # by the application, since bmig-nbd started

    @property
    def frozen(self) -> bool:
        return not self._open.is_set()

    @property
    def read_only(self) -> bool:
        return self._read_only

    @read_only.setter
    def read_only(self, value: bool) -> None:
        self._read_only = value
        self._writable = not value and self._open.is_set()

    async def freeze(self) -> None:
        """Hold new writes back; return once the writes already running are done."""
        self._open.clear()
        self._writable = False
        await self._quiet.wait()
        log.info("%s: writes frozen", self.name)

    def thaw(self) -> None:
        if self.frozen:
            log.info("%s: writes thawed", self.name)
        self._open.set()
        self._writable = not self._read_only

    def write_now(self, data: memoryview, offset: int, fua: bool) -> bool:
        if not self._writable:
            return False
        if self.inner.write_now(data, offset, fua):
            self.bytes_written += len(data)
            return True
        return False

    def write_later(self, data: memoryview, offset: int, fua: bool,
                    done: WriteDone) -> bool:
        """Counted as running until answered, so a freeze waits for it as for a write
        through ``_guarded``."""
        if not self._writable:
            return False
        length = len(data)
        self._writing += 1
        self._quiet.clear()
        answered_at_once = False

        def answered(result: Any, error: BaseException | None) -> None:
            nonlocal answered_at_once
            answered_at_once = True
            self._writing -= 1
            if not self._writing:
                self._quiet.set()
            if error is None:
                self.bytes_written += length
            done(result, error)

        started = False
        try:
            started = self.inner.write_later(data, offset, fua, answered)
        finally:
            if not started and not answered_at_once:
                self._writing -= 1
                if not self._writing:
                    self._quiet.set()
        return started

    async def _guarded(self, action):
        await self._open.wait()
        if self.read_only:
            raise OSError(errno.EROFS, f"{self.name} was handed over and is read-only")
        failure = self.failure
        if failure is not None:          # before any mark or replica: nothing to do
            raise ExportFailed(f"{self.name}: {failure}; every write and flush fails "
                               "until bmig-nbd is restarted")
        self._writing += 1
        self._quiet.clear()
        try:
            return await action()
        finally:
            self._writing -= 1
            if not self._writing:
                self._quiet.set()

    async def write(self, data: memoryview, offset: int, fua: bool) -> None:
        await self._guarded(lambda: self._next().write(data, offset, fua))
        self.bytes_written += len(data)

    async def trim(self, offset: int, length: int, fua: bool) -> None:
        await self._guarded(lambda: self._next().trim(offset, length, fua))

    async def zero(self, offset: int, length: int, fua: bool, may_trim: bool,
                   fast: bool) -> None:
        await self._guarded(lambda: self._next().zero(offset, length, fua, may_trim, fast))
