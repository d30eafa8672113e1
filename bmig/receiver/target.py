"""A target device on the receiving side: a file or block device, checked and locked.

One session at a time writes to a target: the lock is an flock on ``EXPORT.lock`` in the
receiver's state directory, so it also holds between ``breceive --stdio`` processes that
SSH starts side by side. A replication session has a lock of its own
(``EXPORT.replica.lock``) and runs beside the pass session.

A target is opened as it is: a file is created, or extended, only for a sender whose
relation to it is "new" (the session decides), and never beyond its cap (``max_size``,
by default the size of the file system that holds it). A block device is opened with
O_EXCL, so one that is mounted or claimed by another program (device-mapper, md, a
program that opened it exclusively) is refused; the claim is shared by the sessions of
one export (the first one takes it). What the target is (``identity``) is what its record
binds to (bmig.identity).

It writes what it is told: which target and whether it may grow is
bmig.receiver.opening's decision.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
from typing import Callable

import xxhash

from bmig.blockdev import zero_range
from bmig.errors import ConfigError, TargetBusy, TargetError, TargetFull
from bmig.identity import TargetIdentity, identify
from bmig.statelock import flock_within

HASH_READ = 4 * 1024 * 1024
LOCK_WAIT = 5.0        # seconds a new session waits for the target's previous one


# Writes into pages new to the page cache cost the kernel five to seven times the CPU per
# byte in pieces of 512 KiB or more than in pieces of 256 KiB or less (dd into a fresh
# file on ext4, Linux 6.18 in a VM with free page reporting: 1.9-2.3 s against 0.35-0.46 s
# of system time per GiB). A fresh target is all such pages, and frames are up to 4 MiB,
# so they are written in pieces; on cached pages the piece size made no difference.
WRITE_PIECE = 256 * 1024

def io_error(exc: OSError, what: str) -> TargetError:
    """ENOSPC and friends become TargetFull; everything else TargetError."""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        return TargetFull(f"{what}: {exc.strerror}")
    return TargetError(f"{what}: {exc.strerror or exc}")


class TargetLock:
    """``kind`` "" is the pass lock, "replica" the replication session's own."""

    def __init__(self, state_dir: str, export: str, kind: str = ""):
        self.state_dir = state_dir
        self.export = export
        self.kind = kind
        self.path = _lock_path(state_dir, export, kind)
        self._fd: int | None = None

    def acquire(self, wait: float = LOCK_WAIT) -> None:
        """Take the lock, waiting a little: a sender that reconnects at once after a
        failure finds its old session still closing."""
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        if not flock_within(fd, wait):
            os.close(fd)
            what = "replicated" if self.kind else "written"
            raise TargetBusy(f"target {self.export!r} is being {what} by another "
                             "session; try again when it is done")
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def other_session(self) -> bool:
        """Whether a session of the other kind (pass or replication) of this export runs
        now, in this process or another."""
        return is_locked(_lock_path(self.state_dir, self.export, "" if self.kind else "replica"))


def is_locked(path: str) -> bool:
    """Whether someone holds the flock of ``path`` (a probe that takes nothing)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)           # closing drops the probe's own shared lock


# What a target's lock files add to its export name (EXPORT.KIND.lock): an export named
# "X.record" would share X's record lock, so no export name may end in one of them.
LOCK_KINDS = ("replica", "record", "record-intent")


def _lock_path(state_dir: str, export: str, kind: str) -> str:
    return os.path.join(state_dir, export + (f".{kind}" if kind else "") + ".lock")


def clashes_with_lock_files(export: str) -> bool:
    """An export name that another export's lock files would share (``LOCK_KINDS``)."""
    return export.endswith(tuple(f".{kind}" for kind in LOCK_KINDS))


