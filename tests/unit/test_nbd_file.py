"""The file layer: FUA and FLUSH reach fdatasync (invariant 5); trims and zeros read as zeros."""

from __future__ import annotations

import asyncio
import os

import pytest

from bmig.nbd.layers import file as file_layer


@pytest.fixture
def layer(tmp_path):
    path = tmp_path / "b.img"
    path.write_bytes(b"\xaa" * (1 << 20))
    layer = file_layer.FileLayer(str(path))
    yield layer
    asyncio.run(layer.close())


def read(layer, offset, n):
    buf = bytearray(n)
    asyncio.run(layer.read(memoryview(buf), offset))
    return bytes(buf)


def test_fua_and_flush_call_fdatasync_before_returning(layer, monkeypatch):
    synced = []
    monkeypatch.setattr(os, "fdatasync", lambda fd: synced.append(fd))
    asyncio.run(layer.write(memoryview(b"x" * 10), 0, fua=False))
    assert synced == []
    asyncio.run(layer.write(memoryview(b"x" * 10), 0, fua=True))
    asyncio.run(layer.flush())
    assert len(synced) == 2


@pytest.mark.parametrize("action", [
    lambda l: l.trim(4096, 8192, False),
    lambda l: l.zero(4096, 8192, False, may_trim=True, fast=False),
    lambda l: l.zero(4096, 8192, False, may_trim=False, fast=False),
])
def test_trimmed_and_zeroed_ranges_read_back_as_zeros(layer, action):
    asyncio.run(action(layer))
    assert read(layer, 4096, 8192) == bytes(8192)
    assert read(layer, 0, 4096) == b"\xaa" * 4096
    assert read(layer, 12288, 4096) == b"\xaa" * 4096


def test_fast_zero_without_a_hole_is_not_supported(layer):
    with pytest.raises(OSError):
        asyncio.run(layer.zero(0, 4096, False, may_trim=False, fast=True))
    assert read(layer, 0, 4096) == b"\xaa" * 4096
