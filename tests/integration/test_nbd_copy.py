"""nbdcopy of a 256 MiB random image into the export, read-only mode, clean stop."""

from __future__ import annotations

import os

from tests.integration.nbd_helpers import nbd_server, require, start_nbd, tool  # noqa: F401

MiB = 1 << 20


def test_nbdcopy_256_mib_random_image_is_byte_equal(breqd, tmp_path):
    require("nbdcopy")
    image = tmp_path / "random.img"
    image.write_bytes(os.urandom(256 * MiB))
    server = start_nbd(breqd, tmp_path, 256 * MiB)
    try:
        tool("nbdcopy", "--flush", str(image), server.uri)
        with open(image, "rb") as a, open(server.backing, "rb") as b:
            while block := a.read(8 * MiB):
                assert b.read(8 * MiB) == block
        assert breqd.client().stats("d1")["dirty_bytes"] == 256 * MiB
    finally:
        assert server.daemon.stop() == 0


def test_read_only_export_refuses_writes_with_eperm(breqd, tmp_path):
    require("qemu-io")
    server = start_nbd(breqd, tmp_path, 4 * MiB, "--read-only")
    try:
        result = tool("qemu-io", "-f", "raw", server.uri, "-c", "write 0 4k", check=False)
        assert result.returncode != 0 or "Operation not permitted" in result.stdout
        assert breqd.client().stats("d1")["dirty_bytes"] == 0
    finally:
        assert server.daemon.stop() == 0
