"""OPEN on the receiver: which target, and is it a copy of this source? The lineage
decision (invariant 7) and the identity check (invariant 9), before anything is written.

    same, descendant  the record holds this lineage (or the one it took over from) and
                      still describes the file or device it names: ship what is dirty
    rejoin            a former primary waits to become this source's secondary (bmigrate
                      rejoin): ship what is dirty and the chunks it changed alone
    split-brain       both sides were written as primary since a common generation:
                      refused, naming both generations and the choices
    new               no record of ours, or one that no longer describes its target (the
                      sender ships everything); only now may a file be created or grown
    foreign           another lineage: refused, unless both sides agree to discard it; a
                      primary is never offered for discarding (fail back instead)

``open_export`` takes the target's lock, reads its record, decides, and opens the
target; on any failure it lets go of what it took. It never writes a record (the
session does, bmig.receiver.session) and never talks to the sender.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from bmig.errors import LineageError, TargetError, TargetMissing
from bmig.lineage import (ROLE_PRIMARY, TargetRecord, common_ancestor, hex_id, load_target,
                          target_path)
from bmig.lineage import relation as lineage_relation
from bmig.receiver.policy import Policy, TargetConfig
from bmig.receiver.target import RecordLock, TargetDevice, TargetLock

log = logging.getLogger("breceive")

MODES = ("pass", "replicate", "inspect")


@dataclass(frozen=True)
class OpenRequest:
    """What an OPEN asks for, its fields checked."""

    source_id: int
    generation: int
    previous: list[int]          # older generations of the source's lineage
    size: int
    discard: bool                # --discard-target-data
    mode: str                    # one of MODES

    @property
    def replicate(self) -> bool:
        return self.mode == "replicate"

    @property
    def writable(self) -> bool:
        return self.mode != "inspect"


def lineage_key(record: TargetRecord) -> tuple[int, int, str]:
    """What a session checks has not changed under it before it writes a record."""
    return record.source_device_id, record.generation, record.role


@dataclass
class Opened:
    record: TargetRecord
    relation: str                # same, descendant, rejoin or new
    target: TargetDevice
    lock: TargetLock             # held unless inspecting
    record_lock: RecordLock | None    # None when inspecting
    why: str = ""                # why a target with a record is "new" now
    disk: tuple = ()             # lineage_key of the record on disk at OPEN


def open_export(policy: Policy, peer: str, config: TargetConfig,
                request: OpenRequest) -> Opened:
    """Lock, decide, open (see the module's docstring); LineageError when refused."""
    export = config.export
    lock = TargetLock(policy.state_dir, export, "replica" if request.replicate else "")
    if request.writable:                     # reading hashes needs no lock
        lock.acquire()
    target: TargetDevice | None = None
    record_lock: RecordLock | None = None
    why = ""
    try:
        record = load_target(policy.state_dir, export)
        disk = lineage_key(record)
        relation = lineage_relation(record, request.source_id, request.generation,
                                    request.previous)
        if relation == "split-brain":
            raise LineageError(split_brain(record, request))
        if relation == "foreign":
            refuse_or_discard(policy, peer, config, record, request.source_id,
                              request.generation, request.discard, request.replicate)
            record, relation = TargetRecord(export), "new"
        target = TargetDevice.open(config.path, request.writable, lock.other_session)
        if relation in ("same", "descendant", "rejoin"):
            # Invariant 9: the record is about one file or device, as it was.
            why = record.not_bound_to(target.identity if target else None) or ""
            if why:
                log.warning("%s: %s: %s is not the copy its record describes (%s "
                            "of %s): %s; it is taken as new, and everything is shipped "
                            "again", peer, export, config.path,
                            hex_id(record.generation), hex_id(record.source_device_id),
                            why)
                record, relation = TargetRecord(export), "new"
        target = sized(config, target, request.size, request.writable and relation == "new")
        if request.writable:
            record_lock = RecordLock(policy.state_dir, export)
    except BaseException:
        if target is not None:
            target.close()
        lock.release()
        raise
    return Opened(record, relation, target, lock, record_lock, why, disk)


def split_brain(record: TargetRecord, request: OpenRequest) -> str:
    """The refusal of a split brain: both generations, where they parted, the choices."""
    export = record.export
    base = common_ancestor(record, request.generation, request.previous)
    return (f"split brain on {export!r}: this copy holds generation "
            f"{hex_id(record.generation)} and the source generation "
            f"{hex_id(request.generation)}; both were written as primary since generation "
            f"{hex_id(base)}. Choose the side whose changes are discarded: on this host, "
            f"bmigrate rejoin {export} --discard-my-data (this copy's changes since "
            f"{hex_id(base)} are lost), or on the source's host, bmigrate rejoin with "
            "--discard-my-data there and sync from here")


def refuse_or_discard(policy: Policy, peer: str, config: TargetConfig, record: TargetRecord,
                      source_id: int, generation: int, discard: bool, replicate: bool) -> None:
    """A source of another lineage: refused, unless both sides agree to discard the
    target's data. A primary is never offered for discarding: a former source that
    meets it is told about fail-back instead (invariant 7)."""
    export = config.export
    if record.role == ROLE_PRIMARY:
        since = time.strftime(" since %Y-%m-%d %H:%M:%S",
                              time.localtime(record.promoted)) if record.promoted else ""
        primary = (f"target {export!r} is the primary{since}: a cutover promoted it to "
                   f"generation {hex_id(record.generation)}, and the source it came "
                   "from may no longer write to it")
        if not discard or replicate:
            record_file = target_path(policy.state_dir, export)
            raise LineageError(f"{primary}; to fail back, track the primary's copy on "
                               f"its host (bmigrate track add NAME --adopt {record_file})"
                               " and sync from there to this source (README, \"fail "
                               "back\")")
        if not config.allow_discard_primary:
            raise LineageError(f"{primary}, and this receiver does not allow discarding "
                               "a primary's data (allow_discard_primary)")
        log.warning("%s: %s: discarding the primary (generation %s) on request",
                    peer, export, hex_id(record.generation))
        return
    if replicate:
        raise LineageError(f"target {export!r} holds another lineage: sync it first, "
                           "then replicate")
    if not discard:
        raise LineageError(
            f"target {export!r} holds generation {hex_id(record.generation)} of "
            f"device {hex_id(record.source_device_id)}, not generation "
            f"{hex_id(generation)} of {hex_id(source_id)}; to overwrite it, "
            f"sync with --discard-target-data {export}")
    if not config.allow_discard:
        raise LineageError(f"target {export!r} holds another lineage and this "
                           "receiver does not allow discarding it (allow_discard)")
    log.warning("%s: %s: discarding generation %s of %s on request", peer,
                export, hex_id(record.generation), hex_id(record.source_device_id))


def sized(config: TargetConfig, target: TargetDevice | None, size: int,
          may_grow: bool) -> TargetDevice:
    """The target, at least ``size`` bytes long. Only for a "new" relation may a file
    be created or extended (up to its cap): anything else would make a copy out of
    what is not one."""
    if target is None:
        if not may_grow:
            raise TargetMissing(f"target {config.path} does not exist")
        log.info("creating target %s (%d bytes)", config.path, size)
        return TargetDevice.create(config.path, size, config.max_size)
    if target.size < size:
        if not may_grow or target.is_block:
            raise TargetError(f"target {config.path} has {target.size} bytes, the "
                              f"source {size}")
        log.info("extending target %s from %d to %d bytes", config.path, target.size,
                 size)
        target.grow(size, config.max_size)
    return target
