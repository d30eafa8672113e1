"""The guest's side of the power cut (tests/integration/test_kernel_power_cut.py).

    python -m tests.kernel.power_cut_guest before|after DIR

DIR is shared with the host (run-in-vm.sh -w DIR): the volume's image, breqd's state, the
dm intercept's records and its metadata file, the copy.

``before``: a volume with content, attached, copied to DIR/target.img, breqd cleared;
then 4 KiB writes, each flushed down to the host's file, to the first half while bmig-dm
imports every 0.1 s; after three imports bmig-dm is killed and the writes go to the
second half, so breqd never hears of them; DIR/writing appears after 16 of them, and they
go on until the host kills this kernel.

``after`` (the next boot, the same DIR): the volume set up again from its image, breqd
restarted on its state; the first import must set every chunk dirty (the tables and the
era device did not survive); then the intercept attached again, the dirty chunks copied
to the target, and the copy must equal the volume. Prints one JSON line.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import sys

from bmig.tracker.blocking_client import TrackerClient
from tests.daemon import Daemon, breqd_argv
from tests.kernel.dm_helpers import (CHUNK, MiB, Volume, bmig_dm_argv, bmigrate, record,
                                     run, write_at)

SIZE = 16 * MiB
NAME = "pcut"
CONTROL = "/run/bmig-power-cut-breqd.sock"        # the guest's own tmpfs: no socket on hostfs
IMPORTS_BEFORE_CUT = 3
WRITES_NOT_IMPORTED = 16


class Breqd:
    """What dm_helpers wants of the test suite's breqd fixture."""

    def __init__(self, directory: str):
        self.control = CONTROL
        self.daemon = Daemon(breqd_argv(os.path.join(directory, "state"),
                                        os.path.join(directory, "devices.d"), CONTROL),
                             os.path.join(directory, "breqd.log")).start()

    def client(self) -> TrackerClient:
        return TrackerClient(CONTROL, client="power-cut")


def dirty_chunks(breqd: Breqd) -> set[int]:
    with breqd.client() as client:
        runs, _ = client.query("d1", 0, SIZE)
    return {c for offset, length in runs
            for c in range(offset // CHUNK, (offset + length - 1) // CHUNK + 1)}


def read(path: str, offset: int = 0, length: int = SIZE) -> bytes:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        return os.pread(fd, length, offset)
    finally:
        os.close(fd)


def before(directory: str) -> None:
    run("modprobe", "-a", "dm-era", "loop")
    dm_state = os.path.join(directory, "dm")
    breqd = Breqd(directory)
    vol = Volume(NAME, os.path.join(directory, "vol.img"), SIZE)
    rng = random.Random(7)
    for offset in range(0, SIZE, MiB):
        write_at(vol.path, offset, rng.randbytes(MiB))
    bmigrate(breqd, dm_state, "track", "attach", "d1", "--dm", vol.path)
    run(*bmig_dm_argv(breqd, dm_state, "--once", "d1"))
    with open(os.path.join(directory, "target.img"), "wb") as f:     # the full copy
        f.write(read(vol.path))
        f.flush()
        os.fsync(f.fileno())
    with breqd.client() as client:
        client.clear_all("d1", force=True)
    importer = Daemon(bmig_dm_argv(breqd, dm_state, "--interval", "0.1", "d1"),
                      os.path.join(directory, "bmig-dm.log")).start()
    first = record(dm_state, "d1")["imports"]
    # The first half written while bmig-dm imports; each write durable (on the host's
    # file) before the next.
    while record(dm_state, "d1")["imports"] < first + IMPORTS_BEFORE_CUT:
        durable_write(vol.path, rng, 0)
        if importer.proc.poll() is not None:
            raise SystemExit("bmig-dm stopped before the cut")
    # bmig-dm killed: what is written from now on is in dm-era's metadata only, never
    # imported. The second half is written only from now on, so breqd has none of it.
    importer.kill9()
    for _ in range(WRITES_NOT_IMPORTED):
        durable_write(vol.path, rng, SIZE // 2)
    with open(os.path.join(directory, "writing"), "w") as f:
        f.write("cut now\n")
    while True:                         # until the host kills this kernel
        durable_write(vol.path, rng, SIZE // 2)


def durable_write(path: str, rng: random.Random, half: int) -> int:
    """4 KiB of random bytes at a random block of the half starting at ``half``,
    written with O_DIRECT and then flushed down to the host's file. Its offset."""
    offset = half + rng.randrange(SIZE // 2 // 4096) * 4096
    write_at(path, offset, rng.randbytes(4096))
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    return offset


def after(directory: str) -> None:
    run("modprobe", "-a", "dm-era", "loop")
    dm_state = os.path.join(directory, "dm")
    breqd = Breqd(directory)
    vol = Volume(NAME, os.path.join(directory, "vol.img"), SIZE, fresh=False)
    every = set(range(-(-SIZE // CHUNK)))
    survived = record(dm_state, "d1")
    first = run(*bmig_dm_argv(breqd, dm_state, "--once", "d1"), check=False)
    lost = record(dm_state, "d1")
    all_dirty_after_import = dirty_chunks(breqd) == every
    bmigrate(breqd, dm_state, "track", "detach", "d1", "--dm", vol.path)
    bmigrate(breqd, dm_state, "track", "attach", "d1", "--dm", vol.path)
    target = os.path.join(directory, "target.img")
    with open(target, "r+b") as f:                   # the final pass: the dirty chunks
        for chunk in sorted(dirty_chunks(breqd)):
            f.seek(chunk * CHUNK)
            f.write(read(vol.path, chunk * CHUNK, min(CHUNK, SIZE - chunk * CHUNK)))
        f.flush()
        os.fsync(f.fileno())
    source = hashlib.sha256(read(vol.path)).hexdigest()
    with open(target, "rb") as f:
        copy = hashlib.sha256(f.read()).hexdigest()
    bmigrate(breqd, dm_state, "track", "detach", "d1")
    breqd.daemon.stop()
    print(json.dumps({"imports_before_cut": survived["imports"],
                      "first_import_rc": first.returncode,
                      "first_import_stderr": first.stderr.strip(),
                      "state_after_import": lost["state"],
                      "all_dirty_after_import": all_dirty_after_import,
                      "identical": source == copy}))


if __name__ == "__main__":
    {"before": before, "after": after}[sys.argv[1]](sys.argv[2])
