"""Promotion without the source: the copy on this host becomes the primary.

``bmigrate promote NAME`` runs it on the receiving host when the source is gone (a
failover, as DRBD's ``drbdadm primary`` on the surviving node). It works on the state
directory breceive keeps, under the locks breceive's sessions take, so breceive may run
or not:

1. the record must hold a copy (not new, not primary already, not a former primary);
   an inconsistent copy (a pass was being applied: chunks of different moments) is
   refused unless ``force_inconsistent``;
2. a source still connected (a session holds the target: replication or a pass) is
   refused unless ``force_connected``: two primaries must never write;
3. the target lock is taken (a session that is ending is waited for a moment), and the
   target is opened and must be the file or device its record describes (invariant 9);
4. only then, every check passed, the fence hook runs (power the old host off, take a
   reservation...), through the runner the caller gives (bmigrate's: its output never on
   stdout, its whole process group killed at the timeout); when it fails the promotion
   stops, unless ``no_fence``;
5. under the record lock: the record is still the one checked, the target still the one
   it describes, fdatasync, a new generation (the old one first in ``previous``), role
   primary. A session of the old source still open ends at its next batch of writes
   (its lineage is checked under the same lock) or within a second;
6. the report says what may have been lost (``loss``).

So a refusal (a typo in the target, a copy in use) never leaves a fenced old primary and
no new one. It reads and writes one target's record and its locks; it never talks to a
sender.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Callable

from bmig.errors import ConfigError, HookFailed, LineageError, TargetBusy
from bmig.lineage import (ROLE_HANDED_OVER, ROLE_PRIMARY, ROLE_REJOINING, STATE_IN_SYNC,
                          STATE_NEW, USABLE_STATES, TargetRecord, hex_id, load_target,
                          new_generation, now, save_target)
from bmig.receiver.opening import lineage_key
from bmig.receiver.target import RecordLock, TargetDevice, TargetLock, is_locked

log = logging.getLogger("bmigrate")

LOCK_WAIT = 2.0           # seconds to wait for a session that is ending


@dataclass(frozen=True)
class PromoteSettings:
    state_dir: str
    export: str
    target_path: str
    fence: str | None = None
    no_fence: bool = False
    force_inconsistent: bool = False
    force_connected: bool = False
    fence_timeout: float = 120.0


def connected(state_dir: str, export: str) -> list[str]:
    """Which sessions of a source hold the target now (in any breceive on this host)."""
    out = []
    if is_locked(TargetLock(state_dir, export, "replica").path):
        out.append("replication")
    if is_locked(TargetLock(state_dir, export).path):
        out.append("a pass")
    return out


def loss(record: TargetRecord) -> dict:
    """What a copy in this state may lack of what its source had acknowledged."""
    consistent = record.state in USABLE_STATES
    if not consistent:
        return {"bytes_at_most": None, "consistent": False,
                "why": (f"the copy is inconsistent ({_why_inconsistent(record)}), so chunks "
                        "of different moments are side by side; what the source wrote "
                        "since is not here either")}
    if record.protocol is None:
        return {"bytes_at_most": None, "consistent": True,
                "why": "no replication carried the source's writes: this is the copy of "
                       "the last pass (every write since it is not here)"}
    if record.protocol == "C":
        why = ("nothing the source acknowledged: protocol C answered each write only "
               "once it was written here")
        return {"bytes_at_most": 0, "consistent": True, "why": why}
    if record.protocol == "B":
        why = ("nothing the source acknowledged, unless this receiver stopped too: "
               "protocol B answered each write once it was received here")
        return {"bytes_at_most": 0, "consistent": True, "why": why}
    return {"bytes_at_most": record.window, "consistent": True,
            "why": (f"protocol A: writes the source acknowledged and had not handed over "
                    f"yet, at most {record.window} bytes (its replication window)")}


def _why_inconsistent(record: TargetRecord) -> str:
    if record.catchup_bytes:
        return f"a pass of {record.catchup_bytes} bytes was being applied"
    if record.replicating_since is not None:
        return ("replication began and no pass has shipped yet what was dirty on the "
                "source before it")
    return "a pass was being applied"


FenceRunner = Callable[[str, dict[str, str], float], None]
"""Runs a fence command with an environment within a timeout; HookFailed when it fails."""


def run_fence(runner: FenceRunner, command: str, export: str, timeout: float) -> None:
    """The fence hook, with BMIG_DEVICE and BMIG_ACTION; HookFailed when it fails."""
    env = dict(os.environ, BMIG_DEVICE=export, BMIG_ACTION="fence")
    try:
        runner(command, env, timeout)
    except HookFailed as exc:
        raise HookFailed(f"the fence {exc.message}") from None


def promote(settings: PromoteSettings, fence_runner: FenceRunner) -> dict:
    """Make the copy the primary (see the module's docstring); its report."""
    export, state_dir = settings.export, settings.state_dir
    record = load_target(state_dir, export)
    before = record.state
    if record.state == STATE_NEW:
        raise LineageError(f"target {export!r} holds no copy yet: nothing to promote")
    if record.role == ROLE_PRIMARY:
        raise LineageError(f"target {export!r} is the primary already (generation "
                           f"{hex_id(record.generation)})")
    if record.role in (ROLE_HANDED_OVER, ROLE_REJOINING):
        raise LineageError(f"target {export!r} is a former primary ({record.role}): "
                           "it is not a copy to promote")
    if record.state not in USABLE_STATES and not settings.force_inconsistent:
        raise LineageError(f"target {export!r} is inconsistent ({_why_inconsistent(record)}"
                           "): promoting it gives a device with chunks of different "
                           "moments; give --force-inconsistent to take it anyway")
    sessions = connected(state_dir, export)
    if sessions and not settings.force_connected:
        raise LineageError(f"the source of {export!r} is still connected ("
                           f"{' and '.join(sessions)}): it may still be writing; stop it, "
                           "or give --force-connected (with a fence)")
    if not settings.fence and not settings.no_fence:
        raise ConfigError("give --fence CMD (the old source must not write again) or "
                          "--no-fence")
    lock: TargetLock | None = TargetLock(state_dir, export)
    try:
        lock.acquire(LOCK_WAIT)
    except TargetBusy:
        if not settings.force_connected:
            raise
        lock = None     # a session that hangs: its writes are checked against the record
    try:
        target = _open_target(settings, record)
        try:
            fenced = _fence(settings, fence_runner)
            record_lock = RecordLock(state_dir, export)
            try:
                with record_lock.held(exclusive=True):
                    current = load_target(state_dir, export)
                    if lineage_key(current) != lineage_key(record):
                        raise LineageError(
                            f"target {export!r} changed while it was being promoted (now "
                            f"generation {hex_id(current.generation)}, {current.role}); "
                            f"nothing was promoted{' (the fence ran)' if fenced else ''}")
                    record = current
                    _check_bound(settings, record, target)
                    target.sync()
                    old = record.generation
                    record.previous = [hex_id(old)] + record.previous[:15]
                    record.generation = new_generation()
                    record.role = ROLE_PRIMARY
                    record.promoted = now()
                    if record.state == STATE_IN_SYNC:
                        record.state = "consistent"
                    save_target(state_dir, record)
            finally:
                record_lock.close()
        finally:
            target.close()
    finally:
        if lock is not None:
            lock.release()
    log.warning("%s promoted without its source: generation %s (from %s)", export,
                hex_id(record.generation), hex_id(old))
    return {"export": export, "generation": hex_id(record.generation),
            "previous_generation": hex_id(old), "state": before, "fenced": fenced,
            "connected": sessions, "protocol": record.protocol,
            "replication_ended": record.replication_ended, "loss": loss(record),
            "record": record.to_json()}


def _open_target(settings: PromoteSettings, record: TargetRecord) -> TargetDevice:
    """The target, open, and the one the record describes (before anything is fenced)."""
    target = TargetDevice.open(settings.target_path, True, lambda: settings.force_connected)
    if target is None:
        raise ConfigError(f"target {settings.target_path} does not exist; nothing was "
                          "fenced or promoted")
    try:
        _check_bound(settings, record, target)
    except BaseException:
        target.close()
        raise
    return target


def _check_bound(settings: PromoteSettings, record: TargetRecord,
                 target: TargetDevice) -> None:
    why = record.not_bound_to(target.identity)
    if why:
        raise LineageError(f"{settings.target_path} is not the copy the record of "
                           f"{settings.export!r} describes: {why}; nothing was fenced or "
                           "promoted")


def _fence(settings: PromoteSettings, runner: FenceRunner) -> bool:
    """Run the fence, if any; whether it fenced. HookFailed when it failed and
    ``no_fence`` was not given."""
    if not settings.fence:
        return False
    try:
        run_fence(runner, settings.fence, settings.export, settings.fence_timeout)
        return True
    except HookFailed as exc:
        if not settings.no_fence:
            raise HookFailed(f"{exc.message}; nothing was promoted (give --no-fence to "
                             "promote without fencing)") from None
        log.warning("%s; promoting without fencing (--no-fence)", exc.message)
        return False
