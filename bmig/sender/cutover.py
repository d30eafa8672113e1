"""The cutover: hand the workload over to the target with seconds of downtime.

    1  switch bmig-nbd to synchronous replication (protocol C by default)
    2  drain: passes until nothing is dirty but what is being written synchronously,
       and nothing is in flight (the copy is identical and stays identical); then a
       flush of both sides, so that the flush under the freeze has only what came since
    3  stop the application (--pre-handover CMD) or freeze bmig-nbd's writes (--freeze)
                                                                   downtime starts here
    4  flush both sides; wait until nothing at all is dirty, held or in flight
    5  optionally verify every chunk's hash (or a sample) against the target
    6  bmig-nbd turns read-only; the source is recorded as handed over to a new
       generation; the target takes it and becomes the primary
                                                                   downtime ends here
    7  start the application on the other side (--post-handover CMD)

A failure before step 6 stops replication, thaws, and leaves the source primary and
writable, and says so. Every step is logged and reported (a JSON event with --json).

Before step 1 the cutover takes the device's sender slot in breqd (CLAIM): a running
``bmigrate run`` (or sync) is asked to give it up, finishes what it has in flight,
closes its session on the receiver, and the claim is granted when its breqd connection
ends (at most --timeout seconds of waiting). The run then waits until the cutover is
done: handed over, it exits 0; not, it ships again (bmig.sender.converge). The hooks'
output never goes to stdout: each line is reported as a ``hook-output`` event
(bmig.sender.hooks).

If PROMOTE gets no answer (the connection is lost, the reply with it), the target may be
the primary already: the source stays read-only, and a new connection asks the receiver
for the target's record (STATUS) once no session holds the target any more. Promoted:
the handover goes on as if the answer had come. Not promoted: the source is made
writable again, as for any failure before step 6. No way to tell: HandoverUnknown (exit
16); the source is recorded as handed over, so that it stays read-only even when
bmig-nbd restarts, until the operator has looked (invariant 7: never two primaries).

It drives bmig-nbd (ManageClient) and the Migration through their public calls; it
never reaches into the migration's connections.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from bmig.errors import BmigError, HandoverUnknown, HookFailed, NotConverged, VerifyFailed
from bmig.lineage import (ROLE_HANDED_OVER, ROLE_PRIMARY, STATE_CONSISTENT, TargetRecord,
                          hex_id, new_generation, save_target)
from bmig.nbd.manage_client import ManageClient
from bmig.sender.converge import Migration
from bmig.sender.hooks import run_hook
from bmig.sender.targets import export_record

log = logging.getLogger("bmigrate")

SETTLE_POLL = 0.05           # seconds between looks at breqd while the last bits settle
SETTLE_TIMEOUT = 60.0
OUTCOME_TIMEOUT = 10.0       # PROMOTE unanswered: how long to ask the receiver what it did
OUTCOME_POLL = 0.2

PROMOTED, NOT_PROMOTED, UNKNOWN = "promoted", "not promoted", "unknown"


@dataclass
class CutoverSettings:
    manage_dir: str
    protocol: str = "C"
    policy: str = "degrade"
    pre_handover: str | None = None
    post_handover: str | None = None
    freeze: bool = False
    verify: bool = False
    verify_sample: float | None = None
    timeout: float = 600.0
    keep_writable: bool = False
    hook_timeout: float = 300.0
    record_dir: str | None = None     # write the handed-over source's target record here
    replicate_options: dict = field(default_factory=dict)


@dataclass
class CutoverResult:
    device: str
    target: str
    steps: list[dict] = field(default_factory=list)
    downtime: float | None = None
    generation: str | None = None
    handed_over: bool = False
    post_hook_failed: str | None = None

    def to_json(self) -> dict:
        return {"event": "cutover", "device": self.device, "target": self.target,
                "handed_over": self.handed_over, "downtime_seconds": self.downtime,
                "generation": self.generation, "steps": self.steps,
                "post_hook_failed": self.post_hook_failed}


class Cutover:
    def __init__(self, migration: Migration, url: str, settings: CutoverSettings,
                 report: Callable[[dict], None]):
        self.m = migration
        self.url = url
        self.s = settings
        self.report = report
        self.result = CutoverResult(migration.name, url)
        self._nbd: ManageClient | None = None
        self._frozen = False
        self._replicating = False
        self._read_only = False

    # -- the steps -----------------------------------------------------------------------

    def run(self) -> CutoverResult:
        self._nbd = self._open_control()
        self._connect()
        downtime_start = None
        try:
            self._step(1, "replicate synchronously", self._replicate)
            self._step(2, "drain", self._drain)
            downtime_start = time.monotonic()
            if self.s.pre_handover:
                self._step(3, "pre-handover hook", lambda: self._hook(self.s.pre_handover, "pre-handover"))
            if self.s.freeze or not self.s.pre_handover:
                self._step(3, "freeze writes", self._freeze)
            self._step(4, "flush both sides", self._flush)
            if self.s.verify:
                self._step(5, "verify", self._verify)
        except BaseException as exc:
            self._undo(exc)
            raise
        return self._finish_handover(downtime_start)

    def _open_control(self) -> ManageClient:
        """What the steps drive: bmig-nbd's control socket."""
        return ManageClient(self.s.manage_dir, self.m.name, timeout=self.s.timeout + 60)

    def _connect(self) -> None:
        """Take the device's sender slot (a running sender gives it up), then connect."""
        self.m.client_name = "bmigrate cutover"
        self.m.connect(claim=self.s.timeout)
        if self.m.yielded_by:
            self.report({"event": "note", "device": self.m.name, "yielded_by": self.m.yielded_by,
                         "message": f"{self.m.name}: {self.m.yielded_by} gave the device "
                                    "up for the cutover"})

    def _finish_handover(self, downtime_start: float) -> CutoverResult:
        """Steps 6 and 7, and the downtime from ``downtime_start`` to the handover."""
        self._step(6, "hand over", self._hand_over)
        self.result.downtime = round(time.monotonic() - downtime_start, 3)
        self.result.handed_over = True
        self.report({"event": "downtime", "device": self.m.name,
                     "seconds": self.result.downtime})
        if self.s.post_handover:
            try:
                self._step(7, "post-handover hook", lambda: self._hook(self.s.post_handover, "post-handover"))
            except HookFailed as exc:
                self.result.post_hook_failed = exc.message
                raise HookFailed(f"{self.m.name}: handed over (the target is primary with "
                                 f"generation {self.result.generation}), but the "
                                 f"post-handover {exc.message[0].lower()}{exc.message[1:]}; "
                                 "start the application on the target by hand") from None
        return self.result

    def _step(self, number: int, name: str, action: Callable[[], Any]) -> None:
        started = time.monotonic()
        self.report({"event": "step", "device": self.m.name, "step": number, "name": name,
                     "status": "started"})
        detail = action()
        entry = {"step": number, "name": name, "seconds": round(time.monotonic() - started, 3)}
        if isinstance(detail, dict):
            entry.update(detail)
        self.result.steps.append(entry)
        self.report({"event": "step", "device": self.m.name, "status": "done", **entry})

    def _replicate(self) -> dict:
        assert self._nbd is not None
        status = self._nbd.call("replicate", url=self.url, protocol=self.s.protocol,
                                policy=self.s.policy, options=self.s.replicate_options)
        self._replicating = True
        return {"protocol": status["protocol"]}

    def _remaining(self) -> tuple[int, dict]:
        stats = self.m.stats()
        return int(stats["dirty_bytes"]) - int(stats["mirrored_bytes"]), stats

    def _drain(self) -> dict:
        deadline = time.monotonic() + self.s.timeout
        passes = 0
        while True:
            left, stats = self._remaining()
            # At least one pass, even with nothing to ship: its end tells the receiver
            # that nothing is dirty outside the replication (the record says in-sync).
            if left <= 0 and not stats["inflight_bytes"] and passes:
                return {"passes": passes, "flush_seconds": self._flush_ahead()}
            if time.monotonic() > deadline:
                raise NotConverged(f"not converged within {self.s.timeout:g} s: "
                                   f"{left} bytes still dirty after {passes} passes")
            self._check_replication()
            if left > 0 or not passes:
                self.m.one_pass(max(left, 0), deadline=deadline)
                passes += 1
            else:
                self.m.stop.wait(SETTLE_POLL)

    def _flush_ahead(self) -> float:
        """A flush while the application still writes: what it wrote during the drain
        reaches the disks now, not in step 4, whose flush is part of the downtime."""
        assert self._nbd is not None
        started = time.monotonic()
        self._nbd.call("flush")
        return round(time.monotonic() - started, 4)

    def _check_replication(self) -> None:
        assert self._nbd is not None
        status = self._nbd.call("status")
        if not status["replicating"]:
            raise BmigError(f"replication to {self.url} stopped: {status.get('failed')}")

    def _hook(self, command: str, which: str) -> dict:
        env = dict(os.environ, BMIG_DEVICE=self.m.name, BMIG_TARGET=self.url)

        def output(stream: str, line: str) -> None:
            self.report({"event": "hook-output", "device": self.m.name, "hook": which,
                         "stream": stream, "line": line})
        run_hook(command, env, self.s.hook_timeout, output)
        return {"command": command}

    def _freeze(self) -> None:
        """A lease: bmig-nbd thaws by itself if this process dies, or after --timeout."""
        assert self._nbd is not None
        self._nbd.call("freeze", lease=self.s.timeout)
        self._frozen = True

    def _flush(self) -> dict:
        """Durable on both sides, then wait for the last holds to settle: with writes
        stopped, nothing may stay dirty, held or in flight."""
        assert self._nbd is not None
        self._nbd.call("flush")
        deadline = time.monotonic() + SETTLE_TIMEOUT
        passes = 0
        while True:
            stats = self.m.stats()
            if not (stats["dirty_bytes"] or stats["held_bytes"] or stats["inflight_bytes"]):
                return {"passes": passes}
            if time.monotonic() > deadline:
                raise NotConverged(f"{stats['dirty_bytes']} bytes still dirty "
                                   f"{SETTLE_TIMEOUT:g} s after writes stopped")
            left = int(stats["dirty_bytes"]) - int(stats["mirrored_bytes"])
            if left > 0 and not stats["held_bytes"]:
                self.m.one_pass(left)
                passes += 1
                self._nbd.call("flush")
            else:
                self.m.stop.wait(SETTLE_POLL)

    def _verify(self) -> dict:
        result = self.m.verify(self.s.verify_sample)
        if result.differing:
            raise VerifyFailed(f"verify: {len(result.differing)} of {result.chunks} chunks "
                               f"differ (first at byte "
                               f"{result.differing[0] * self.m.info.chunk_size})")
        return {"chunks_compared": result.chunks}

    def _hand_over(self) -> dict:
        """Read-only here first, then the handover recorded in breqd, then the target
        primary. The record comes before PROMOTE: were this process killed once PROMOTE
        is sent, a bmig-nbd started again must still find this source handed over and
        serve it read-only (invariant 7), until an operator has looked."""
        assert self._nbd is not None
        m = self.m
        if not self.s.keep_writable:
            self._nbd.call("read-only", value=True)
            self._read_only = True
        generation = new_generation()
        m.hand_over(generation)
        unknown: str | None = None
        try:
            target = m.promote(generation)
        except BaseException as exc:
            outcome, target, detail = self._promote_outcome(generation, exc)
            if outcome == NOT_PROMOTED:
                self.report({"event": "note", "device": m.name, "message":
                             f"{m.name}: PROMOTE was not answered ({_message(exc)}); the "
                             "target's record shows it was not promoted"})
                self._reclaim()
                self._undo(exc)
                raise
            if outcome == UNKNOWN:
                unknown = detail
            else:
                self.report({"event": "note", "device": m.name, "message":
                             f"{m.name}: PROMOTE was not answered ({_message(exc)}), but "
                             f"the target is primary with generation {hex_id(generation)}: "
                             "the handover goes on"})
        # From here the target is (or may be) the primary: the source must never write to
        # it again. What follows is done as far as it goes; a failure is reported, not
        # undone.
        self.result.generation = hex_id(generation)
        problems: list[str] = []
        for what, action in (
                ("write the handed-over record",
                 lambda: self._record_handed_over(generation) if self.s.record_dir else None),
                ("stop replicating", lambda: self._nbd.call("stop")),
                ("thaw", lambda: self._nbd.call("thaw") if self._frozen else None)):
            try:
                action()
            except (BmigError, OSError) as exc:
                problems.append(f"{what}: {getattr(exc, 'message', None) or exc}")
        state = "writable" if self.s.keep_writable else "read-only"
        if unknown is not None:
            raise HandoverUnknown(
                f"{m.name}: the handover's outcome is unknown: PROMOTE (generation "
                f"{hex_id(generation)}) got no answer, and {unknown}; this source is "
                f"{state} and recorded as handed over until you know"
                + (f" ({'; '.join(problems)})" if problems else "") + ". Ask the target "
                f"(bmigrate status {m.name} --to URL): if it is primary with that "
                "generation, the handover happened; if not, make this source primary "
                f"again (bmigrate track set-role {m.name} primary, then restart bmig-nbd)")
        if problems:
            raise BmigError(f"{m.name}: handed over (the target is primary with generation "
                            f"{hex_id(generation)}; this source is {state}), but "
                            + "; ".join(problems))
        return {"generation": hex_id(generation), "target_role": target.get("role")}

    def _promote_outcome(self, generation: int,
                         why: BaseException) -> tuple[str, dict, str]:
        """PROMOTE failed without a clear answer: what did the receiver do? Our
        connection is closed first, so that the session that got the PROMOTE ends; then
        a new one asks for the target's record until no session holds the target (its
        record can no longer change). (outcome, the record, what stood in the way)."""
        m = self.m
        self.report({"event": "note", "device": m.name, "message":
                     f"{m.name}: PROMOTE got no answer ({_message(why)}); this source is "
                     "left as it is while the receiver is asked what it did"})
        m.close_target()
        deadline = time.monotonic() + OUTCOME_TIMEOUT
        problem = "the receiver could not be asked"
        while True:
            try:
                record = export_record(m.url, m.options)
                if record is None:
                    problem = f"the receiver has no record of {m.url.export!r}"
                else:
                    if record.get("role") == ROLE_PRIMARY \
                            and record.get("generation") == hex_id(generation):
                        return PROMOTED, record, ""
                    if record.get("busy") is False and record.get("role") != ROLE_PRIMARY \
                            and record.get("generation") == hex_id(m.info.generation):
                        return NOT_PROMOTED, record, ""
                    problem = ("a session still holds the target" if record.get("busy")
                               else f"the target's record says {record.get('role')} with "
                                    f"generation {record.get('generation')}")
            except BmigError as exc:
                problem = f"the receiver could not be asked ({exc.message})"
            if time.monotonic() >= deadline or m.stop.is_set():
                return UNKNOWN, {}, problem
            m.stop.wait(OUTCOME_POLL)

    def _record_handed_over(self, generation: int) -> None:
        """A target record for this device, as breceive would keep it, so that a
        fail-back from the new primary ships only what changed there. It names the
        source file or device by its identity (invariant 9), as breceive will see it."""
        info = self.m.info
        assert self.s.record_dir is not None
        os.makedirs(self.s.record_dir, mode=0o700, exist_ok=True)
        record = TargetRecord(self.m.name, info.device_id, info.generation, STATE_CONSISTENT,
                              ROLE_HANDED_OVER, info.size, time.time(), 0,
                              list(info.previous), generation,
                              identity=self.m.source_identity())
        save_target(self.s.record_dir, record)

    def _reclaim(self) -> None:
        """The target was not promoted: this source is the primary again in breqd."""
        try:
            self.m.reclaim()
        except BmigError as exc:
            log.error("%s: could not record this source as primary again (%s); it stays "
                      "handed over in breqd: bmigrate track set-role %s primary",
                      self.m.name, exc.message, self.m.name)

    def _undo(self, why: BaseException) -> None:
        """Before the handover: the source stays primary and writable."""
        if self._nbd is None:
            return
        for op, done in (("read-only", self._read_only), ("stop", self._replicating),
                         ("thaw", self._frozen)):
            if not done:
                continue
            try:
                self._nbd.call(op, value=False) if op == "read-only" else self._nbd.call(op)
            except BmigError as exc:
                log.error("while undoing: %s failed: %s", op, exc.message)
        self._read_only = self._replicating = self._frozen = False
        message = why.message if isinstance(why, BmigError) else str(why) or type(why).__name__
        self.report({"event": "note", "device": self.m.name,
                     "message": f"{self.m.name}: cutover stopped ({message}); the source "
                                "stays primary and writable"})

    def close(self) -> None:
        if self._nbd is not None:
            self._nbd.close()
        self.m.close()


def _message(exc: BaseException) -> str:
    return exc.message if isinstance(exc, BmigError) else str(exc) or type(exc).__name__
