"""What a running ``bmigrate run`` says of itself, where ``bmigrate status``, ``events``
and ``metrics`` read it: the part ``service`` of a device's status (bmig.devicestate).

In the status directory (default /run/bmig/migrate, or BMIG_STATUS_DIR):

    NAME.json   the service's state, replaced whole (a temporary file renamed over it,
                so a reader sees the old or the new, never half); not synced: it
                describes a running process, and /run does not outlive a boot
    NAME.lock   write-locked (an open file description lock, F_OFD_SETLK) by the run
                for as long as it runs, mode 0600, holding its pid and start time. The
                kernel lets go when the process dies (kill -9 included). A reader only
                asks whether a lock is held (F_OFD_GETLK), taking none, so no reader
                can keep a run from publishing; a state no run holds reads "not
                running" with the last known fields

Both files are written without following a symbolic link planted in the directory:
NAME.json through a fresh temporary file (mkstemp) renamed over it, NAME.lock opened
with O_NOFOLLOW and used only when it is a regular file of ours.

Publishing is never worth stopping the service for: a directory that cannot be
written is logged once and the run goes on without publishing; while another process
holds the lock (a second run of the same device), the run says so once and tries again
at each write, publishing from the moment the lock is free.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import stat
import struct
import tempfile
from typing import Any

from bmig.config import read_json_state
from bmig.errors import ConfigError
from bmig.procinfo import start_time

log = logging.getLogger("bmigrate")

JSON_SUFFIX = ".json"
FINAL = ("stopped", "failed")         # states a run says last, as it ends
LOCK_SUFFIX = ".lock"
# struct flock (Linux, 64-bit off_t): l_type, l_whence, l_start, l_len, l_pid.
_FLOCK = struct.Struct("hhqqi4x")
_WHOLE_FILE_WRITE_LOCK = _FLOCK.pack(fcntl.F_WRLCK, os.SEEK_SET, 0, 0, 0)


def replace_file(path: str, data: bytes, mode: int) -> None:
    """Replace ``path`` with ``data`` (mode ``mode``): a fresh temporary file in the same
    directory (O_EXCL, so a planted name or link is never opened), fchmod, rename. Not
    synced: for files that describe the running system. OSError for the caller."""
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(path)}.")
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), mode)
            f.write(data)
        os.rename(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def paths(directory: str, name: str) -> tuple[str, str]:
    """(NAME.json, NAME.lock) in ``directory``; ``name`` is a checked device name."""
    return (os.path.join(directory, name + JSON_SUFFIX),
            os.path.join(directory, name + LOCK_SUFFIX))


class Publisher:
    """The run's side: the lock for its lifetime, and the file replaced at each write."""

    def __init__(self, directory: str, name: str):
        self.directory = directory
        self.name = name
        self.path, self.lock_path = paths(directory, name)
        self._lock_fd = -1
        self._failed: str | None = None     # why publishing stopped (logged once)
        self._waiting: str | None = None    # who holds the lock (logged once), tried again

    @property
    def publishing(self) -> bool:
        return self._lock_fd >= 0 and self._failed is None

    def open(self) -> bool:
        """Create the directory and take the lock; False (and a warning) when the
        directory cannot be used, or while another process holds the lock (then each
        write tries again)."""
        try:
            os.makedirs(self.directory, mode=0o755, exist_ok=True)
            fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW
                         | os.O_NONBLOCK | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            self._give_up(f"cannot use {self.lock_path}: {exc.strerror}")
            return False
        try:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode) or info.st_uid != os.geteuid():
                raise ConfigError(f"{self.lock_path} is not a regular file of this user")
            os.fchmod(fd, 0o600)
            fcntl.fcntl(fd, fcntl.F_OFD_SETLK, _WHOLE_FILE_WRITE_LOCK)
        except (OSError, ConfigError) as exc:
            busy = isinstance(exc, OSError) and exc.errno in (errno.EAGAIN, errno.EACCES)
            holder = _holder(fd) if busy else ""
            os.close(fd)
            if busy:
                self._wait(f"{holder or 'another process'} holds {self.lock_path}")
            elif isinstance(exc, ConfigError):
                self._give_up(exc.message)
            else:
                self._give_up(f"cannot lock {self.lock_path}: {exc.strerror}")
            return False
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()} {start_time(os.getpid())}\n".encode(), 0)
        self._lock_fd = fd
        if self._waiting is not None:
            log.warning("%s: publishing its state for bmigrate status now", self.name)
            self._waiting = None
        return True

    def write(self, part: dict[str, Any]) -> None:
        if self._lock_fd < 0 and self._failed is None and self._waiting is not None:
            self.open()                     # the lock was held: maybe it is free now
        if not self.publishing:
            return
        try:
            replace_file(self.path, (json.dumps(part, sort_keys=True) + "\n").encode(),
                         0o644)
        except OSError as exc:
            self._give_up(f"cannot write {self.path}: {exc.strerror}")

    def close(self) -> None:
        """Let go of the lock; the file stays, with what the last write said."""
        if self._lock_fd >= 0:
            os.close(self._lock_fd)
            self._lock_fd = -1

    def _wait(self, why: str) -> None:
        if self._waiting is None:
            log.warning("%s: not publishing its state for bmigrate status while %s; "
                        "trying again at each change", self.name, why)
        self._waiting = why

    def _give_up(self, why: str) -> None:
        if self._failed is None:
            log.warning("%s: not publishing its state for bmigrate status: %s", self.name,
                        why)
        self._failed = why


def _holder(fd: int) -> str:
    """"pid N" of the run that holds the lock, as it wrote in the file, when that process
    still lives (same pid, same start time); "" when the file does not say who."""
    try:
        words = os.pread(fd, 64, 0).decode("ascii").split()
        pid, started = int(words[0]), int(words[1])
    except (OSError, UnicodeDecodeError, ValueError, IndexError):
        return ""
    return f"pid {pid}" if pid > 0 and started and start_time(pid) == started else ""


def running(directory: str, name: str) -> bool:
    """Whether a process holds NAME.lock (the run that published NAME.json is alive).
    Only asks (F_OFD_GETLK): a reader takes no lock, so it never keeps a run from
    taking its own."""
    _, lock_path = paths(directory, name)
    try:
        fd = os.open(lock_path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return False
        answer = fcntl.fcntl(fd, fcntl.F_OFD_GETLK, _WHOLE_FILE_WRITE_LOCK)
    except OSError:
        return False
    finally:
        os.close(fd)
    return _FLOCK.unpack(answer)[0] != fcntl.F_UNLCK


def read(directory: str, name: str) -> dict[str, Any] | None:
    """What the run of NAME last published (None: nothing); "not running" when the run
    is gone without a last word (stopped or failed); ``{"state": "unreadable", "error":
    ...}`` when the file is damaged."""
    path, _ = paths(directory, name)
    alive = running(directory, name)      # first: a run that ends meanwhile wrote last
    try:
        part = read_json_state(path)
    except ConfigError as exc:
        return {"state": "unreadable", "error": exc.message}
    if part is None:
        return None
    if part.get("state") not in FINAL and not alive:
        part = {**part, "state": "not running",
                "message": f"not running (the last word of pid {part.get('pid')} was "
                           f"{part.get('state')!r})"}
    return part
