"""One session's writes of its target's record (invariant 7's record, docs/wire-protocol.md
"The target record"): what a replication session's beginning and end, a pass's beginning
and end, and a promotion make of it.

Each change reads the record again under the record lock, held exclusively, and ends
the session (LineageError) if its lineage changed meanwhile to one this source has no
part in (a promotion on this host, another source). A replication session changes only
its own fields; the others are the pass session's.

The room reads and writes the record and the resync set of one export, under the
target's RecordLock; it never touches the target's data, the channel or the session's
state (bmig.receiver.session calls it and answers the sender).
"""

from __future__ import annotations

import logging
from typing import Callable

from bmig.errors import BmigError, LineageError, ProtocolError
from bmig.identity import TargetIdentity
from bmig.lineage import (ROLE_PRIMARY, ROLE_SECONDARY, STATE_CONSISTENT, STATE_IN_SYNC,
                          STATE_INCONSISTENT, STATE_NEW, USABLE_STATES, TargetRecord,
                          drop_resync, hex_id, load_target, now, save_target)
from bmig.lineage import relation as lineage_relation
from bmig.receiver.opening import lineage_key
from bmig.receiver.target import RecordLock, TargetLock, is_locked

log = logging.getLogger("breceive")


class SessionRecord:
    def __init__(self, state_dir: str, export: str, record: TargetRecord,
                 record_lock: RecordLock, disk: tuple, mode: str, source_id: int,
                 source_generation: int, previous_ids: list[int]):
        self.state_dir = state_dir
        self.export = export
        self.record = record                 # the record as this session sees it
        self.record_lock = record_lock
        self.mode = mode
        self.source_id = source_id
        self.source_generation = source_generation
        self.previous_ids = previous_ids
        self._disk = disk                    # the record's lineage as this session knows it

    def current(self) -> TargetRecord:
        """The record on disk, under the record lock held exclusively by the caller:
        LineageError when its lineage changed since this session last saw it to one
        this source has no part in (promoted on this host, or taken by another source).
        A replication session's fields are taken from it; the rest is this session's."""
        disk = load_target(self.state_dir, self.export)
        if lineage_key(disk) != self._disk and lineage_relation(
                disk, self.source_id, self.source_generation,
                self.previous_ids) in ("foreign", "split-brain"):
            what = ("is the primary now" if disk.role == ROLE_PRIMARY
                    else "holds another lineage now")
            raise LineageError(f"target {disk.export!r} {what} (generation "
                               f"{hex_id(disk.generation)}): this session of generation "
                               f"{hex_id(self.source_generation)} ends")
        if self.mode == "replicate":
            return disk                          # it changes only its own fields
        record = self.record
        for name in ("protocol", "window", "replicating_since", "replication_ended"):
            setattr(record, name, getattr(disk, name))
        if record.state != STATE_NEW:            # a record reset at OPEN stays new
            record.state = disk.state
        return record

    def save(self, record: TargetRecord) -> None:
        save_target(self.state_dir, record)
        self._disk = lineage_key(record)

    def replica_connected(self) -> bool:
        return is_locked(TargetLock(self.state_dir, self.export, "replica").path)

    def replication_began(self, protocol: str | None, window: int) -> None:
        """A replication session opens: the copy is no longer known to be of one moment
        (the source may have dirty chunks it lacks); what it may lose is recorded."""
        with self.record_lock.held(exclusive=True):
            record = self.current()
            if record.state != STATE_NEW:
                record.state = STATE_INCONSISTENT
            record.protocol, record.window = protocol, window
            record.replicating_since, record.replication_ended = now(), None
            self.save(record)

    def replication_ended(self, peer: str) -> None:
        """The replication session ends: the copy holds every write it got, in order."""
        try:
            with self.record_lock.held(exclusive=True):
                record = self.current()
                if record.state == STATE_IN_SYNC:
                    record.state = STATE_CONSISTENT
                record.replication_ended = now()
                self.save(record)
        except BmigError as exc:
            log.info("%s: the record was not updated at the end of replication: %s",
                     peer, exc.message)

    def pass_began(self, previous: list[str], size: int, identity: TargetIdentity,
                   catchup_bytes: int) -> None:
        """PASS_BEGIN: the copy is inconsistent, durably, before the pass's first write;
        a rejoining copy's resync set is forgotten (the source marked it dirty)."""
        with self.record_lock.held(exclusive=True):     # no replicated write meanwhile
            record = self.current()
            record.source_device_id, record.generation = self.source_id, self.source_generation
            record.previous = list(previous)
            record.role, record.successor = ROLE_SECONDARY, 0
            record.state = STATE_INCONSISTENT
            record.size = size
            record.identity = identity
            record.catchup_bytes = catchup_bytes
            record.resync, record.discard = None, False
            self.save(record)                         # durable before the first write
        drop_resync(self.state_dir, self.export)

    def pass_ended(self, consistent: bool) -> None:
        """A complete pass: counted; the copy consistent (in-sync while a replication
        session is connected) when nothing is dirty on the source but what that carries."""
        with self.record_lock.held(exclusive=True):
            record = self.current()
            if consistent:
                record.state = (STATE_IN_SYNC if self.replica_connected()
                                else STATE_CONSISTENT)
            record.last_pass = now()
            record.passes += 1
            self.save(record)

    def promote(self, new: int, settle: Callable[[], None]) -> TargetRecord:
        """The copy takes generation ``new`` and becomes the primary, if it is a usable
        copy of this source; ``settle`` runs under the lock before the record changes
        (the session stops its watch and syncs every replicated write so far)."""
        with self.record_lock.held(exclusive=True):
            record = self.current()
            if not record.shares_lineage(self.source_id, self.source_generation) \
                    or record.state not in USABLE_STATES:
                raise LineageError(f"target {record.export!r} is {record.state} with "
                                   f"generation {hex_id(record.generation)}: only a "
                                   "consistent copy of this source can be promoted")
            if new in (0, record.generation):
                raise ProtocolError("PROMOTE needs a new generation")
            settle()
            record.previous = [hex_id(record.generation)] + record.previous[:15]
            record.generation = new
            record.role = ROLE_PRIMARY
            record.promoted = now()
            if record.state == STATE_IN_SYNC:    # its replication ends with the old lineage
                record.state = STATE_CONSISTENT
            self.save(record)
        return record
