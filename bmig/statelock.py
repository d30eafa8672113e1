"""One owner per state directory: an flock'd lock file that names its holder; and
``flock_within``, the one way bmig waits a while for an flock (a device's lock in the dm
state directory, a target's lock on the receiver).

The kernel drops the lock when the holder dies (kill -9 included), so there is no stale
lock to break; the file's text only serves the error message of a second instance.
The room may not read or write anything else in the state directory.
"""

from __future__ import annotations

import fcntl
import os
import socket
import time

from bmig.errors import StateError, StateLocked

LOCK_NAME = "breqd.lock"
LOCK_POLL = 0.05            # flock_within: seconds between tries


def flock_within(fd: int, wait: float, poll: float = LOCK_POLL) -> bool:
    """Take the exclusive flock of ``fd``, trying again every ``poll`` seconds for up
    to ``wait`` seconds: False if another holder kept it all that time (the caller
    closes ``fd`` and says who waits for what)."""
    deadline = time.monotonic() + wait
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            if time.monotonic() >= deadline:
                return False
            time.sleep(poll)


class StateLock:
    def __init__(self, directory: str, owner: str):
        self.path = os.path.join(directory, LOCK_NAME)
        self._owner = owner
        self._fd = -1

    def acquire(self) -> None:
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as exc:
            raise StateError(f"cannot open lock file {self.path}: {exc.strerror}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 4096, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise StateLocked(f"state directory {os.path.dirname(self.path)} is in use by "
                              f"{holder}; stop it first") from None
        text = f"{self._owner} pid {os.getpid()} on {socket.gethostname()}\n".encode()
        os.ftruncate(fd, 0)
        os.pwrite(fd, text, 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
