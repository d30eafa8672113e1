"""The remote command's stderr: logged line by line to the ``bmig.remote`` logger
(``remote: ...``), with its tail kept for the one-line hint when the command ends at
once (bmig.wire.ssh.hints). Both transports feed it; it reads nothing itself.
"""

from __future__ import annotations

import collections
import logging
import threading
from typing import Callable, Iterable

remote_log = logging.getLogger("bmig.remote")
STDERR_TAIL_LINES = 20
STDERR_READ_SIZE = 64 << 10


class RemoteLog:
    """Turns the remote command's stderr into ``remote: ...`` log lines, keeping a tail."""

    def __init__(self, logger: logging.Logger = remote_log):
        self.logger = logger
        self.tail: collections.deque[str] = collections.deque(maxlen=STDERR_TAIL_LINES)
        self._partial = b""

    def feed(self, data: bytes) -> None:
        *lines, self._partial = (self._partial + data).split(b"\n")
        for line in lines:
            self.line(line)

    def finish(self) -> None:
        if self._partial:
            self.line(self._partial)
            self._partial = b""

    def line(self, raw: bytes) -> None:
        text = raw.decode(errors="replace").rstrip("\r")
        self.tail.append(text)
        self.logger.info("remote: %s", text)


def start_daemon(target: Callable[[], None], name: str) -> threading.Thread:
    thread = threading.Thread(target=target, name=name, daemon=True)
    thread.start()
    return thread


def last_line(lines: Iterable[str]) -> str | None:
    for line in reversed(list(lines)):
        if line.strip():
            return line.strip()
    return None
