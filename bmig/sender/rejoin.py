"""Rejoin: a former primary becomes the secondary of the one that took over.

``bmigrate rejoin NAME`` runs on the host of the former primary once it is back (or on
either side of a split brain, for the side whose changes are discarded). It stops this
side from writing (bmig-nbd read-only, its replication stopped; breqd records the device
as handed over, so a restarted bmig-nbd stays read-only), and leaves for breceive on
this host a record that says: this copy waits for its new primary. Its resync set goes
beside it: the chunks this side had dirty or in flight (written here, never shipped),
from breqd's bitmap. When the new primary connects (its ``bmigrate sync``, or its HA
replication), the receiver offers that set, the sender marks it dirty, and the union of
the two sides' changes travels: nothing else can differ.

Where this side's state cannot be trusted (breqd replaced its bitmap by an all-dirty
one, or the set is too large for its file), or when asked (``checksum``), the record says
"all": the sender compares every chunk by hash instead (--checksum), never trusting it.

It speaks to breqd and bmig-nbd through their clients and writes a target record and
its resync set (bmig.lineage) under breceive's locks; it never talks to the other host.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass

from bmig.errors import BmigError, ConfigError, DeviceBusy, UnreachableError
from bmig.identity import TargetIdentity, identify
from bmig.limits import MAX_STATE_FILE
from bmig.lineage import (ROLE_HANDED_OVER, ROLE_REJOINING, STATE_CONSISTENT, TargetRecord,
                          drop_resync, parse_id, save_resync, save_target)
from bmig.nbd.manage_client import ManageClient
from bmig.receiver.target import RecordLock, TargetLock
from bmig.tracker.blocking_client import TrackerClient

log = logging.getLogger("bmigrate")

NO_SAVED_BITMAP = "no saved bitmap"


@dataclass(frozen=True)
class RejoinSettings:
    name: str
    control: str
    manage_dir: str
    backing: str                  # the device this side's bmig-nbd served
    state_dir: str                # breceive's on this host
    export: str
    discard: bool = False         # --discard-my-data: also through a split brain
    checksum: bool = False        # compare every chunk, whatever breqd says


def nbd_status(manage_dir: str, name: str) -> dict | None:
    """bmig-nbd's status of NAME, or None when no bmig-nbd serves it."""
    try:
        with ManageClient(manage_dir, name, timeout=30) as nbd:
            return nbd.call("status")
    except UnreachableError:
        return None


def stop_writes(manage_dir: str, name: str) -> bool:
    """bmig-nbd, if one serves NAME: no replication, no writes. False when none runs."""
    try:
        with ManageClient(manage_dir, name, timeout=30) as nbd:
            nbd.call("stop")
            nbd.call("read-only", value=True)
    except UnreachableError:
        return False
    return True


def dirty_ranges(client: TrackerClient, name: str, size: int) -> list[tuple[int, int]]:
    """Every byte range breqd has dirty or in flight (QUERY, a piece at a time)."""
    out: list[tuple[int, int]] = []
    offset = 0
    while offset < size:
        runs, end = client.query(name, offset, size - offset)
        out.extend(runs)
        if end <= offset:
            raise BmigError(f"breqd answered QUERY of {name} without progress")
        offset = end
    return out


