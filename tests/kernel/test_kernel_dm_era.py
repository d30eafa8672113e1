"""What dm-era guarantees about a write in flight when the era changes (the argument of
docs/dm-intercept.md rests on it), checked against the kernel itself.

A write is held in flight below dm-era (the device under it is suspended):
- its block is recorded (committed) in the era current when it was mapped, before its
  data reaches the device below, so a checkpoint taken meanwhile leaves it in the old
  era: an importer that read "since the new era" would miss it;
- a suspend of the era device does not return while the write is in flight, so after a
  suspend and resume every write recorded in an older era has completed.
"""

from __future__ import annotations

import os
import subprocess
import threading

import pytest

from bmig.dm import era
from tests.kernel.dm_helpers import MiB, run, write_at

pytestmark = pytest.mark.skipif(not os.environ.get("RUN_IN_VM"),
                                reason="needs device-mapper: runs in a VM")

BLOCK = 128          # sectors: 64 KiB


def blocks_since(since: int, metadata: str) -> set[int]:
    out: set[int] = set()
    for begin, end in era.written_since(since, metadata):
        out.update(range(begin, end))
    return out


def test_a_write_in_flight_stays_in_its_era_and_a_suspend_waits_for_it(tmp_path):
    run("modprobe", "-a", "dm-era", "loop")
    files = {}
    for name, size in (("origin", 8 * MiB), ("meta", 8 * MiB)):
        files[name] = str(tmp_path / f"{name}.img")
        with open(files[name], "wb") as f:
            f.truncate(size)
    origin = run("losetup", "--find", "--show", files["origin"]).stdout.strip()
    meta = run("losetup", "--find", "--show", files["meta"]).stdout.strip()
    sectors = 8 * MiB // 512
    lower, top = f"eralow{os.getpid()}", f"eratop{os.getpid()}"
    run("dmsetup", "create", lower, "--table", f"0 {sectors} linear {origin} 0")
    run("dmsetup", "create", top, "--table",
        era.table_line(sectors, meta, f"/dev/mapper/{lower}", BLOCK))
    try:
        write_at(f"/dev/mapper/{top}", 3 * 65536, os.urandom(4096))     # block 3, era 1
        old = era.status(top).era
        run("dmsetup", "suspend", "--nolockfs", lower)           # hold I/O below dm-era
        writer = threading.Thread(target=write_at,
                                  args=(f"/dev/mapper/{top}", 20 * 65536, os.urandom(4096)))
        writer.start()
        # The write is mapped, recorded and waits below: the metadata says so.
        run("dmsetup", "message", top, "0", "checkpoint")
        new = era.status(top).era
        assert new > old
        run("dmsetup", "message", top, "0", "take_metadata_snap")
        try:
            assert 20 not in blocks_since(new, meta)     # not in the new era...
            assert {3, 20} <= blocks_since(old, meta)    # ...but in the old one
        finally:
            run("dmsetup", "message", top, "0", "drop_metadata_snap")
        assert writer.is_alive()                         # its data has not landed
        suspend = subprocess.Popen(["dmsetup", "suspend", "--nolockfs", top])
        with pytest.raises(subprocess.TimeoutExpired):
            suspend.wait(timeout=2)                      # waits for the write in flight
        run("dmsetup", "resume", lower)
        assert suspend.wait(timeout=60) == 0
        writer.join(60)
        assert not writer.is_alive()
        run("dmsetup", "resume", top)
        assert era.status(top).era > new                 # a resume starts an era
    finally:
        for name in (top, lower):
            run("dmsetup", "resume", name, check=False)
            run("dmsetup", "remove", name, check=False)
        run("losetup", "-d", origin, check=False)
        run("losetup", "-d", meta, check=False)
