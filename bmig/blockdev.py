"""Files and block devices: size, holes, zeroing. Shared by the NBD file layer, the
sender (which skips holes) and the receiver (which zeroes ranges)."""

from __future__ import annotations

import errno
import fcntl
import functools
import os
import stat
import struct
from typing import Any

_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_PUNCH_HOLE = 0x02
_BLKZEROOUT = 0x127F          # _IO(0x12, 127)
_BLKDISCARDZEROES = 0x127C
ZERO_BUFFER = bytes(1024 * 1024)
_NOT_SUPPORTED = (errno.EOPNOTSUPP, errno.ENOTTY, errno.ENODEV, errno.EINVAL)


@functools.cache
def _fallocate() -> Any:
    """libc's fallocate(2), which os lacks with flags; loaded on first use (ctypes is a
    millisecond of every command's start, and most never punch a hole)."""
    import ctypes
    function = ctypes.CDLL(None, use_errno=True).fallocate
    function.argtypes = (ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64)
    return function


def punch_hole(fd: int, offset: int, length: int) -> None:
    """Deallocate a range of a file; it reads back as zeros. OSError if unsupported."""
    if _fallocate()(fd, _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE, offset, length):
        import ctypes
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def is_block_device(fd: int) -> bool:
    return stat.S_ISBLK(os.fstat(fd).st_mode)


def size_of_fd(fd: int) -> int:
    """Bytes in a file or block device."""
    return os.lseek(fd, 0, os.SEEK_END)


def write_zeros(fd: int, offset: int, length: int) -> None:
    """The slow way: write zero bytes."""
    end = offset + length
    zeros = memoryview(ZERO_BUFFER)
    while offset < end:
        n = min(len(zeros), end - offset)
        done = os.pwrite(fd, zeros[:n], offset)
        offset += done


def zero_range(fd: int, offset: int, length: int, may_deallocate: bool = True) -> None:
    """Make a range read back as zeros: a hole in a file, BLKZEROOUT on a block device,
    written zeros where neither works."""
    if is_block_device(fd):
        try:
            fcntl.ioctl(fd, _BLKZEROOUT, struct.pack("QQ", offset, length))
            return
        except OSError as exc:
            if exc.errno not in _NOT_SUPPORTED:
                raise
    elif may_deallocate:
        try:
            punch_hole(fd, offset, length)
            return
        except OSError as exc:
            if exc.errno not in _NOT_SUPPORTED:
                raise
    write_zeros(fd, offset, length)


def data_runs(fd: int, offset: int, length: int) -> list[tuple[int, bool]]:
    """(length, is_hole) runs covering [offset, offset + length), from SEEK_DATA and
    SEEK_HOLE; one data run where the file system cannot tell."""
    end = offset + length
    size = size_of_fd(fd)
    runs: list[tuple[int, bool]] = []
    try:
        while offset < end:
            try:
                data = os.lseek(fd, offset, os.SEEK_DATA)
            except OSError as exc:
                if exc.errno != errno.ENXIO:   # ENXIO: only a hole up to the end
                    raise
                data = size
            if data > offset:
                runs.append((min(data, end) - offset, True))
                offset = min(data, end)
                continue
            hole = min(os.lseek(fd, offset, os.SEEK_HOLE), end)
            runs.append((hole - offset, False))
            offset = hole
    except OSError:
        return runs + [(end - offset, False)] if offset < end else runs
    return runs
