"""The import: what dm-era recorded since the last imported era goes into breqd.

An import ends an era with a suspend and resume of the era device (every write recorded
in an era before the new one has completed when the suspend returns), reads the blocks
written since the last imported era from a metadata snapshot, marks them in breqd
(durable when breqd answers) and only then records the new era as imported. When the
chain of eras since the last import cannot be trusted (another boot, a table replaced,
a layer gone, another bitmap in breqd), every chunk is set dirty first and tracking
stops, loudly (invariant 4).

The room reads dm-era's status and metadata, swaps the era device's table at the
boundary, marks in breqd and writes the device's record; the caller holds the device's
lock (bmig.dm.state.DeviceLock). It never changes the user's device's table (attach,
detach and the NBD leg are bmig.dm.intercept's and bmig.dm.via_nbd's).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Iterable, NoReturn

from bmig.dm import dmsetup, era, via_nbd
from bmig.dm.state import LOST, Record, boot_id, save
from bmig.dm.tables import devno_or_empty, swap_tables, table_maps_onto
from bmig.errors import InterceptError
from bmig.limits import MAX_RANGES_PER_FRAME
from bmig.tracker.blocking_client import TrackerClient

MARK_BATCH = min(8192, MAX_RANGES_PER_FRAME)


@dataclass
class ImportResult:
    era: int                  # the first era not imported yet
    ranges: int
    bytes_marked: int
    seconds: float
    boundary_seconds: float   # how long the era device held I/O


def import_eras(directory: str, name: str, record: Record, client: TrackerClient,
                frozen: bool = False) -> ImportResult:
    """One import of ``name``, attached as ``record`` (its lock held by the caller).
    ``frozen``: this process holds the device suspended (a cutover's freeze), so a
    suspended era device is not a killed importer's boundary."""
    started = time.monotonic()
    why = broken(name, record, client)
    if why:
        lose(directory, name, record, client, why)
    # Looked at before the boundary: if the device maps onto bmig-nbd now, every write
    # through its old table completed when the switch's suspend returned, so the
    # boundary below ends every era that holds one.
    on_nbd = via_nbd.maps_onto_nbd(record)
    if on_nbd and record.nbd_from_era:
        # Every write since imported_era came through bmig-nbd, which marked it in
        # breqd before writing it (docs/dm-intercept.md, the cutover through NBD).
        return ImportResult(record.imported_era, 0, 0, time.monotonic() - started, 0.0)
    era_dev = record.era_device
    info = dmsetup.info(era_dev)
    if info is not None and info.suspended and not frozen:
        dmsetup.resume(era_dev)            # a killed importer's boundary, half done
    if era.status(era_dev).held_root is not None:
        dmsetup.message(era_dev, "drop_metadata_snap")    # a killed importer's snapshot
    boundary = swap_tables(era_dev)
    current = era.status(era_dev).era
    if current <= record.imported_era:
        # The boundary moves dm-era to a new era: one not past the last imported era
        # means its metadata is not the one those eras were counted in (replaced, or
        # an older copy), and era_invalidate would miss writes made since.
        lose(directory, name, record, client, f"dm-era is at era {current}, not past era "
             f"{record.imported_era} imported already: its metadata was replaced")
    dmsetup.message(era_dev, "take_metadata_snap")
    try:
        ranges, marked = _mark(client, name, record, era.written_since(
            record.imported_era, record.metadata, snapshot=True))
    finally:
        dmsetup.message(era_dev, "drop_metadata_snap")
    _drop_cache(record.era_device)
    record.imported_era = current
    if on_nbd:
        record.nbd_from_era = current
    record.last_import = time.time()
    record.last_import_bytes = marked
    record.imports += 1
    save(directory, record)
    return ImportResult(current, ranges, marked, time.monotonic() - started, boundary)


def _mark(client: TrackerClient, name: str, record: Record,
          runs: Iterable[tuple[int, int]]) -> tuple[int, int]:
    """MARK the byte ranges of the block runs in batches; each reply means durable."""
    batch: list[tuple[int, int]] = []
    count = marked = 0
    for offset, length in era.block_runs_to_bytes(iter(runs), record.block_sectors,
                                                  record.size):
        batch.append((offset, length))
        count += 1
        marked += length
        if len(batch) >= MARK_BATCH:
            client.mark(name, batch)
            batch = []
    if batch:
        client.mark(name, batch)
    return count, marked


def broken(name: str, record: Record, client: TrackerClient) -> str:
    """Why the chain of eras since the last import cannot be trusted, or ''."""
    if record.boot_id != boot_id():
        return "the machine restarted since the attach, and its tables with it"
    era_info = dmsetup.info(record.era_device)
    if era_info is None or dmsetup.info(record.origin_device) is None:
        return f"{record.era_device} is gone"
    if dmsetup.info(record.device) is None:
        return f"{record.device} is gone"
    live = dmsetup.table(record.device)
    if not table_maps_onto(live, era_info.devno) and not (
            record.nbd_device and table_maps_onto(live, devno_or_empty(record.nbd_device))):
        return (f"the table of {record.device} was replaced (by lvextend or "
                "lvchange --refresh?), so writes bypassed dm-era")
    stats = client.stats(name)
    if str(stats["device_id"]) != record.device_id:
        return "breqd's bitmap of the device is another one (device id changed)"
    if int(stats["size"]) != record.size:
        return f"breqd tracks {stats['size']} bytes, the record {record.size}"
    return ""


def lose(directory: str, name: str, record: Record, client: TrackerClient,
         why: str) -> NoReturn:
    """Invariant 4: what cannot be proved becomes dirty, loudly, before anything else."""
    client.set_all_dirty(name)
    record.state = LOST
    record.why = why
    save(directory, record)
    raise InterceptError(f"{name}: {why}; tracking stopped and every chunk set "
                         f"dirty; attach it again (bmigrate track attach {name} "
                         f"--dm {record.device})")


def _drop_cache(device: str) -> None:
    """Forget cached pages of the device, so that a pass after this import reads what
    the completed writes left on it (the file system above writes around the cache)."""
    try:
        fd = os.open(f"/dev/mapper/{device}", os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
