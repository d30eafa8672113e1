"""FLUSH(seq) answered DURABLE(seq) once fdatasync has returned for everything written
before it (invariants 3 and 5), in a thread of its own, so that receiving goes on while
the disk flushes. Requests that queue up meanwhile are answered by one fdatasync.
What it syncs and where it answers are the session's (bmig.receiver.session).
"""

from __future__ import annotations

import queue
import threading
from typing import Callable

from bmig.errors import BmigError


class Syncer(threading.Thread):
    """fdatasync on request, then DURABLE for the highest seq asked for."""

    def __init__(self, sync: Callable[[], None], durable: Callable[[int], None],
                 fail: Callable[[BmigError, int], None]):
        super().__init__(name="syncer", daemon=True)
        self._sync = sync                 # fdatasync of the target (and what it needs)
        self._durable = durable           # DURABLE(seq) to the sender
        self._fail = fail                 # ERROR(seq), fatal: the session ends
        self._requests: queue.Queue[int | None] = queue.Queue()
        self.failed: BmigError | None = None

    def request(self, seq: int) -> None:
        self._requests.put(seq)

    def stop(self) -> None:
        self._requests.put(None)
        self.join()

    def run(self) -> None:
        while True:
            seq = self._requests.get()
            if seq is None:
                return
            while True:                       # coalesce what queued up meanwhile
                try:
                    more = self._requests.get_nowait()
                except queue.Empty:
                    break
                if more is None:
                    self._requests.put(None)
                    break
                seq = max(seq, more)
            try:
                self._sync()
                self._durable(seq)
            except BmigError as exc:
                self.failed = exc
                self._fail(exc, seq)
                return
