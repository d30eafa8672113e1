"""The switches of a dm-tracked device onto bmig-nbd and back, for a cutover with
protocol C (docs/dm-intercept.md, the cutover through bmig-nbd).

On: bmig-nbd started on the era device, /dev/nbdX connected to it, the device's table
loaded as one linear line onto /dev/nbdX, then suspend, flush the era device's page cache,
resume. Back: the device's table onto the era device again (dm-flakey with error_writes
if breqd has the source as handed over: never writable again), /dev/nbdX disconnected,
bmig-nbd stopped. The record names the leg from before bmig-nbd starts until it is gone,
so that a leg a killed process left is always found and taken down.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from bmig.dm import dmsetup, era, nbd_leg
from bmig.dm.state import Record, save
from bmig.dm.tables import (devno_or_empty, quietly, read_only_table, restore, swap_tables,
                            table_maps_onto, which)
from bmig.errors import InterceptError
from bmig.lineage import ROLE_HANDED_OVER, ROLE_PRIMARY
from bmig.tracker.blocking_client import TrackerClient

log = logging.getLogger("bmig.dm")


@dataclass(frozen=True)
class Leg:
    nbd_device: str
    server: nbd_leg.Server
    held_seconds: float          # how long the switch held the device's I/O


def maps_onto_nbd(record: Record) -> bool:
    """The device's live table is the linear mapping onto the record's /dev/nbdX."""
    if not record.nbd_device:
        return False
    devno = devno_or_empty(record.nbd_device)
    return bool(devno) and table_maps_onto(dmsetup.table(record.device), devno)


def switch_on(directory: str, control: str, name: str, record: Record,
              client: TrackerClient, nbd_device: str | None) -> Leg:
    """The device onto /dev/nbdX served by a new bmig-nbd. The caller holds the device's
    lock and takes the leg down (take_down) if this fails part way."""
    if not which("nbd-client"):
        raise InterceptError("nbd-client is not installed (Debian: apt-get install "
                             "nbd-client)")
    role = client.stats(name).get("role", ROLE_PRIMARY)
    if role != ROLE_PRIMARY:
        raise InterceptError(f"{name} is {role}, not primary: this source handed over "
                             "already")
    device = nbd_device or nbd_leg.free_device()
    if nbd_leg.connected(device):
        raise InterceptError(f"{device} is connected to a server already")
    top = dmsetup.info(record.device)
    if top is None:
        raise InterceptError(f"{record.device}: no such device-mapper device")

    def started(pid: int, start: int) -> None:
        record.nbd_pid, record.nbd_started = pid, start
        save(directory, record)

    server = nbd_leg.start_server(name, f"/dev/mapper/{record.era_device}", directory,
                                  control, started)
    nbd_leg.connect(device, server, name, nbd_leg.logical_block_size(top.devno))
    record.nbd_device, record.nbd_from_era = device, 0
    save(directory, record)
    dmsetup.load(record.device, [f"0 {record.size // era.SECTOR} linear "
                                 f"{dmsetup.devno_of(device)} 0"])
    try:
        held = swap_tables(record.device, flush=f"/dev/mapper/{record.era_device}")
    except BaseException:
        restore(record.device)
        raise
    return Leg(device, server, held)


def take_down(directory: str, name: str, record: Record, client: TrackerClient) -> dict:
    """The way back from switch_on, from wherever it stopped: ``held_seconds`` and
    ``read_only`` (the device is on the read-only table)."""
    held, read_only = 0.0, False
    if maps_onto_nbd(record):
        # Handed over (recorded in breqd before PROMOTE): never writable again here.
        read_only = client.stats(name).get("role") == ROLE_HANDED_OVER
        era_info = dmsetup.info(record.era_device)
        if era_info is None:
            raise InterceptError(f"{record.device} maps onto {record.nbd_device}, but "
                                 f"{record.era_device} is gone: nothing changed")
        dmsetup.load(record.device, read_only_table(record) if read_only else
                     [f"0 {record.size // era.SECTOR} linear {era_info.devno} 0"])
        try:
            held = swap_tables(record.device, flush=f"/dev/mapper/{record.era_device}")
        except BaseException:
            restore(record.device)
            raise
    if record.nbd_device and nbd_leg.connected(record.nbd_device):
        quietly(nbd_leg.disconnect, record.nbd_device)
    nbd_leg.stop_server(record.nbd_pid, record.nbd_started)
    record.nbd_device, record.nbd_pid, record.nbd_started = "", 0, 0
    record.nbd_from_era = 0
    save(directory, record)
    read_only = read_only or any(len(line.split()) > 2 and line.split()[2] == "flakey"
                                 for line in dmsetup.table(record.device))
    log.info("%s: %s back on %s%s (I/O held %.3f s); bmig-nbd stopped", name,
             record.device, record.era_device, " read-only" if read_only else "", held)
    return {"held_seconds": round(held, 6), "read_only": read_only}
