"""Attach dm-era under a live dm device, import what it recorded into breqd, detach.

The stack while a device is attached (docs/dm-intercept.md draws it)::

    DEVICE              the user's device, mounted or in use; its table becomes
      | linear            one linear line onto the era device
    bmig-NAME-era       dm-era over the origin, its metadata on METADATA
      |
    bmig-NAME-origin    DEVICE's original table (linear or striped lines)

Attach and detach only swap DEVICE's table: the new table is loaded first (inactive),
then ``suspend --nolockfs`` waits for the I/O in flight and holds new I/O, and
``resume`` swaps the tables and lets the held I/O go on. Nothing is unmounted.

An import (bmig.dm.importer) ends an era and marks what was written in it in breqd
before the record moves on; this room takes the device's lock around it and keeps what
the last one found (``writes_seen``, ``last``). The cutover's freeze, read-only table
and NBD leg (bmig.dm.via_nbd) are driven from here too: each is a change of the user's
device's table under the same lock.
"""

from __future__ import annotations

import logging
import os
import subprocess
import time

from bmig.constants import DEFAULT_CHUNK_SIZE
from bmig.dm import dmsetup, era, importer, via_nbd
from bmig.dm.importer import ImportResult
from bmig.dm.state import (ATTACHED, DETACHED, LOST, DeviceLock, Record, boot_id, load,
                           save, state_dir)
from bmig.dm.tables import (quietly, read_only_table, restore, swap_tables, table_maps_onto,
                            which)
from bmig.errors import BmigError, InterceptError, UnknownDevice
from bmig.tracker.blocking_client import TrackerClient

log = logging.getLogger("bmig.dm")

MAPPING_TARGETS = ("linear", "striped")     # stateless: a second table over them is safe
FREEZE_LEASE = 600.0


def era_name(name: str) -> str:
    return f"bmig-{name}-era"


def origin_name(name: str) -> str:
    return f"bmig-{name}-origin"


