"""The cutover of a dm-tracked device through bmig-nbd (protocol C), under a write load the
freeze cutover cannot converge under.

Runs only in a throw-away kernel (see test_kernel_dm.py). ext4 on a dm device, mounted
and written all along by two writers: one creates, appends to, renames and fsyncs files
(test_kernel_dm_ext4's), the other overwrites random 4 KiB blocks of a file with O_DIRECT
as fast as it can. The link to the target is slow (a relay paced to LINK_RATE), so that
what the writers dirty in a pass takes longer than a second to ship: the freeze cutover
gives up (exit 10, nothing changed, the device still on dm-era and written). A cutover
--via-nbd whose pre-handover hook fails goes back: the device on dm-era again, the NBD
leg gone. One whose bmigrate is killed once the device maps onto bmig-nbd leaves bmig-nbd
serving it: the writers go on. The next cutover --via-nbd takes that leg down, switches
the device's table onto /dev/nbdX served by a new bmig-nbd, replicates with protocol C,
hands over, and leaves the device on the read-only table. The file system is never
unmounted before the handover; the target passes e2fsck -fn, holds every file as it was
last fsynced, and every O_DIRECT write that completed.
"""

from __future__ import annotations

import glob
import json
import mmap
import os
import random
import subprocess
import threading

import pytest

from tests.integration.sync_helpers import (bmigrate_argv, receivers,  # noqa: F401
                                            start_receiver)
from tests.integration.test_cutover import SlowRelay
from tests.kernel.dm_helpers import (MiB, Volume, bmigrate, detach_metadata_loops, record,
                                     run, table)
from tests.kernel.test_kernel_dm_ext4 import FileWriter, sha

pytestmark = pytest.mark.skipif(not os.environ.get("RUN_IN_VM"),
                                reason="needs device-mapper and nbd: runs in a VM")

SIZE = 16 * MiB
HOT = 1 * MiB                   # the O_DIRECT writer's file: 16 chunks rewritten at random
BLOCK = 4096
LINK_RATE = 1 * MiB          # bytes per second towards the target, per connection


