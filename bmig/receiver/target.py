"""A target device on the receiving side: a file or block device, checked and locked.

One session at a time writes to a target: the lock is an flock on ``EXPORT.lock`` in the
receiver's state directory, so it also holds between ``breceive --stdio`` processes that
SSH starts side by side.
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat
import time

import xxhash

from bmig.blockdev import is_block_device, size_of_fd, zero_range
from bmig.errors import ConfigError, TargetBusy, TargetError, TargetFull

HASH_READ = 4 * 1024 * 1024
LOCK_WAIT = 5.0        # seconds a new session waits for the target's previous one


def io_error(exc: OSError, what: str) -> TargetError:
    """ENOSPC and friends become TargetFull; everything else TargetError."""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        return TargetFull(f"{what}: {exc.strerror}")
    return TargetError(f"{what}: {exc.strerror or exc}")


class TargetLock:
    """``kind`` "" is the pass lock, "replica" the replication session's own."""

    def __init__(self, state_dir: str, export: str, kind: str = ""):
        self.export = export
        self.kind = kind
        self.path = os.path.join(state_dir, export + (f".{kind}" if kind else "") + ".lock")
        self._fd: int | None = None

    def acquire(self, wait: float = LOCK_WAIT) -> None:
        """Take the lock, waiting a little: a sender that reconnects at once after a
        failure finds its old session still closing."""
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        deadline = time.monotonic() + wait
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    os.close(fd)
                    what = "replicated" if self.kind else "written"
                    raise TargetBusy(f"target {self.export!r} is being {what} by another "
                                     "session; try again when it is done") from None
                time.sleep(0.05)
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


class TargetDevice:
    """The target's bytes: written, zeroed, synced and hashed at byte offsets."""

    def __init__(self, path: str, size: int, writable: bool = True):
        """Open ``path`` for a source of ``size`` bytes: a missing file is created, a
        short file extended; a block device must be large enough. Not ``writable``
        (verify): opened read-only, and neither created nor extended."""
        self.path = path
        self.size = size
        flags = (os.O_RDWR | os.O_CREAT) if writable else os.O_RDONLY
        try:
            self.fd = os.open(path, flags | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise ConfigError(f"cannot open target {path}: {exc.strerror}") from None
        try:
            st = os.fstat(self.fd)
            if not (stat.S_ISREG(st.st_mode) or stat.S_ISBLK(st.st_mode)):
                raise ConfigError(f"target {path} is neither a file nor a block device")
            have = size_of_fd(self.fd)
            if have < size:
                if is_block_device(self.fd) or not writable:
                    raise TargetError(f"target {path} has {have} bytes, the source {size}")
                try:
                    os.ftruncate(self.fd, size)
                except OSError as exc:
                    raise io_error(exc, f"cannot extend {path} to {size} bytes") from None
        except BaseException:
            os.close(self.fd)
            raise

    def write(self, offset: int, data: bytes | memoryview) -> None:
        view = memoryview(data)
        try:
            done = os.pwrite(self.fd, view, offset)
            while done < len(view):
                done += os.pwrite(self.fd, view[done:], offset + done)
        except OSError as exc:
            raise io_error(exc, f"write of {len(view)} bytes at {offset} to "
                                f"{self.path}") from None

    def zero(self, offset: int, length: int) -> None:
        try:
            zero_range(self.fd, offset, length)
        except OSError as exc:
            raise io_error(exc, f"zeroing {length} bytes at {offset} of {self.path}") from None

    def sync(self) -> None:
        try:
            os.fdatasync(self.fd)
        except OSError as exc:
            raise io_error(exc, f"fdatasync of {self.path}") from None

    def hashes(self, offset: int, length: int, chunk: int) -> list[int]:
        """xxh3-64 of each chunk of [offset, offset + length); the last may be short."""
        out: list[int] = []
        buf = bytearray(min(HASH_READ, max(chunk, 1)))
        end = offset + length
        pos = offset
        while pos < end:
            n = min(chunk, end - pos)
            h = xxhash.xxh3_64()
            done = 0
            while done < n:
                step = min(len(buf), n - done)
                view = memoryview(buf)[:step]
                try:
                    got = os.preadv(self.fd, [view], pos + done)
                except OSError as exc:
                    raise io_error(exc, f"read of {self.path} at {pos + done}") from None
                if got < step:
                    view[got:] = bytes(step - got)
                h.update(view)
                done += step
            out.append(h.intdigest())
            pos += n
        return out

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
