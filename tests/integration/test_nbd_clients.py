"""bmig-nbd against real NBD clients: nbdinfo, qemu-io, qemu-img."""

from __future__ import annotations

import json

from tests.integration.nbd_helpers import nbd_server, require, tool  # noqa: F401

MiB = 1 << 20


def test_nbdinfo_json_shows_size_flags_block_sizes_and_contexts(nbd_server):
    require("nbdinfo")
    info = json.loads(tool("nbdinfo", "--json", nbd_server.uri).stdout)
    export = info["exports"][0]
    assert info["protocol"] == "newstyle-fixed" and info["structured"] is True
    assert export["export-size"] == 64 * MiB
    assert export["can_flush"] and export["can_fua"] and export["can_trim"]
    assert export["can_zero"] and export["can_multi_conn"] and not export["is_read_only"]
    assert export["block_size_preferred"] == 4096
    assert export["block_size_maximum"] == 32 * MiB
    assert "base:allocation" in export["contexts"]


def test_nbdinfo_list_names_the_export(nbd_server):
    require("nbdinfo")
    out = tool("nbdinfo", "--list", f"nbd+unix:///?socket={nbd_server.socket}").stdout
    assert 'export="d1"' in out


def test_qemu_io_round_trips_and_qemu_img_compare(nbd_server):
    require("qemu-io", "qemu-img")
    tool("qemu-io", "-f", "raw", nbd_server.uri,
         "-c", "write -P 0xab 0 1M", "-c", "read -P 0xab 0 1M", "-c", "flush",
         "-c", "write -P 0xcd 2M 64k", "-c", "write -z 1M 1M", "-c", "read -P 0 1M 1M",
         "-c", "discard 0 64k", "-c", "read -P 0 0 64k", "-c", "read -P 0xab 64k 960k",
         "-c", "write -P 0x11 -f 4M 4k", "-c", "read -P 0x11 4M 4k")
    tool("qemu-img", "compare", "-f", "raw", "-F", "raw", nbd_server.backing, nbd_server.uri)


def test_every_write_trim_and_zero_is_dirty_in_breqd(nbd_server, breqd):
    """Invariant 4: TRIM and WRITE_ZEROES dirty their chunks like writes."""
    require("qemu-io")
    tool("qemu-io", "-f", "raw", nbd_server.uri, "-c", "write -P 1 0 4k",
         "-c", "discard 8M 64k", "-c", "write -z 16M 64k")
    stats = breqd.client().stats("d1")
    assert stats["dirty_bytes"] == 3 * stats["chunk_size"]


def test_no_write_reaches_the_backing_when_breqd_is_gone(nbd_server, breqd):
    """Invariant 1: an unmarked write fails with EIO and leaves the source untouched."""
    require("qemu-io")
    breqd.stop()
    result = tool("qemu-io", "-f", "raw", nbd_server.uri, "-c", "write -P 0xee 0 4k",
                  check=False)
    assert "Input/output error" in result.stdout + result.stderr
    with open(nbd_server.backing, "rb") as f:
        assert f.read(4096) == bytes(4096)


def test_the_dirty_bitmap_is_a_meta_context_nbdinfo_can_map(nbd_server, breqd):
    """qemu:dirty-bitmap:NAME shows what breqd has dirty, as qemu-img and nbdinfo read it."""
    require("nbdinfo", "qemu-io")
    chunk = breqd.client().stats("d1")["chunk_size"]
    context = "qemu:dirty-bitmap:d1"
    info = json.loads(tool("nbdinfo", "--json", nbd_server.uri).stdout)
    assert context in info["exports"][0]["contexts"]
    tool("qemu-io", "-f", "raw", nbd_server.uri, "-c", f"write -P 7 {3 * chunk + 10} 100",
         "-c", f"write -z {10 * chunk} {2 * chunk}")
    extents = json.loads(tool("nbdinfo", f"--map={context}", "--json", nbd_server.uri).stdout)
    dirty = [(e["offset"], e["length"]) for e in extents if e["type"] & 1]
    assert dirty == [(3 * chunk, chunk), (10 * chunk, 2 * chunk)]
    assert sum(e["length"] for e in extents) == 64 * MiB
