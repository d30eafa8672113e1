"""A replication session kept to the lineage it opened with (invariant 7): each write is
checked against the target's record under the record lock, and an idle session looks
at the record every WATCH_INTERVAL seconds, so that a promotion, or a discard by another
session, ends the replication of the old lineage. It reads records; it never writes one.

The frames one read brought are written as a batch under one check: the batch's first
write takes the record lock, shared, and checks the record (``hold``); the lock stays
taken to the batch's last write, so the record cannot change in between (a session that
changes it takes the lock exclusively), and the session lets go (``let_go``) before
anything that may wait on its peer (a read from the socket, a send) and before any other
message. A session that changes the record goes before batches not yet begun
(RecordLock), so it waits for the batches under way only, each bounded by the session
(bmig.receiver.session: BATCH_FRAMES, BATCH_BYTES).
"""

from __future__ import annotations

import os
import threading
from typing import Callable

from bmig.errors import BmigError, LineageError
from bmig.lineage import ROLE_PRIMARY, hex_id, load_target, target_path
from bmig.lineage import relation as lineage_relation
from bmig.receiver.target import RecordLock

WATCH_INTERVAL = 1.0     # seconds between looks at the record of an idle replication session


class LineageWatch(threading.Thread):
    """Keeps a replication session to the lineage it opened with. Each write is checked
    against the target's record under the record lock (shared; a session that changes
    the lineage holds it exclusively), and this thread looks at the record every
    WATCH_INTERVAL seconds, so that an idle session ends too: a promotion, or a discard
    by another session, ends the replication of the old lineage (invariant 7)."""

    def __init__(self, state_dir: str, export: str, record_lock: RecordLock, source_id: int,
                 generation: int, previous: list[int], fail: Callable[[BmigError], None]):
        super().__init__(name="lineage watch", daemon=True)
        self._fail = fail                 # ends the session, telling the sender why
        self._record_lock = record_lock
        self._state_dir = state_dir
        self._export = export
        self._path = target_path(self._state_dir, self._export)
        self._source = (source_id, generation, previous)
        self._seen: tuple[int, int, int] | None | str = "not yet"   # read at the first check
        self._check_lock = threading.Lock()
        self._stopping = threading.Event()
        self._holding = False     # the session's thread holds the record lock, checked

    def _stat(self) -> tuple[int, int, int] | None:
        try:
            st = os.stat(self._path)
        except FileNotFoundError:
            return None
        return st.st_ino, st.st_mtime_ns, st.st_size       # a new file at each save

    def check(self) -> None:
        """LineageError when the record no longer holds this session's lineage."""
        with self._check_lock:
            seen = self._stat()
            if seen == self._seen:
                return
            record = load_target(self._state_dir, self._export)
            if lineage_relation(record, *self._source) == "foreign":
                what = ("is the primary now" if record.role == ROLE_PRIMARY
                        else "holds another lineage now")
                raise LineageError(f"target {self._export!r} {what} (generation "
                                   f"{hex_id(record.generation)} of "
                                   f"{hex_id(record.source_device_id)}): this replication "
                                   "session of generation "
                                   f"{hex_id(self._source[1])} ends")
            self._seen = seen

    def hold(self) -> None:
        """Before each write (TargetDevice.before_write, the session's thread): at a
        batch's first write the record lock is taken shared and the record checked, and
        kept until ``let_go``; nothing more at the batch's other writes."""
        if self._holding:
            return
        self._record_lock.acquire(exclusive=False)
        try:
            self.check()
        except BaseException:
            self._record_lock.release()
            raise
        self._holding = True

    def let_go(self) -> None:
        """The end of a batch: the record lock released (nothing if not held)."""
        if self._holding:
            self._holding = False
            self._record_lock.release()

    def run(self) -> None:
        while not self._stopping.wait(WATCH_INTERVAL):
            try:
                self.check()
            except BmigError as exc:
                self._fail(exc)
                return

    def stop(self) -> None:
        self._stopping.set()
        if self is not threading.current_thread():
            self.join(timeout=10)
