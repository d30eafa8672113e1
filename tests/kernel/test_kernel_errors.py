"""I/O errors from real devices: nothing acknowledged as durable that was not written.

These tests run only inside a throw-away kernel (RUN_IN_VM is set there by
tests/kernel/run-in-vm.sh); tests/integration/test_kernel_vm.py boots one and runs this
directory in it. Each device is device-mapper over a loop device, whose table the test
switches at the moment it chooses (never a timer):

    linear   the device works
    flakey   dm-flakey with error_writes, always down: writes fail, reads work; a
             buffered write is taken into the page cache and the EIO comes at fdatasync,
             after which the kernel drops the pages it could not write
    error    dm-error over chunk 3 only: every I/O there fails at once (a partial-page
             write, which must read the page first, fails in pwrite), while the rest of
             the device, and so the next fdatasync, works: the refused write is followed
             by a DURABLE that must not cover it

- The source: after an fdatasync EIO under bmig-nbd's backing, bmig-nbd fails every later
  write and flush, also once the device works again and fdatasync would say "fine"
  although the failed write is gone (invariant 11); bmigrate replicate --status says so.
- The target, under protocols A, B and C and in a sync pass: whatever the target refused
  or lost stays dirty in breqd; every chunk breqd calls clean is on the target's disk
  (read back with the page cache dropped); the failure is reported; once the target works
  again a sync makes the copy identical.
"""

from __future__ import annotations

import json
import os
import subprocess

import pytest

from bmig.nbdclient import NbdClient, NbdError
from tests.daemon import Daemon, wait_until
from tests.integration.nbd_helpers import nbd_argv, start_nbd
from tests.integration.sync_helpers import (CHUNK, MiB, bmigrate, receivers,  # noqa: F401
                                            start_receiver, sync)

pytestmark = pytest.mark.skipif(not os.environ.get("RUN_IN_VM"),
                                reason="needs device-mapper: runs in a VM")

SIZE = 16 * MiB


def run(*argv: str) -> subprocess.CompletedProcess:
    done = subprocess.run(argv, capture_output=True, text=True, timeout=120,
                          stdin=subprocess.DEVNULL)
    if done.returncode != 0:
        raise AssertionError(f"{' '.join(argv)} failed ({done.returncode}): "
                             f"{done.stdout}{done.stderr}")
    return done


class DmDevice:
    """/dev/mapper/NAME over a loop device over a file; ``switch`` changes what it does."""

    def __init__(self, name: str, image: str, size: int):
        self.name, self.size = name, size
        self.loop_file = image
        with open(image, "wb") as f:
            f.truncate(size)
        self.loop = run("losetup", "--find", "--show", image).stdout.strip()
        self.sectors = size // 512
        run("dmsetup", "create", name, "--table", self._table("linear"))
        self.path = f"/dev/mapper/{name}"

    def _table(self, mode: str) -> str:
        if mode == "linear":
            return f"0 {self.sectors} linear {self.loop} 0"
        if mode == "flakey":          # up 0 s, down 1 s: always down; writes fail
            return f"0 {self.sectors} flakey {self.loop} 0 0 1 1 error_writes"
        if mode == "error":           # chunk 3 fails, the rest works
            first, end = 3 * CHUNK // 512, 4 * CHUNK // 512
            return "\n".join([f"0 {first} linear {self.loop} 0",
                              f"{first} {end - first} error",
                              f"{end} {self.sectors - end} linear {self.loop} {end}"])
        raise ValueError(mode)

    def switch(self, mode: str) -> None:
        run("dmsetup", "suspend", self.name)
        table = os.path.join(os.path.dirname(self.loop_file), f"{self.name}.table")
        with open(table, "w") as f:
            f.write(self._table(mode) + "\n")
        run("dmsetup", "load", self.name, table)
        run("dmsetup", "resume", self.name)

    def drop_cache(self) -> None:
        """What is on the disk from now on, not what the page cache kept."""
        run("blockdev", "--flushbufs", self.path)

    def read(self, offset: int, length: int) -> bytes:
        fd = os.open(self.path, os.O_RDONLY)
        try:
            return os.pread(fd, length, offset)
        finally:
            os.close(fd)

    def close(self) -> None:
        subprocess.run(["dmsetup", "remove", "--retry", self.name], capture_output=True,
                       timeout=120)
        subprocess.run(["losetup", "--detach", self.loop], capture_output=True, timeout=120)


