"""A real ext4 file system made and used through nbdfuse + loop + mount on bmig-nbd.

The kernel's block layer and ext4 are the client: mkfs (TRIM of the whole device,
WRITE_ZEROES for the journal), a file tree copied in, fsync (FLUSH), unmount. Then the
backing file must hold a clean file system (e2fsck), and every chunk the server was asked
to write, trim or zero must be dirty in breqd (invariants 1 and 4), compared against the
server's own log of the requests it received.
"""

from __future__ import annotations

import hashlib
import os
import shutil

import pytest

from tests.integration.nbd_helpers import (WRITE_LIKE, NbdFuse, logged_requests, require,
                                           start_nbd, tool)

MiB = 1 << 20


def tree_digest(root: str) -> dict[str, str]:
    out = {}
    for directory, _, files in os.walk(root):
        for name in files:
            path = os.path.join(directory, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, root)] = hashlib.sha256(f.read()).hexdigest()
    return out


def test_ext4_through_nbdfuse_is_clean_and_every_written_chunk_is_dirty(breqd, tmp_path):
    require("nbdfuse", "mkfs.ext4", "e2fsck", "losetup", "fusermount3")
    server = start_nbd(breqd, tmp_path, 256 * MiB)
    fuse = None
    try:
        fuse = NbdFuse(server.socket, str(tmp_path))
        loop = fuse.attach_loop()
        tool("mkfs.ext4", "-q", "-F", loop)
        mnt = str(tmp_path / "mnt")
        os.makedirs(mnt)
        mounted = tool("mount", loop, mnt, check=False)
        if mounted.returncode != 0:
            pytest.skip(f"cannot mount: {mounted.stderr.strip()}")
        source = os.path.join(os.path.dirname(__file__), "..", "..", "bmig")
        shutil.copytree(source, os.path.join(mnt, "tree"))
        with open(os.path.join(mnt, "random.bin"), "wb") as f:
            f.write(os.urandom(8 * MiB))
            f.flush()
            os.fsync(f.fileno())
        expected = tree_digest(mnt)
        tool("umount", mnt)
        # Mounted again read-only: the files came back through the proxy intact.
        tool("mount", "-o", "ro", loop, mnt)
        assert tree_digest(mnt) == expected
        tool("umount", mnt)
    finally:
        if fuse is not None:
            fuse.close()
        assert server.daemon.stop() == 0
    check = tool("e2fsck", "-fn", server.backing, check=False)
    assert check.returncode == 0, check.stdout + check.stderr
    requests = logged_requests(server.daemon.log())
    commands = {cmd for cmd, _, _ in requests}
    assert {"NBD_CMD_WRITE", "NBD_CMD_FLUSH", "NBD_CMD_TRIM"} <= commands, commands
    chunk = breqd.client().stats("d1")["chunk_size"]
    written = set()
    for cmd, offset, length in requests:
        if cmd in WRITE_LIKE:
            written.update(range(offset // chunk, (offset + length - 1) // chunk + 1))
    runs, end = breqd.client().query("d1", 0, 256 * MiB)
    dirty = set()
    for offset, length in runs:
        dirty.update(range(offset // chunk, (offset + length - 1) // chunk + 1))
    assert written and not written - dirty
