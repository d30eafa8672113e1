"""What a running ``bmigrate run`` says of itself, where ``bmigrate status``, ``events``
and ``metrics`` read it: the part ``service`` of a device's status (bmig.devicestate).

In the status directory (default /run/bmig/migrate, or BMIG_STATUS_DIR):

    NAME.json   the service's state, replaced whole (a temporary file renamed over it,
                so a reader sees the old or the new, never half); not synced: it
                describes a running process, and /run does not outlive a boot
    NAME.lock   flock'ed by the run for as long as it runs. The kernel lets go when the
                process dies (kill -9 included), so a reader that can take the lock
                knows that what NAME.json says is no longer going on: it reads
                "not running" with the last known fields

Publishing is never worth stopping the service for: a directory that cannot be
written, or a second run of the same device holding the lock, is logged once and the
run goes on without publishing.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
from typing import Any

from bmig.config import read_json_state
from bmig.errors import ConfigError

log = logging.getLogger("bmigrate")

JSON_SUFFIX = ".json"
FINAL = ("stopped", "failed")         # states a run says last, as it ends
LOCK_SUFFIX = ".lock"


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

    @property
    def publishing(self) -> bool:
        return self._lock_fd >= 0 and self._failed is None

    def open(self) -> bool:
        """Create the directory and take the lock; False (and a warning) when another
        process holds it or the directory cannot be used."""
        try:
            os.makedirs(self.directory, mode=0o755, exist_ok=True)
            fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            self._give_up(f"cannot use {self.directory}: {exc.strerror}")
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                self._give_up(f"another bmigrate run (pid {holder}) publishes the state "
                              f"of {self.name} in {self.directory}")
            else:
                self._give_up(f"cannot lock {self.lock_path}: {exc.strerror}")
            return False
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._lock_fd = fd
        return True

    def write(self, part: dict[str, Any]) -> None:
        if not self.publishing:
            return
        tmp = os.path.join(self.directory, f".{self.name}{JSON_SUFFIX}.tmp")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
            with os.fdopen(fd, "w") as f:
                f.write(json.dumps(part, sort_keys=True) + "\n")
            os.rename(tmp, self.path)
        except OSError as exc:
            self._give_up(f"cannot write {self.path}: {exc.strerror}")

    def close(self) -> None:
        """Let go of the lock; the file stays, with what the last write said."""
        if self._lock_fd >= 0:
            os.close(self._lock_fd)
            self._lock_fd = -1

    def _give_up(self, why: str) -> None:
        if self._failed is None:
            log.warning("%s: not publishing its state for bmigrate status: %s", self.name,
                        why)
        self._failed = why


def running(directory: str, name: str) -> bool:
    """Whether a process holds NAME.lock (the run that published NAME.json is alive)."""
    _, lock_path = paths(directory, name)
    try:
        fd = os.open(lock_path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError as exc:
        return exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN)
    finally:
        os.close(fd)
    return False


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