@pytest.fixture
def dm(tmp_path):
    run("modprobe", "dm-flakey")
    run("modprobe", "loop")
    made: list[DmDevice] = []

    def make(name: str) -> DmDevice:
        device = DmDevice(name, str(tmp_path / f"{name}.img"), SIZE)
        made.append(device)
        return device

    yield make
    for device in reversed(made):
        device.close()


def nbd_status(breqd, manage_dir: str) -> dict:
    return json.loads(bmigrate(breqd, "replicate", "d1", "--status", "--manage-dir",
                               manage_dir, "--json").stdout)


def dirty_chunks(breqd) -> set[int]:
    runs, _ = breqd.client().query("d1", 0, SIZE)
    return {c for o, n in runs for c in range(o // CHUNK, (o + n - 1) // CHUNK + 1)}


def chunks_differing(source: str, target: DmDevice) -> set[int]:
    """Chunks whose bytes on the target's disk (page cache dropped) differ."""
    target.drop_cache()
    out = set()
    with open(source, "rb") as f:
        for c in range(SIZE // CHUNK):
            f.seek(c * CHUNK)
            if f.read(CHUNK) != target.read(c * CHUNK, CHUNK):
                out.add(c)
    return out


# -- the source: EIO on bmig-nbd's fdatasync -------------------------------------------------

def test_after_an_eio_on_the_sources_fdatasync_bmig_nbd_acknowledges_nothing(breqd, tmp_path,
                                                                            dm):
    source = dm("bmig-src")
    client = breqd.client()
    client.add_device("d1", SIZE)
    client.clear_all("d1", force=True)
    sock, manage = str(tmp_path / "nbd.sock"), str(tmp_path / "manage")
    server = Daemon(nbd_argv("--device", "d1", "--backing", source.path, "--unix", sock,
                             "--control", breqd.control, "--manage-dir", manage,
                             "--log-level", "debug"), str(tmp_path / "nbd.log")).start()
    uri = f"nbd+unix:///d1?socket={sock}"
    lost = b"L" * 4096
    try:
        with NbdClient.connect(uri, timeout=60) as nbd:
            nbd.pwrite(b"A" * 4096, 0)
            nbd.flush()
            source.switch("flakey")
            nbd.pwrite(lost, 4096)                     # into the page cache: acknowledged
            with pytest.raises(NbdError) as failed:    # its writeback fails
                nbd.flush()
            assert failed.value.errno_name == "EIO"
            source.switch("linear")                    # the device works again
            with pytest.raises(NbdError) as failed:    # ... but the lost write is gone
                nbd.flush()
            assert failed.value.errno_name == "EIO"
            for offset in (8192, 5 * CHUNK):          # a held chunk, and a new one
                with pytest.raises(NbdError) as failed:
                    nbd.pwrite(b"C" * 4096, offset)
                assert failed.value.errno_name == "EIO"
            assert nbd.pread(4096, 0) == b"A" * 4096   # reads go on
        status = nbd_status(breqd, manage)
        assert status["source_failed"] and "Input/output error" in status["source_failed"]
        shown = json.loads(bmigrate(breqd, "status", "d1", "--manage-dir", manage,
                                    "--json").stdout)
        assert shown["nbd"]["source_failed"] == status["source_failed"]
        assert "ERROR" in server.log() and "fdatasync failed" in server.log()
    finally:
        server.stop()
    source.drop_cache()
    assert source.read(4096, 4096) != lost             # why nothing may be acknowledged
    assert source.read(8192, 4096) == bytes(4096)       # refused: never written


# -- the target: EIO under protocols A, B and C ---------------------------------------------

@pytest.fixture
def replicated(breqd, tmp_path, receivers, dm):
    """bmig-nbd on a file with data in chunks 0-15, its copy on a device-mapper target,
    synced."""
    target = dm("bmig-tgt")
    server = start_nbd(breqd, tmp_path, SIZE)
    with open(server.backing, "r+b") as f:
        f.write(os.urandom(16 * CHUNK))
    r = start_receiver(tmp_path, {"d1": target.path})
    receivers.append(r)
    sync(breqd, "d1", "--source", server.backing, "--to", r.url("d1"), "--secret-file",
         r.secret_file, "--threshold", "0")
    yield server, r, target
    server.daemon.stop()


@pytest.mark.parametrize("mode", ["flakey", "error"], ids=["eio-at-fdatasync",
                                                           "eio-at-write"])
@pytest.mark.parametrize("protocol", ["A", "B", "C"])
def test_eio_on_the_target_leaves_what_it_lost_dirty(breqd, replicated, protocol, mode):
    server, r, target = replicated
    done = bmigrate(breqd, "replicate", "d1", "--to", r.url("d1"), "--secret-file",
                    r.secret_file, "--manage-dir", server.manage_dir, "--protocol", protocol,
                    "--json")
    assert json.loads(done.stdout)["replicating"]
    target.drop_cache()                 # a partial-page write must read the page first
    target.switch(mode)
    written = {3 * CHUNK + 100: os.urandom(1000), 40 * CHUNK: os.urandom(4096),
               41 * CHUNK + 512: os.urandom(512)}
    with NbdClient.connect(server.uri, timeout=60) as nbd:
        for offset, data in written.items():
            nbd.pwrite(data, offset)             # the source has them: acknowledged
        nbd.flush()
    wait_until(lambda: breqd.client().stats("d1")["held_bytes"] == 0, timeout=30,
               what="the holds to go")
    target.switch("linear")
    dirty = dirty_chunks(breqd)
    assert {o // CHUNK for o in written} <= dirty, f"lost but clean: {sorted(dirty)}"
    assert not chunks_differing(server.backing, target) - dirty
    status = nbd_status(breqd, server.manage_dir)
    assert not status["replicating"] and "Input/output error" in status["failed"], status
    sync(breqd, "d1", "--source", server.backing, "--to", r.url("d1"), "--secret-file",
         r.secret_file, "--threshold", "0")
    assert not chunks_differing(server.backing, target)


# -- the target: EIO in a sync pass ---------------------------------------------------------

@pytest.mark.parametrize("mode", ["flakey", "error"], ids=["eio-at-fdatasync",
                                                           "eio-at-write"])
def test_eio_on_the_target_in_a_sync_pass_commits_nothing_it_lost(breqd, replicated, mode):
    server, r, target = replicated
    written = {c * CHUNK + 100: os.urandom(3000) for c in [3, *range(20, 60, 3)]}
    with NbdClient.connect(server.uri, timeout=60) as nbd:
        for offset, data in written.items():
            nbd.pwrite(data, offset)
        nbd.flush()
    target.drop_cache()
    target.switch(mode)
    done = sync(breqd, "d1", "--source", server.backing, "--to", r.url("d1"),
                "--secret-file", r.secret_file, "--threshold", "0", check=False)
    assert done.returncode == 11, done.stderr                  # the target's I/O error
    assert "Input/output error" in done.stderr and "Traceback" not in done.stderr
    target.switch("linear")
    wait_until(lambda: breqd.client().stats("d1")["held_bytes"] == 0, timeout=30,
               what="the holds to go")
    dirty = dirty_chunks(breqd)
    assert dirty, "nothing dirty after a pass that failed"
    assert not chunks_differing(server.backing, target) - dirty
    sync(breqd, "d1", "--source", server.backing, "--to", r.url("d1"), "--secret-file",
         r.secret_file, "--threshold", "0")
    assert not chunks_differing(server.backing, target)