class HotWriter(threading.Thread):
    """O_DIRECT 4 KiB overwrites at random blocks of one file; ``blocks`` is what every
    write that completed left (an overwrite of allocated blocks reaches the device before
    pwrite returns); stops at the first error (the handed-over source refuses writes)."""

    def __init__(self, path: str, seed: int, pause: float = 0.0):
        super().__init__(daemon=True)
        self.path, self.rng, self.pause = path, random.Random(seed), pause
        self.blocks = [bytes(BLOCK)] * (HOT // BLOCK)
        self.stop = threading.Event()
        self.count = 0
        self.error: OSError | None = None

    def prepare(self) -> None:
        """The file's blocks allocated and written (not unwritten extents), durably."""
        with open(self.path, "wb") as f:
            for i in range(len(self.blocks)):
                self.blocks[i] = self.rng.randbytes(BLOCK)
                f.write(self.blocks[i])
            f.flush()
            os.fsync(f.fileno())

    def run(self) -> None:
        buf = mmap.mmap(-1, BLOCK)
        fd = os.open(self.path, os.O_WRONLY | os.O_DIRECT)
        try:
            while not self.stop.is_set():
                block = self.rng.randrange(len(self.blocks))
                data = self.rng.randbytes(BLOCK)
                buf[:] = data
                os.pwrite(fd, buf, block * BLOCK)
                self.blocks[block] = data
                self.count += 1
                if self.pause:
                    self.stop.wait(self.pause)
        except OSError as exc:
            self.error = exc
        finally:
            os.close(fd)
            buf.close()


def still_written(files: FileWriter, hot: HotWriter) -> None:
    """Both writers go on, without an error."""
    count = hot.count
    files.wait_ops(3)
    assert files.error is None and files.is_alive()
    assert hot.error is None and hot.count > count


def assert_no_leg(dm_state: str) -> None:
    """No NBD leg left: the record says none, bmig-nbd gone, no NBD device connected."""
    left = record(dm_state, "d1")
    assert left["nbd_device"] == "" and left["nbd_pid"] == 0
    assert not glob.glob("/sys/block/nbd*/pid")


@pytest.mark.timeout(600)
def test_a_load_too_fast_for_the_freeze_is_cut_over_through_bmig_nbd(breqd, tmp_path,
                                                                      receivers):
    run("modprobe", "-a", "dm-era", "dm-flakey", "loop")
    run("modprobe", "nbd", "nbds_max=4")
    dm_state = str(tmp_path / "dm")
    vol = Volume(f"vianbd{os.getpid() % 1000}", str(tmp_path / "vol.img"), SIZE)
    mnt = str(tmp_path / "mnt")
    os.makedirs(mnt)
    target = str(tmp_path / "target.img")
    with open(target, "wb") as f:
        f.truncate(SIZE)
    receiver = start_receiver(tmp_path, {"d1": target})
    receivers.append(receiver)
    relay = SlowRelay(("127.0.0.1", receiver.port), rate=LINK_RATE).start()
    url = receiver.url("d1", port=relay.port)
    common = ("--source", vol.path, "--to", url, "--secret-file", receiver.secret_file,
              "--record-dir", str(tmp_path / "records"), "--json")

    def cutover(*extra: str) -> tuple[subprocess.CompletedProcess, list[dict]]:
        done = bmigrate(breqd, dm_state, "cutover", "d1", *common, *extra, check=False)
        return done, [json.loads(line) for line in done.stdout.splitlines()]

    mounted = False
    files = FileWriter(os.path.join(mnt, "data"), seed=17, names=6, pause=0.01)
    hot = HotWriter(os.path.join(mnt, "hot.bin"), seed=18, pause=0.002)
    try:
        run("mkfs.ext4", "-q", "-F", "-E", "nodiscard", vol.path)
        run("mount", vol.path, mnt)
        mounted = True
        os.makedirs(os.path.join(mnt, "data"))
        hot.prepare()
        files.start()
        bmigrate(breqd, dm_state, "track", "attach", "d1", "--dm", vol.path)
        on_era = table(vol.name)
        # The first copy over a fast path; the link to the target is slow from then on.
        done = bmigrate(breqd, dm_state, "sync", "d1", "--source", vol.path, "--to",
                        receiver.url("d1"), "--secret-file", receiver.secret_file, "--json",
                        check=False)
        assert done.returncode in (0, 15), done.stderr
        hot.start()

        # (a) The freeze cutover cannot drain: what the writers dirty outruns the link.
        done, _ = cutover()
        assert done.returncode == 10, done.stderr              # not converging
        assert table(vol.name) == on_era                       # nothing changed
        still_written(files, hot)

        # The way back: a cutover through bmig-nbd that fails (its pre-handover hook)
        # leaves the device on dm-era, written and tracked, the NBD leg gone.
        done, events = cutover("--via-nbd", "--pre-handover", "false")
        assert done.returncode == 12, done.stderr
        assert any("back on dm-era" in e.get("message", "") for e in events), events
        assert table(vol.name) == on_era
        assert_no_leg(dm_state)
        still_written(files, hot)

        # bmigrate killed once the device maps onto bmig-nbd: bmig-nbd goes on serving it.
        cut = subprocess.Popen(
            bmigrate_argv("cutover", "d1", *common, "--via-nbd"), stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL, text=True,
            env=dict(os.environ, BMIG_CONTROL=breqd.control, BMIG_DM_STATE=dm_state))
        try:
            assert cut.stdout is not None
            for line in cut.stdout:
                event = json.loads(line)
                if event.get("step") == 0 and event.get("status") == "done":
                    break
            cut.kill()
        finally:
            cut.kill()
            cut.wait(30)
        assert record(dm_state, "d1")["nbd_pid"] and table(vol.name) != on_era
        still_written(files, hot)

        # (b) Through bmig-nbd with protocol C: the leg the killed one left is taken down
        # first, and a new one is made.
        done, events = cutover("--via-nbd")
        assert done.returncode == 0, done.stderr
        assert os.path.ismount(mnt)                 # never unmounted before the handover
        result = events[-1]
        assert result["event"] == "cutover" and result["handed_over"]
        assert result["downtime_seconds"] is not None
        steps = {s["step"]: s for s in result["steps"]}
        assert steps[0]["nbd_device"].startswith("/dev/nbd") and steps[8]["read_only"]
        hot.join(60)
        assert not hot.is_alive() and hot.error is not None     # refused after the handover
        files.stop.set()
        files.join(60)
        assert table(vol.name)[0].split()[2] == "flakey"        # read-only over dm-era
        assert_no_leg(dm_state)
        assert hot.count > 50 and files.ops > 20
    finally:
        files.stop.set()
        hot.stop.set()
        relay.stop()
        if mounted:
            run("umount", mnt, check=False)
        bmigrate(breqd, dm_state, "track", "detach", "d1", check=False)   # the NBD leg too
        for connected in glob.glob("/sys/block/nbd*/pid"):          # if that failed
            run("nbd-client", "-d", f"/dev/{connected.split('/')[3]}", check=False)
        vol.close()
        detach_metadata_loops(dm_state)
    check = run("e2fsck", "-fn", target, check=False)
    assert check.returncode == 0, check.stdout + check.stderr
    tmnt = str(tmp_path / "tmnt")
    os.makedirs(tmnt)
    run("mount", "-o", "ro,loop,noload", target, tmnt)
    try:
        for name, durable in files.durable.items():
            with open(os.path.join(tmnt, "data", name), "rb") as f:
                got = sha(f.read())
            assert got in (durable, files.pending.get(name)), name
        with open(os.path.join(tmnt, "hot.bin"), "rb") as f:
            copied = f.read()
        differ = [i for i, data in enumerate(hot.blocks)
                  if copied[i * BLOCK:(i + 1) * BLOCK] != data]
        assert not differ, f"{len(differ)} O_DIRECT writes missing, first at block {differ[0]}"
    finally:
        run("umount", tmnt, check=False)