class RecordLock:
    """Orders changes of a target's lineage against the writes of sessions that check it:
    a session that changes the record (replication or a pass beginning or ending, a
    promotion, a rejoin) holds it exclusively while it does; a session writing data holds it shared from its check of
    the record to the last write of a batch of frames (bmig.receiver.lineagewatch). So
    no write lands after the record it was checked against has changed
    (``EXPORT.record.lock``).

    flock gives an exclusive taker that waits no priority over new shared ones, so two
    sessions streaming batches could keep it out for good. Every taker therefore passes
    through a second lock first (``EXPORT.record-intent.lock``): an exclusive taker holds
    it exclusively until it has the record lock, a shared taker takes it shared only to
    get in. Once an exclusive taker holds the intent lock, no new shared holder gets in,
    and it waits for the batches under way only. One hold at a time per object: taking it again (a
    shared hold turned exclusive, then dropped by its release) is refused."""

    def __init__(self, state_dir: str, export: str):
        self.path = _lock_path(state_dir, export, "record")
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            self._intent_fd = os.open(_lock_path(state_dir, export, "record-intent"),
                                      os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except BaseException:
            os.close(self._fd)
            raise
        self._held = False

    def acquire(self, exclusive: bool) -> None:
        if self._held:
            raise RuntimeError(f"{self.path} is held already by this session")
        mode = fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH
        fcntl.flock(self._intent_fd, mode)
        try:
            fcntl.flock(self._fd, mode)
        finally:
            fcntl.flock(self._intent_fd, fcntl.LOCK_UN)
        self._held = True

    def release(self) -> None:
        self._held = False
        fcntl.flock(self._fd, fcntl.LOCK_UN)

    @contextlib.contextmanager
    def held(self, exclusive: bool):
        self.acquire(exclusive)
        try:
            yield
        finally:
            self.release()

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            os.close(self._intent_fd)
            self._fd = self._intent_fd = -1


def file_system_size(path: str) -> int:
    """The size of the file system that holds ``path`` (a file or a directory)."""
    st = os.statvfs(path)
    return st.f_blocks * st.f_frsize


class TargetDevice:
    """The target's bytes: written, zeroed, synced and hashed at byte offsets."""

    def __init__(self, path: str, fd: int):
        self.path = path
        self.fd = fd
        # Set by a session whose writes are checked against the record: called before
        # each write (LineageWatch.hold; the session lets go at the end of its batch).
        self.before_write: Callable[[], None] | None = None
        try:
            try:
                self.identity: TargetIdentity = identify(fd)
            except ValueError:
                raise ConfigError(f"target {path} is neither a file nor a block device") \
                    from None
        except BaseException:
            os.close(fd)
            raise

    @property
    def size(self) -> int:
        return self.identity.size

    @property
    def is_block(self) -> bool:
        return self.identity.kind == "block"

    @classmethod
    def open(cls, path: str, writable: bool = True,
             claim_shared: Callable[[], bool] = lambda: False) -> "TargetDevice | None":
        """The target as it is, or None when no file is there (nothing is created). A
        writable block device is claimed (O_EXCL); if that fails with EBUSY, it is used
        only when ``claim_shared`` says another session of the same export holds the
        claim, and refused otherwise (mounted, or used by another program)."""
        flags = (os.O_RDWR | os.O_EXCL) if writable else os.O_RDONLY
        try:
            fd = os.open(path, flags | os.O_CLOEXEC)   # O_EXCL without O_CREAT: block
        except FileNotFoundError:                      # devices only (Linux)
            return None
        except OSError as exc:
            if exc.errno != errno.EBUSY or not writable:
                raise ConfigError(f"cannot open target {path}: {exc.strerror}") from None
            if not claim_shared():
                raise TargetBusy(f"target {path} is in use (mounted, or opened exclusively "
                                 "by another program): breceive writes only to a device "
                                 "nobody else uses") from None
            try:
                fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
            except OSError as exc:
                raise ConfigError(f"cannot open target {path}: {exc.strerror}") from None
        return cls(path, fd)

    @classmethod
    def create(cls, path: str, size: int, max_size: int | None) -> "TargetDevice":
        """A new file of ``size`` bytes (sparse), durable in its directory."""
        directory = os.path.dirname(os.path.abspath(path))
        _check_cap(path, size, max_size, directory)
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise ConfigError(f"cannot create target {path}: {exc.strerror}") from None
        try:
            os.ftruncate(fd, size)
            os.fsync(fd)
            _fsync_dir(directory)
        except OSError as exc:
            os.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(path)
            raise io_error(exc, f"cannot create {path} with {size} bytes") from None
        return cls(path, fd)

    def grow(self, size: int, max_size: int | None) -> None:
        """Extend a file target to ``size`` bytes (only ever for a "new" relation)."""
        assert not self.is_block and size > self.size
        _check_cap(self.path, size, max_size, self.path)
        try:
            os.ftruncate(self.fd, size)
            os.fsync(self.fd)
        except OSError as exc:
            raise io_error(exc, f"cannot extend {self.path} to {size} bytes") from None
        self.identity = identify(self.fd)

    def write(self, offset: int, data: bytes | memoryview) -> None:
        """Write ``data`` at ``offset`` in pieces of at most WRITE_PIECE bytes."""
        view = memoryview(data)
        if self.before_write is not None:
            self.before_write()
        try:
            done = 0
            while done < len(view):
                end = min(len(view), done + WRITE_PIECE)
                wrote = os.pwrite(self.fd, view[done:end], offset + done)
                if wrote <= 0:          # the end of a device: never loop on it
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
                done += wrote
        except OSError as exc:
            raise io_error(exc, f"write of {len(view)} bytes at {offset} to "
                                f"{self.path}") from None

    def zero(self, offset: int, length: int) -> None:
        if self.before_write is not None:
            self.before_write()
        try:
            zero_range(self.fd, offset, length)
        except OSError as exc:
            raise io_error(exc, f"zeroing {length} bytes at {offset} of "
                                f"{self.path}") from None

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


def _check_cap(path: str, size: int, max_size: int | None, where: str) -> None:
    """A file target never grows beyond its cap: ``max_size``, or by default the size of
    the file system that holds it (a larger file could never be filled)."""
    if max_size is None:
        try:
            max_size = file_system_size(where)
        except OSError as exc:
            raise ConfigError(f"cannot look at the file system of {path}: "
                              f"{exc.strerror}") from None
        what = "the size of its file system"
    else:
        what = "its max_size"
    if size > max_size:
        raise TargetError(f"target {path} would have to grow to {size} bytes, beyond "
                          f"{what} ({max_size} bytes): raise max_size for it, or give a "
                          "larger target")


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
