"""The bottom layer: a file or block device, one fd shared by every connection.

Reads and writes are done inline: on a page-cache or tmpfs backing a pwrite costs less
than the hop to a thread. fdatasync goes to a thread, since it may wait for a disk. One
fd for all connections means one fdatasync makes every connection's writes durable,
which is what NBD_FLAG_CAN_MULTI_CONN promises.
"""

from __future__ import annotations

import asyncio
import ctypes
import errno
import os

from bmig.nbd.layers.base import Capabilities, Layer

_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_PUNCH_HOLE = 0x02
_ZERO_BUFFER = bytes(1024 * 1024)

_libc = ctypes.CDLL(None, use_errno=True)
_libc.fallocate.argtypes = (ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64)


def _punch_hole(fd: int, offset: int, length: int) -> None:
    if _libc.fallocate(fd, _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE, offset, length):
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


class FileLayer(Layer):
    def __init__(self, path: str, read_only: bool = False):
        super().__init__(None)
        self.path = path
        self.read_only = read_only
        self._fd = os.open(path, (os.O_RDONLY if read_only else os.O_RDWR) | os.O_CLOEXEC)
        self._size = os.lseek(self._fd, 0, os.SEEK_END)
        self._can_punch = True

    @property
    def size(self) -> int:
        return self._size

    def capabilities(self) -> Capabilities:
        writable = not self.read_only
        return Capabilities(writable=writable, trim=writable, zero=writable,
                            fast_zero=writable, multi_conn=True)

    async def read(self, buf: memoryview, offset: int) -> None:
        done = 0
        while done < len(buf):
            n = os.preadv(self._fd, [buf[done:]], offset + done)
            if n == 0:   # a file shorter than it was: the rest reads as zeros
                buf[done:] = bytes(len(buf) - done)
                return
            done += n

    async def write(self, data: memoryview, offset: int, fua: bool) -> None:
        done = 0
        while done < len(data):
            done += os.pwrite(self._fd, data[done:], offset + done)
        if fua:
            await self.flush()

    async def flush(self) -> None:
        await asyncio.to_thread(os.fdatasync, self._fd)

    async def trim(self, offset: int, length: int, fua: bool) -> None:
        """Trimmed ranges read back as zeros: punch a hole, or write zeros if we cannot."""
        await self.zero(offset, length, fua, may_trim=True, fast=False)

    async def zero(self, offset: int, length: int, fua: bool, may_trim: bool,
                   fast: bool) -> None:
        if self._can_punch and may_trim:
            try:
                _punch_hole(self._fd, offset, length)
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
        end = offset + length
        while offset < end:
            n = min(len(_ZERO_BUFFER), end - offset)
            await self.write(memoryview(_ZERO_BUFFER)[:n], offset, False)
            offset += n
        if fua:
            await self.flush()

    def extents(self, offset: int, length: int) -> list[tuple[int, bool]]:
        """Data and hole runs from SEEK_DATA/SEEK_HOLE; all data where unsupported."""
        end = offset + length
        runs: list[tuple[int, bool]] = []
        try:
            while offset < end:
                try:
                    data = os.lseek(self._fd, offset, os.SEEK_DATA)
                except OSError as exc:
                    if exc.errno != errno.ENXIO:   # ENXIO: only a hole up to the end
                        raise
                    data = self._size
                if data > offset:
                    runs.append((min(data, end) - offset, True))
                    offset = min(data, end)
                    continue
                hole = min(os.lseek(self._fd, offset, os.SEEK_HOLE), end)
                runs.append((hole - offset, False))
                offset = hole
        except OSError:
            return [(end - offset, False)] if not runs else runs
        return runs

    async def close(self) -> None:
        os.close(self._fd)
