"""Switching a dm device's tables, and reading them: the pieces attach, detach, the
import's boundary and the NBD leg share."""

from __future__ import annotations

import logging
import shutil
import os
import subprocess
import time

from bmig.dm import dmsetup, era
from bmig.dm.state import Record
from bmig.errors import BmigError, InterceptError

log = logging.getLogger("bmig.dm")


def swap_tables(name: str, flush: str = "") -> float:
    """Suspend (waiting for I/O in flight) and resume ``name``: an inactive table loaded
    before takes over at the resume. Both run in one child of its own session, so that
    the resume happens even if this process is killed in between. If the suspend fails,
    the inactive table is dropped first: the device resumes on its old one.

    ``flush``: a device below whose page cache is written back and dropped while ``name``
    is suspended (blockdev --flushbufs). A switch between a path that writes that device
    through its page cache (bmig-nbd's backing) and one that sends bios to it (a dm table
    onto it) needs it: a dirty page written back after the switch would overwrite newer
    data, and a clean stale page would be read as the device's content. If the flush
    fails, the device resumes on its old table. The seconds taken."""
    script = ('dmsetup suspend --nolockfs "$1" || { dmsetup clear "$1"; dmsetup resume "$1"; '
              'exit 1; }; '
              'if [ -n "$2" ] && ! blockdev --flushbufs "$2"; then dmsetup clear "$1"; '
              'dmsetup resume "$1" || exit 99; exit 98; fi; '
              'dmsetup resume "$1" || exit 99')
    started = time.monotonic()
    try:
        done = subprocess.run(["/bin/sh", "-c", script, "sh", name, flush],
                              capture_output=True, text=True, timeout=dmsetup.TIMEOUT,
                              start_new_session=True, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        raise InterceptError(f"{name}: suspend and resume did not finish within "
                             f"{dmsetup.TIMEOUT:g} s") from None
    seconds = time.monotonic() - started
    if done.returncode != 0:
        why = (done.stderr.strip().splitlines() or ["?"])[-1]
        raise InterceptError(f"{name}: switching tables failed: {why}")
    return seconds


def table_maps_onto(lines: list[str], devno: str) -> bool:
    """Every line of the table is one linear mapping onto ``devno`` at its own offset."""
    if not lines:
        return False
    for line in lines:
        parts = line.split()
        if len(parts) != 5 or parts[2] != "linear" or parts[3] != devno \
                or parts[4] != parts[0]:
            return False
    return True


def read_only_table(record: Record) -> list[str]:
    """dm-flakey with error_writes over the era device, down all the time: reads pass,
    writes fail with EIO."""
    dmsetup.ensure_target("flakey", "dm-flakey")
    era_info = dmsetup.info(record.era_device)
    if era_info is None:
        raise InterceptError(f"{record.era_device} is gone")
    return [f"0 {record.size // era.SECTOR} flakey {era_info.devno} 0 0 1 1 error_writes"]


def devno_or_empty(path: str) -> str:
    """MAJOR:MINOR of a device node, or '' if it is not there."""
    try:
        return dmsetup.devno_of(path)
    except OSError:
        return ""


def restore(top: str) -> None:
    """After a failed switch: the device runs on its old table, not suspended."""
    info = dmsetup.info(top)
    if info is None:
        return
    if info.inactive_table:
        quietly(dmsetup.clear, top)
    if info.suspended:
        quietly(dmsetup.resume, top)


def which(tool: str) -> bool:
    return shutil.which(tool) is not None or os.path.exists(f"/usr/sbin/{tool}") \
        or os.path.exists(f"/sbin/{tool}")


def quietly(action, *args) -> None:
    try:
        action(*args)
    except (BmigError, OSError) as exc:
        log.warning("while cleaning up: %s", getattr(exc, "message", None) or exc)
