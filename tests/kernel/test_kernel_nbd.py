"""The Linux kernel's own NBD client (/dev/nbdX) on bmig-nbd, with ext4 on top.

These tests run only inside a throw-away kernel (RUN_IN_VM is set there by
tests/kernel/run-in-vm.sh): this machine's kernel has no nbd module.
tests/integration/test_kernel_vm.py boots one and runs this directory in it.

mkfs, a file tree copied in, fsync, unmount and disconnect, all through the block layer
and the kernel's NBD client: the backing file must hold a clean ext4 file system that
mounts again with the same files, and every chunk the server was asked to write, trim or
zero must be dirty in breqd (invariants 1 and 4). Once over one connection, once over
four (nbd-client -C 4: the kernel opens them only when the server offers
NBD_FLAG_CAN_MULTI_CONN, and spreads its requests over them).
"""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest

from tests.integration.nbd_helpers import WRITE_LIKE, logged_requests, start_nbd
from tests.integration.test_nbd_ext4 import tree_digest

pytestmark = pytest.mark.skipif(not os.environ.get("RUN_IN_VM"),
                                reason="needs the kernel's nbd module: runs in a VM")

MiB = 1 << 20
NBD_DEVICE = "/dev/nbd0"


def run(*argv: str, check: bool = True) -> subprocess.CompletedProcess:
    done = subprocess.run(argv, capture_output=True, text=True, timeout=120,
                          stdin=subprocess.DEVNULL)
    if check and done.returncode != 0:
        raise AssertionError(f"{' '.join(argv)} failed ({done.returncode}): "
                             f"{done.stdout}{done.stderr}")
    return done


@pytest.fixture
def nbd_module():
    run("modprobe", "nbd", "nbds_max=2")
    yield NBD_DEVICE
    run("nbd-client", "-d", NBD_DEVICE, check=False)     # in case a test left it connected


def chunks_of(ranges, chunk: int) -> set[int]:
    out: set[int] = set()
    for offset, length in ranges:
        out.update(range(offset // chunk, (offset + length - 1) // chunk + 1))
    return out


@pytest.mark.parametrize("connections", [1, 4])
def test_ext4_through_the_kernel_nbd_client_is_clean_and_every_written_chunk_is_dirty(
        breqd, tmp_path, nbd_module, connections):
    """With 4 connections (nbd-client -C, which bmig-nbd's NBD_FLAG_CAN_MULTI_CONN
    allows) the kernel spreads the requests over them and sends each FLUSH on one of
    them; that it covers the writes of the others (one file descriptor, one fdatasync)
    would show only after a power cut. Here: the file system and the tracking hold."""
    size = 128 * MiB
    server = start_nbd(breqd, tmp_path, size)
    mnt = str(tmp_path / "mnt")
    os.makedirs(mnt)
    connected = mounted = False
    try:
        run("nbd-client", "-unix", server.socket, nbd_module, "-N", "d1",
            *(["-C", str(connections)] if connections > 1 else []))
        connected = True
        assert run("blockdev", "--getsize64", nbd_module).stdout.strip() == str(size)
        run("mkfs.ext4", "-q", "-F", nbd_module)
        run("mount", nbd_module, mnt)
        mounted = True
        source = os.path.join(os.path.dirname(__file__), "..", "..", "bmig")
        shutil.copytree(source, os.path.join(mnt, "tree"))
        with open(os.path.join(mnt, "random.bin"), "wb") as f:
            f.write(os.urandom(8 * MiB))
            f.flush()
            os.fsync(f.fileno())
        expected = tree_digest(mnt)
        run("umount", mnt)
        mounted = False
        run("mount", "-o", "ro", nbd_module, mnt)        # back through the proxy, intact
        mounted = True
        assert tree_digest(mnt) == expected
        run("umount", mnt)
        mounted = False
        run("nbd-client", "-d", nbd_module)
        connected = False
    finally:
        if mounted:
            run("umount", mnt, check=False)
        if connected:
            run("nbd-client", "-d", nbd_module, check=False)
        assert server.daemon.stop() == 0
    check = run("e2fsck", "-fn", server.backing, check=False)
    assert check.returncode == 0, check.stdout + check.stderr
    requests = logged_requests(server.daemon.log())
    commands = {cmd for cmd, _, _ in requests}
    assert {"NBD_CMD_WRITE", "NBD_CMD_FLUSH"} <= commands, commands
    assert server.daemon.log().count(": transmission on d1") == connections
    chunk = breqd.client().stats("d1")["chunk_size"]
    written = chunks_of([(o, n) for cmd, o, n in requests if cmd in WRITE_LIKE], chunk)
    runs, _ = breqd.client().query("d1", 0, size)
    assert written and not written - chunks_of(runs, chunk)
