"""The target records in a receiver's state directory, as ``bmigrate status
--receiver-state-dir DIR`` shows them on the receiving host, and as breceive answers a
STATUS_REQ (``configured_targets``). Reading only: breceive itself need not run, and
nothing is locked or changed (whether a session holds a target's lock is probed).
"""

from __future__ import annotations

import os
from typing import Iterable

from bmig.errors import BmigError, ConfigError
from bmig.lineage import TARGET_SUFFIX, load_target
from bmig.receiver.target import TargetLock, is_locked


def receiver_status(state_dir: str) -> list[dict]:
    """Every target record in a receiver's state directory."""
    try:
        names = sorted(n[:-len(TARGET_SUFFIX)] for n in os.listdir(state_dir)
                       if n.endswith(TARGET_SUFFIX))
    except OSError as exc:
        raise ConfigError(f"cannot read {state_dir}: {exc.strerror}") from None
    out = []
    for export in names:
        try:
            out.append({"side": "target", **load_target(state_dir, export).to_json()})
        except BmigError as exc:
            out.append({"side": "target", "export": export, "error": exc.message})
    return out


def configured_targets(state_dir: str, exports: Iterable[str]) -> list[dict]:
    """Every configured target's record (any state), with whether a session of each
    kind holds it now."""
    targets = []
    for export in sorted(exports):
        try:
            record = load_target(state_dir, export).to_json()
        except BmigError as exc:
            record = {"export": export, "error": exc.message}
        # A pass session holds it now: its record may still change (a PROMOTE whose
        # answer was lost is either done or not once this is false).
        record["busy"] = is_locked(TargetLock(state_dir, export).path)
        # A replication session (bmig-nbd's) is connected now.
        record["replicating"] = is_locked(TargetLock(state_dir, export, "replica").path)
        targets.append(record)
    return targets
