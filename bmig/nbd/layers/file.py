"""The bottom layer: a file or block device, one fd shared by every connection.

Reads and writes are done inline: on a page-cache or tmpfs backing a pwrite costs less
than the hop to a thread. fdatasync goes to a thread, since it may wait for a disk. One
fd for all connections means one fdatasync makes every connection's writes durable,
which is what NBD_FLAG_CAN_MULTI_CONN promises.

A failed fdatasync (a FLUSH, a FUA, the flush at stop) is final: the kernel reports a
writeback error once per open file, so the next fdatasync may succeed although the pages
it failed to write are gone (PostgreSQL's fsync lesson). From then on every write and
flush fails with EIO until bmig-nbd is restarted (invariant 11), and ``failure`` says
why. fdatasync calls run one at a time, so a flush that overlaps the failing one cannot
succeed because the error was reported to the other.

It knows nothing of breqd, of replication or of the layers above.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os

from bmig.blockdev import data_runs, punch_hole, size_of_fd, write_zeros
from bmig.nbd.layers.base import Capabilities, ExportFailed, Layer

log = logging.getLogger("bmig-nbd")


class FileLayer(Layer):
    def __init__(self, path: str, read_only: bool = False):
        super().__init__(None)
        self.path = path
        self.read_only = read_only
        self._fd = os.open(path, (os.O_RDONLY if read_only else os.O_RDWR) | os.O_CLOEXEC)
        self._size = size_of_fd(self._fd)
        self._can_punch = True
        self._failure: str | None = None
        self._fdatasync_lock = asyncio.Lock()       # one fdatasync at a time

    @property
    def size(self) -> int:
        return self._size

    @property
    def failure(self) -> str | None:
        return self._failure

    def _refuse_if_failed(self) -> None:
        if self._failure is not None:
            raise ExportFailed(f"{self.path}: {self._failure}; every write and flush fails "
                               "until bmig-nbd is restarted")

    def capabilities(self) -> Capabilities:
        writable = not self.read_only
        return Capabilities(writable=writable, trim=writable, zero=writable,
                            fast_zero=writable, multi_conn=True)

    async def read(self, buf: memoryview, offset: int) -> None:
        self.read_now(buf, offset)

    def read_now(self, buf: memoryview, offset: int) -> bool:
        done = 0
        while done < len(buf):
            n = os.preadv(self._fd, [buf[done:]], offset + done)
            if n == 0:   # a file shorter than it was: the rest reads as zeros
                buf[done:] = bytes(len(buf) - done)
                return True
            done += n
        return True

    def _pwrite(self, data: memoryview, offset: int) -> None:
        done = os.pwrite(self._fd, data, offset)
        while done < len(data):
            done += os.pwrite(self._fd, data[done:], offset + done)

    def write_now(self, data: memoryview, offset: int, fua: bool) -> bool:
        if fua or self._failure is not None:
            return False
        self._pwrite(data, offset)
        return True

    async def write(self, data: memoryview, offset: int, fua: bool) -> None:
        self._refuse_if_failed()
        self._pwrite(data, offset)
        if fua:
            await self.flush()

    async def flush(self) -> None:
        async with self._fdatasync_lock:
            self._refuse_if_failed()
            try:
                await asyncio.to_thread(os.fdatasync, self._fd)
            except OSError as exc:
                self._failure = f"fdatasync failed ({exc.strerror or exc})"
                log.error("%s: fdatasync failed: %s. Writes acknowledged before may not be "
                          "on disk: from now on every write and flush fails with EIO until "
                          "bmig-nbd is restarted", self.path, exc.strerror or exc)
                raise

    async def trim(self, offset: int, length: int, fua: bool) -> None:
        """Trimmed ranges read back as zeros: punch a hole, or write zeros if we cannot."""
        await self.zero(offset, length, fua, may_trim=True, fast=False)

    async def zero(self, offset: int, length: int, fua: bool, may_trim: bool,
                   fast: bool) -> None:
        self._refuse_if_failed()
        if self._can_punch and may_trim:
            try:
                punch_hole(self._fd, offset, length)
            except OSError as exc:
                if exc.errno not in (errno.EOPNOTSUPP, errno.ENOTTY, errno.ENODEV):
                    raise
                self._can_punch = False
            else:
                if fua:
                    await self.flush()
                return
        if fast:
            raise OSError(errno.ENOTSUP, "no fast way to zero this range")
        write_zeros(self._fd, offset, length)
        if fua:
            await self.flush()

    def extents(self, offset: int, length: int) -> list[tuple[int, bool]]:
        """Data and hole runs from SEEK_DATA/SEEK_HOLE; all data where unsupported."""
        return data_runs(self._fd, offset, length)

    async def close(self) -> None:
        os.close(self._fd)
