"""The cutover of a dm-tracked device by freezing it (docs/dm-intercept.md).

    1  drain: import and pass until the copy trails by less than the threshold
       (NotConverging, exit 10, if writes outpace shipping: use --via-nbd)
    3  stop the application (--pre-handover CMD), then freeze: ``dmsetup suspend`` (its
       file system frozen first) holds every I/O; a lease resumes it if bmigrate dies
                                                                   downtime starts here
    4  the last import (nothing can be written any more), passes until nothing is dirty
       or in flight: the copy is identical
    5  optionally verify every chunk's hash (or a sample) against the target
    6  the device's next table fails writes (reads still work); the target gets a new
       generation and becomes the primary; the source is recorded as handed over; the
       device resumes on the read-only table
                                                                   downtime ends here
    7  start the application on the other side (--post-handover CMD)

The control object stands in for bmig-nbd's control socket, so that the handover's
steps and their undoing are the NBD cutover's own (bmig.sender.cutover).
"""

from __future__ import annotations

import os
import time
from typing import Any

from bmig.dm.intercept import DmIntercept
from bmig.errors import NotConverged
from bmig.sender.cutover import SETTLE_TIMEOUT, Cutover


class DmControl:
    """bmig-nbd's control calls, done on the dm device."""

    def __init__(self, intercept: DmIntercept, lease: float):
        self.intercept = intercept
        self.lease = lease
        self.freeze_seconds: float | None = None

    def call(self, op: str, **fields: Any) -> dict:
        i = self.intercept
        if op == "freeze":
            self.freeze_seconds = i.freeze(self.lease)
        elif op == "thaw":
            i.thaw()
        elif op == "read-only":
            if fields.get("value"):
                i.load_read_only()
            else:
                i.clear_read_only()
        elif op == "flush":
            record = i.record()
            if record is not None:
                fd = os.open(f"/dev/mapper/{record.device}", os.O_RDONLY | os.O_CLOEXEC)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
        elif op == "status":
            return {"replicating": True}
        elif op in ("stop", "replicate"):
            pass
        else:
            raise ValueError(op)
        return {}

    def close(self) -> None:
        self.intercept.thaw()


class DmFreezeCutover(Cutover):
    def run(self):
        assert self.m.intercept is not None
        self._nbd = DmControl(self.m.intercept, self.s.timeout)   # type: ignore[assignment]
        self._connect()
        downtime_start = None
        try:
            self._step(2, "drain", self._drain)
            if self.s.pre_handover:
                self._step(3, "pre-handover hook", lambda: self._hook(self.s.pre_handover, "pre-handover"))
            downtime_start = time.monotonic()
            self._step(3, "freeze the device", self._freeze)
            self._step(4, "last import and passes", self._flush)
            if self.s.verify:
                self._step(5, "verify", self._verify)
        except BaseException as exc:
            self._undo(exc)
            raise
        return self._finish_handover(downtime_start)

    def _drain(self) -> dict:
        # Converged when what is left ships in a second: the freeze takes the rest.
        self.m.settings.threshold_seconds = max(self.m.settings.threshold_seconds or 0, 1.0)
        summary = self.m.sync()
        return {"passes": summary.passes, "dirty_bytes": summary.dirty_bytes}

    def _flush(self) -> dict:
        """Frozen: the last import takes everything ever written, then passes until
        nothing is dirty or in flight."""
        deadline = time.monotonic() + SETTLE_TIMEOUT
        imported = self.m.intercept.import_eras()           # type: ignore[union-attr]
        passes = 0
        while True:
            stats = self.m.stats()
            dirty = int(stats["dirty_bytes"]) + int(stats["inflight_bytes"])
            if not dirty:
                return {"passes": passes, "imported_bytes": imported.bytes_marked}
            if time.monotonic() > deadline:
                raise NotConverged(f"{dirty} bytes still dirty {SETTLE_TIMEOUT:g} s after "
                                   "the device was frozen")
            self.m.one_pass(int(stats["dirty_bytes"]))
            passes += 1

    def close(self) -> None:
        try:
            if self._nbd is not None:
                self._nbd.close()
        finally:
            self.m.close()