def rejoin(s: RejoinSettings) -> dict:
    """Prepare this side as the new primary's secondary (module docstring); a report.

    Everything that can refuse is checked before anything changes: no chunk in flight,
    the backing (its size is breqd's), no replication of bmig-nbd still accepted by its
    peer (nobody took over: this is the live primary), breceive's lock on the export.
    A failure after the first change says what state it left."""
    with TrackerClient(s.control, client="bmigrate") as client:
        stats = client.stats(s.name)
        _check_not_in_flight(s.name, stats, "nothing was changed")
        size = int(stats["size"])
        identity = _backing_identity(s.backing, s.name, size)
        status = nbd_status(s.manage_dir, s.name)
        if status is not None and status.get("replicating"):
            raise DeviceBusy(f"{s.name}: bmig-nbd replicates it to {status.get('target')}, "
                             "which accepts its lineage: nobody took over, this is the "
                             "primary; nothing was changed (stop its replication first if "
                             "it really is to become a secondary)")
        os.makedirs(s.state_dir, mode=0o700, exist_ok=True)
        lock = TargetLock(s.state_dir, s.export)
        lock.acquire()
        try:
            # breqd first: bmig-nbd keeps a read-only asked by a client that is gone
            # only for a device breqd records as handed over (writes before it are
            # tracked).
            client.set_lineage(s.name, ROLE_HANDED_OVER)
            try:
                served = stop_writes(s.manage_dir, s.name)
                stats = client.stats(s.name)
                _check_not_in_flight(s.name, stats, "")
                ranges, resync, trusted, recovered = _resync_set(client, s, stats, size)
                record = TargetRecord(
                    s.export, parse_id(stats["device_id"], "device_id"),
                    parse_id(stats["generation"], "generation"), STATE_CONSISTENT,
                    ROLE_REJOINING, size, previous=list(stats.get("previous", [])),
                    identity=identity, resync=resync, discard=s.discard)
                record_lock = RecordLock(s.state_dir, s.export)
                try:
                    with record_lock.held(exclusive=True):
                        if resync == "ranges":
                            save_resync(s.state_dir, s.export, ranges)   # before the record
                        else:
                            drop_resync(s.state_dir, s.export)
                        save_target(s.state_dir, record)
                finally:
                    record_lock.close()
            except BmigError as exc:
                raise type(exc)(f"{exc.message}; {left_behind(s)}") from None
        finally:
            lock.release()
    log.warning("%s: waits for its new primary as %s (generation %s); resync set: %s",
                s.name, s.export, stats["generation"],
                f"{len(ranges)} ranges" if resync == "ranges" else "every chunk, by hash")
    return {"device": s.name, "export": s.export, "generation": stats["generation"],
            "resync": resync, "ranges": len(ranges) if resync == "ranges" else None,
            "bytes": sum(n for _, n in ranges) if resync == "ranges" else size,
            "discard": s.discard, "bmig_nbd": "read-only" if served else "not running",
            "untrusted_state": None if trusted or s.checksum else recovered}


def left_behind(s: RejoinSettings) -> str:
    """What a rejoin that failed half-way left, and the ways on."""
    return (f"breqd records {s.name} as handed over and its bmig-nbd (if one runs) is "
            f"read-only, with no record for breceive yet: run bmigrate rejoin {s.name} "
            f"again once fixed, or make it writable again with bmigrate track set-role "
            f"{s.name} primary --manage-dir {s.manage_dir}")


def _check_not_in_flight(name: str, stats: dict, changed: str) -> None:
    if int(stats["inflight_bytes"]):
        raise DeviceBusy(f"{name}: a sender has chunks in flight: stop it first "
                         f"(bmigrate run, replicate --keep)" + (f"; {changed}" if changed
                                                                else ""))


def _backing_identity(backing: str, name: str, size: int) -> TargetIdentity:
    """The backing's identity, once it is known to be NAME's size."""
    try:
        fd = os.open(backing, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise ConfigError(f"cannot open {backing}: {exc.strerror}; nothing was "
                          "changed") from None
    try:
        identity = identify(fd)
        have = os.lseek(fd, 0, os.SEEK_END)
    finally:
        os.close(fd)
    if have != size:
        raise ConfigError(f"{backing} has {have} bytes, breqd tracks {size} for {name}; "
                          "nothing was changed")
    return identity


def _resync_set(client: TrackerClient, s: RejoinSettings, stats: dict,
                size: int) -> tuple[list[tuple[int, int]], str, bool, str | None]:
    """The chunks this side changed alone, and whether they can be trusted ("ranges") or
    every chunk must be compared ("all")."""
    ranges = dirty_ranges(client, s.name, size)
    recovered = stats.get("recovered")
    trusted = (not recovered or recovered == NO_SAVED_BITMAP) and not s.checksum
    resync = "ranges" if trusted else "all"
    if resync == "ranges" and len(json.dumps(ranges)) > MAX_STATE_FILE // 2:
        resync = "all"
    return ranges, resync, trusted, recovered
