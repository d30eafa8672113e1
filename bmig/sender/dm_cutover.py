"""The cutover of a dm-tracked device: by freezing it, or through bmig-nbd with protocol C
(docs/dm-intercept.md).

By freezing (DmFreezeCutover):

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

Through bmig-nbd (DmNbdCutover), for a write load the freeze's drain cannot keep up with:

    0  the device's table switched onto /dev/nbdX, served by bmig-nbd on the era device
       (one suspend and resume); one import takes what was written before
    1-7  the NBD cutover as it is: protocol C, drain, freeze, flush, verify, hand over;
       but the freeze is the device's (its file system frozen, as in the freeze cutover)
       and the read-only table waits in its inactive slot, so the resume after the
       handover puts the device on it, past bmig-nbd
    8  the device taken off bmig-nbd: its leg stopped after a handover, the device back
       onto the era device (writable, tracked by dm-era) after a failure
"""

from __future__ import annotations

import os
import time
from typing import Any

from bmig.dm.intercept import DmIntercept
from bmig.errors import BmigError, NotConverged
from bmig.nbd.manage_client import ManageClient
from bmig.sender.converge import Migration
from bmig.sender.cutover import SETTLE_TIMEOUT, Cutover, CutoverResult, CutoverSettings


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


class DmNbdControl:
    """bmig-nbd's control calls for a device on the NBD leg: freeze and thaw are the dm
    device's (DmControl), the read-only switch both bmig-nbd's and the device's next
    table; the rest is bmig-nbd's."""

    def __init__(self, nbd: ManageClient, dm: DmControl):
        self.nbd, self.dm = nbd, dm

    def call(self, op: str, **fields: Any) -> dict:
        if op in ("freeze", "thaw"):
            return self.dm.call(op)
        reply = self.nbd.call(op, **fields)
        if op == "read-only":
            self.dm.call(op, **fields)
        return reply

    def close(self) -> None:
        try:
            self.dm.close()
        finally:
            self.nbd.close()


class DmNbdCutover(Cutover):
    """The NBD cutover on a dm device whose table was switched onto bmig-nbd for it."""

    def __init__(self, migration: Migration, url: str, settings: CutoverSettings,
                 report, nbd_device: str | None = None):
        super().__init__(migration, url, settings, report)
        self.nbd_device = nbd_device

    def run(self) -> CutoverResult:
        assert self.m.intercept is not None
        self._step(0, "switch the device onto bmig-nbd", self._enter)
        try:
            result = super().run()
        except BaseException as exc:
            self._leave_after_failure(exc)
            raise
        try:
            self._step(8, "switch the device off bmig-nbd", self._leave)
        except BmigError as exc:
            raise BmigError(f"{self.m.name}: handed over (the target is primary with "
                            f"generation {result.generation}), but {exc.message}; the "
                            "device stays on bmig-nbd, read-only: bmigrate track detach "
                            f"{self.m.name} takes it off") from None
        return result

    def _open_control(self) -> DmNbdControl:                  # type: ignore[override]
        assert self.m.intercept is not None
        return DmNbdControl(super()._open_control(), DmControl(self.m.intercept,
                                                               self.s.timeout))

    def _enter(self) -> dict:
        done = self.m.intercept.enter_nbd(self.nbd_device)       # type: ignore[union-attr]
        self.s.manage_dir = done["manage_dir"]
        return {"nbd_device": done["nbd_device"], "held_seconds": done["held_seconds"],
                "imported_bytes": done["imported_bytes"]}

    def _leave(self) -> dict:
        """The handover's control connection closed first: bmig-nbd is about to stop."""
        if self._nbd is not None:
            self._nbd.close()
            self._nbd = None
        done = self.m.intercept.leave_nbd()                       # type: ignore[union-attr]
        return {"held_seconds": done["held_seconds"], "read_only": done["read_only"]}

    def _leave_after_failure(self, why: BaseException) -> None:
        """The way back. Cutover's undo made bmig-nbd writable and thawed it already (or,
        after a handover, left it read-only); leave_nbd looks at breqd's role itself."""
        try:
            done = self._leave()
        except BmigError as exc:
            self.report({"event": "note", "device": self.m.name, "message":
                         f"{self.m.name}: the device could not be taken off bmig-nbd "
                         f"({exc.message}); it still maps onto it: bmigrate track detach "
                         f"{self.m.name}, or cutover again"})
            return
        self.report({"event": "note", "device": self.m.name, "message":
                     f"{self.m.name}: the device is back on dm-era"
                     + (" (read-only: handed over)" if done["read_only"] else "")})