class DmIntercept:
    """One tracked device's dm intercept. ``control`` is breqd's socket."""

    def __init__(self, name: str, control: str, directory: str | None = None):
        self.name = name
        self.control = control
        self.directory = directory or state_dir()
        self.writes_seen = False       # the last import found writes (a writer is active)
        self.last: ImportResult | None = None
        self._lease: subprocess.Popen | None = None

    # -- the record ----------------------------------------------------------------------

    def record(self) -> Record | None:
        return load(self.directory, self.name)

    def _attached(self) -> Record:
        record = self.record()
        if record is None:
            raise InterceptError(f"{self.name} is not attached to a dm device (bmigrate "
                                 f"track attach {self.name} --dm DEVICE)")
        if record.state == DETACHED:
            raise InterceptError(f"{self.name} was detached from {record.device}: writes "
                                 "since are not tracked; attach it again (bmigrate track "
                                 f"attach {self.name} --dm {record.device})")
        if record.state == LOST:
            raise InterceptError(f"{self.name}: tracking was lost ({record.why}); every "
                                 "chunk was set dirty; attach it again (bmigrate track "
                                 f"attach {self.name} --dm {record.device})")
        return record

    # -- attach and detach ---------------------------------------------------------------

    def attach(self, device: str, metadata: str | None = None,
               block_size: int | None = None, chunk_size: int | None = None) -> dict:
        """Put dm-era under ``device`` without stopping its I/O. Returns what was done,
        with ``held_seconds``: how long the device's I/O was held."""
        for tool in ("dmsetup", "era_invalidate"):
            if not which(tool):
                raise InterceptError(f"{tool} is not installed (Debian: apt-get install "
                                     f"{dmsetup.PACKAGE[tool]})")
        top = dmsetup.dm_name(device)
        with DeviceLock(self.directory, self.name):
            info = dmsetup.info(top)
            if info is None:
                raise InterceptError(f"{device}: no such device-mapper device")
            old = self.record()
            era_dev, origin = era_name(self.name), origin_name(self.name)
            if old is not None and old.state == ATTACHED and dmsetup.info(old.era_device):
                raise InterceptError(f"{self.name} is already tracked through {old.device} "
                                     f"(bmigrate track detach {self.name} first)")
            lines = dmsetup.table(top)
            self._check_mappable(top, lines)
            for leftover in (era_dev, origin):
                if dmsetup.info(leftover) is not None:
                    raise InterceptError(f"{leftover} is left from an earlier attach of "
                                         f"{self.name}: bmigrate track detach {self.name}")
            dmsetup.ensure_target("era", "dm-era")
            sectors = dmsetup.size_sectors(top)
            size = sectors * era.SECTOR
            with TrackerClient(self.control, client="bmig-dm") as client:
                stats, added = self._breqd_device(client, top, size, chunk_size)
                chunk = int(stats["chunk_size"])
                block_sectors = (block_size or chunk or DEFAULT_CHUNK_SIZE) // era.SECTOR
                if block_size is not None and (block_size % (era.MIN_BLOCK_SECTORS
                                                             * era.SECTOR) or block_size <= 0):
                    raise InterceptError(f"--era-block-size {block_size}: a multiple of 4 KiB")
                meta_path, meta_file = self._metadata(metadata, size, block_sectors)
                try:
                    held = self._insert(top, lines, sectors, meta_path, block_sectors)
                except BaseException:
                    if meta_file is not None:
                        quietly(dmsetup.loop_detach, meta_path)
                    raise
                first_era = era.status(era_dev).era
                if not added:
                    # What was written before the era table took over is not known.
                    client.set_all_dirty(self.name)
                record = Record(self.name, top, era_dev, origin, meta_path, meta_file,
                                block_sectors, size, str(stats["device_id"]), first_era,
                                boot_id())
                save(self.directory, record)
        log.info("%s: dm-era attached under %s (I/O held %.3f s)", self.name, top, held)
        return {"name": self.name, "device": top, "era_device": era_dev,
                "origin_device": origin, "metadata": meta_path, "metadata_file": meta_file,
                "era_block_size": block_sectors * era.SECTOR, "size": size,
                "chunk_size": chunk, "held_seconds": round(held, 6),
                "set_dirty": True}

    def _check_mappable(self, top: str, lines: list[str]) -> None:
        if not lines:
            raise InterceptError(f"{top} has no live table")
        for line in lines:
            parts = line.split()
            target = parts[2] if len(parts) > 2 else "?"
            if target == "linear" and len(parts) >= 4 and _is_bmig_layer(parts[3]):
                raise InterceptError(f"{top} is already tracked (its table maps onto "
                                     f"{_dm_name_of(parts[3])})")
            if target not in MAPPING_TARGETS:
                raise InterceptError(f"{top} uses the {target} target; only linear and "
                                     f"striped tables can be tracked (put a linear device "
                                     f"over it)")
        start = 0
        for line in lines:
            first, length = (int(x) for x in line.split()[:2])
            if first != start:
                raise InterceptError(f"{top}: its table has a gap at sector {start}")
            start = first + length

    def _breqd_device(self, client: TrackerClient, top: str, size: int,
                      chunk_size: int | None) -> tuple[dict, bool]:
        try:
            stats = client.stats(self.name)
        except UnknownDevice:
            stats = client.add_device(self.name, size, chunk_size)
            return stats, True
        if int(stats["size"]) != size:
            raise InterceptError(f"breqd tracks {stats['size']} bytes for {self.name}, but "
                                 f"{top} has {size}")
        if chunk_size is not None and int(stats["chunk_size"]) != chunk_size:
            raise InterceptError(f"breqd tracks {self.name} in {stats['chunk_size']}-byte "
                                 f"chunks, not {chunk_size}")
        return stats, False

    def _metadata(self, metadata: str | None, size: int,
                  block_sectors: int) -> tuple[str, str | None]:
        """The metadata device, checked and with a blank superblock (dm-era formats a
        device whose first block is zeros); bmig's own file on a loop device if none is
        named. (path, the file bmig made or None)."""
        need = era.metadata_bytes(size, block_sectors)
        made: str | None = None
        if metadata is None:
            made = os.path.join(self.directory, f"{self.name}.era-metadata")
            os.makedirs(self.directory, mode=0o700, exist_ok=True)
            fd = os.open(made, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            try:
                if os.fstat(fd).st_size < need:
                    os.ftruncate(fd, need)
                os.fsync(fd)
            finally:
                os.close(fd)
            metadata = dmsetup.loop_attach(made)
        try:
            fd = os.open(metadata, os.O_RDWR | os.O_EXCL | os.O_CLOEXEC)
        except OSError as exc:
            if made is not None:
                quietly(dmsetup.loop_detach, metadata)
            why = "in use" if exc.errno == 16 else exc.strerror
            raise InterceptError(f"metadata device {metadata}: {why}") from None
        try:
            have = os.lseek(fd, 0, os.SEEK_END)
            if have < need:
                raise InterceptError(f"metadata device {metadata} is too small: {have} bytes, "
                                     f"dm-era needs {need} for {size} bytes in "
                                     f"{block_sectors * era.SECTOR}-byte blocks")
            os.pwrite(fd, bytes(4096), 0)
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            if made is not None:
                quietly(dmsetup.loop_detach, metadata)
            raise
        os.close(fd)
        return metadata, made

    def _insert(self, top: str, lines: list[str], sectors: int, metadata: str,
                block_sectors: int) -> float:
        era_dev, origin = era_name(self.name), origin_name(self.name)
        made: list[str] = []
        try:
            dmsetup.create(origin, lines)
            made.append(origin)
            origin_devno = dmsetup.info(origin).devno      # type: ignore[union-attr]
            dmsetup.create(era_dev, [era.table_line(sectors, dmsetup.devno_of(metadata),
                                                    origin_devno, block_sectors)])
            made.append(era_dev)
            era_devno = dmsetup.info(era_dev).devno        # type: ignore[union-attr]
            dmsetup.load(top, [f"0 {sectors} linear {era_devno} 0"])
            return swap_tables(top)
        except BaseException:
            restore(top)
            for name in reversed(made):
                quietly(dmsetup.remove, name)
            raise

    def detach(self, device: str | None = None) -> dict:
        """Give the device its own table back and remove bmig's layers. Works from the
        tables alone if the record is gone."""
        with DeviceLock(self.directory, self.name):
            record = self.record()
            top = record.device if record is not None else (
                dmsetup.dm_name(device) if device else None)
            if top is None:
                raise InterceptError(f"{self.name} is not attached (give --dm DEVICE to "
                                     "clean up layers left behind)")
            if record is not None and (record.nbd_device or record.nbd_pid):
                with TrackerClient(self.control, client="bmig-dm") as client:
                    via_nbd.take_down(self.directory, self.name, record, client)
            era_dev, origin = era_name(self.name), origin_name(self.name)
            era_info, origin_info = dmsetup.info(era_dev), dmsetup.info(origin)
            if dmsetup.info(top) is None:
                raise InterceptError(f"{top}: no such device-mapper device")
            held = 0.0
            live = dmsetup.table(top)
            if origin_info is not None and era_info is not None \
                    and table_maps_onto(live, era_info.devno):
                dmsetup.load(top, dmsetup.table(origin))
                try:
                    held = swap_tables(top)
                except BaseException:
                    restore(top)
                    raise
            elif era_info is not None and any(_is_bmig_layer(p.split()[3]) for p in live
                                              if len(p.split()) > 3):
                raise InterceptError(f"{top} maps onto bmig's layers in a way detach does "
                                     "not know (a cutover in progress?); nothing changed")
            for name in (era_dev, origin):
                if dmsetup.info(name) is not None:
                    dmsetup.remove(name)
            if record is not None and record.metadata_file:
                quietly(dmsetup.loop_detach, record.metadata)
                quietly(os.unlink, record.metadata_file)
            if record is not None:
                record.state = DETACHED
                save(self.directory, record)
        log.info("%s: detached from %s (I/O held %.3f s)", self.name, top, held)
        return {"name": self.name, "device": top, "held_seconds": round(held, 6)}

    # -- import ----------------------------------------------------------------------------

    def read_path(self) -> str:
        """Where a sender reads the device: the era device, which the cutover's freeze
        (a suspend of the user's device) leaves readable."""
        record = self.record()
        return f"/dev/mapper/{record.era_device}" if record is not None else ""

    def refresh(self) -> int:
        """One import; the bytes it marked dirty."""
        result = self.import_eras()
        return result.bytes_marked

    def import_eras(self, client: TrackerClient | None = None) -> ImportResult:
        own = client is None
        if client is None:
            client = TrackerClient(self.control, client="bmig-dm")
        try:
            with DeviceLock(self.directory, self.name):
                return self._import(client)
        finally:
            if own:
                client.close()

    def _import(self, client: TrackerClient) -> ImportResult:
        record = self._attached()
        self.last = importer.import_eras(self.directory, self.name, record, client,
                                         frozen=self._lease is not None)
        self.writes_seen = self.last.bytes_marked > 0
        return self.last

    # -- freeze and read-only, for the cutover ---------------------------------------------

    def freeze(self, lease: float = FREEZE_LEASE) -> float:
        """Hold the device's I/O (its file system frozen first, so its data is on the
        device). A lease: a child of its own session resumes the device when this process
        closes the pipe (thaw, or death) or after ``lease`` seconds."""
        record = self._attached()
        script = ('dmsetup suspend "$1" || exit 1; echo frozen; read -r -t "$2" _; '
                  'dmsetup resume "$1"')
        started = time.monotonic()
        proc = subprocess.Popen(["/bin/bash", "-c", script, "bash", record.device,
                                 str(int(lease))], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                start_new_session=True, text=True)
        assert proc.stdout is not None
        line = proc.stdout.readline()
        if line.strip() != "frozen":
            proc.wait(timeout=dmsetup.TIMEOUT)
            why = (proc.stderr.read().strip().splitlines() or ["?"])[-1] \
                if proc.stderr else "?"
            raise InterceptError(f"{record.device}: suspend failed: {why}")
        self._lease = proc
        return time.monotonic() - started

    def thaw(self) -> None:
        proc, self._lease = self._lease, None
        if proc is None:
            return
        assert proc.stdin is not None
        proc.stdin.close()
        try:
            rc = proc.wait(timeout=dmsetup.TIMEOUT)
        except subprocess.TimeoutExpired:
            raise InterceptError("resuming the device did not finish") from None
        if rc != 0:
            why = (proc.stderr.read().strip().splitlines() or ["?"])[-1] \
                if proc.stderr else "?"
            raise InterceptError(f"resuming the device failed: {why}")

    def load_read_only(self) -> None:
        """The table the device gets at the next resume: reads pass, writes fail with
        EIO (dm-flakey with error_writes, down all the time). For the handed-over source."""
        record = self._attached()
        dmsetup.load(record.device, read_only_table(record))

    def clear_read_only(self) -> None:
        record = self._attached()
        info = dmsetup.info(record.device)
        if info is not None and info.inactive_table:
            dmsetup.clear(record.device)

    # -- the NBD leg, for a cutover with protocol C (bmig/dm/via_nbd.py) -------------------

    def enter_nbd(self, nbd_device: str | None = None) -> dict:
        """Switch the device onto /dev/nbdX served by bmig-nbd on the era device, and
        import once: every write through the old table is then in breqd, and bmig-nbd
        marks every later one before writing it. A leg a killed process left is taken
        down first; any failure takes the new one down (the device back on the era
        device). What was done, with ``held_seconds`` (how long the switch held the
        device's I/O) and ``manage_dir`` (bmig-nbd's control socket)."""
        with DeviceLock(self.directory, self.name), \
                TrackerClient(self.control, client="bmig-dm") as client:
            record = self._attached()
            if record.nbd_device or record.nbd_pid:
                via_nbd.take_down(self.directory, self.name, record, client)
            why = importer.broken(self.name, record, client)
            if why:
                importer.lose(self.directory, self.name, record, client, why)
            try:
                leg = via_nbd.switch_on(self.directory, self.control, self.name, record,
                                        client, nbd_device)
                imported = self._import(client)
            except BaseException:
                try:
                    via_nbd.take_down(self.directory, self.name, record, client)
                except BmigError as exc:
                    log.error("%s: taking the NBD leg down failed: %s", self.name,
                              exc.message)
                raise
        log.info("%s: %s maps onto %s, served by bmig-nbd (pid %d) on %s (I/O held %.3f s)",
                 self.name, record.device, leg.nbd_device, leg.server.pid,
                 record.era_device, leg.held_seconds)
        return {"nbd_device": leg.nbd_device, "pid": leg.server.pid,
                "manage_dir": leg.server.manage_dir,
                "held_seconds": round(leg.held_seconds, 6),
                "imported_bytes": imported.bytes_marked}

    def leave_nbd(self) -> dict:
        """The way back from enter_nbd (via_nbd.take_down); nothing if there is no leg."""
        with DeviceLock(self.directory, self.name):
            record = self.record()
            if record is None or not (record.nbd_device or record.nbd_pid):
                return {"held_seconds": 0.0, "read_only": False}
            with TrackerClient(self.control, client="bmig-dm") as client:
                return via_nbd.take_down(self.directory, self.name, record, client)

    # -- status ------------------------------------------------------------------------------

    def describe(self) -> dict | None:
        """The intercept as ``bmigrate track status`` shows it, or None."""
        record = self.record()
        if record is None:
            return None
        out: dict = {"kind": "dm", "device": record.device, "state": record.state,
                     "era_device": record.era_device, "metadata": record.metadata,
                     "era_block_size": record.block_sectors * era.SECTOR,
                     "imported_era": record.imported_era, "imports": record.imports,
                     "last_import": record.last_import or None,
                     "last_import_bytes": record.last_import_bytes}
        if record.why:
            out["why"] = record.why
        if record.nbd_device:
            out["nbd_device"] = record.nbd_device
        if record.state == ATTACHED:
            try:
                out["era"] = era.status(record.era_device).era
            except BmigError as exc:
                out["era"] = None
                out["why"] = exc.message
        return out


def _is_bmig_layer(devno: str) -> bool:
    return _dm_name_of(devno).startswith("bmig-")


def _dm_name_of(devno: str) -> str:
    try:
        with open(f"/sys/dev/block/{devno}/dm/name") as f:
            return f.read().strip()
    except OSError:
        return devno
