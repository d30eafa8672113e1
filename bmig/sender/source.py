"""The device being migrated, read at byte offsets (optionally with O_DIRECT), and its
holes (SEEK_DATA/SEEK_HOLE, bmig.blockdev), so that a pass ships holes as ZERO ranges.

Read-only: nothing here writes the source or talks to breqd.
"""

from __future__ import annotations

import logging
import os

from bmig.blockdev import data_runs
from bmig.errors import BmigError

log = logging.getLogger("bmigrate")


class Source:
    """The device being migrated, read at byte offsets (optionally with O_DIRECT)."""

    def __init__(self, path: str, size: int, direct: bool = False):
        self.path = path
        try:
            self.fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            raise BmigError(f"cannot open the source {path}: {exc.strerror}") from None
        self.direct_fd = -1
        if direct:
            try:
                self.direct_fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_DIRECT)
            except OSError as exc:
                log.warning("%s: O_DIRECT not possible (%s); reading through the cache",
                            path, exc.strerror)
        self.size = size
        self._known = (0, 0, False)    # (start, end, is_hole) of a range seen whole

    def read_into(self, view: memoryview, offset: int) -> None:
        fd = self.fd
        if self.direct_fd >= 0 and offset % 4096 == 0 and len(view) % 4096 == 0:
            fd = self.direct_fd
        done = 0
        while done < len(view):
            n = os.preadv(fd, [view[done:]], offset + done)
            if n == 0:
                view[done:] = bytes(len(view) - done)
                return
            done += n

    def holes(self, offset: int, length: int) -> list[tuple[int, bool]]:
        """(length, is_hole) runs of the range. SEEK_HOLE may scan far ahead (to the end
        of a file with no hole), so what it found is remembered for the next frames."""
        end = offset + length
        known_start, known_end, known_hole = self._known
        if known_start <= offset and end <= known_end:
            return [(length, known_hole)]
        runs = data_runs(self.fd, offset, length)
        if len(runs) == 1 and not runs[0][1]:
            try:
                hole = os.lseek(self.fd, offset, os.SEEK_HOLE)
                self._known = (offset, hole, False)
            except OSError:
                pass
        return runs

    def close(self) -> None:
        for fd in (self.fd, self.direct_fd):
            if fd >= 0:
                os.close(fd)
