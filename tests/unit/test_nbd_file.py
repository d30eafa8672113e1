"""The file layer: FUA and FLUSH reach fdatasync (invariant 5); trims and zeros read as zeros."""

from __future__ import annotations

import asyncio
import os

import pytest

from bmig.nbd.layers import file as file_layer
from bmig.nbd.layers.base import Layer
from bmig.nbd.layers.control import ControlLayer
from bmig.nbd.layers.replicate import ReplicateLayer
from bmig.nbd.layers.track import TrackLayer


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
    lambda l, fua: l.trim(4096, 8192, fua),
    lambda l, fua: l.zero(4096, 8192, fua, may_trim=True, fast=False),
    lambda l, fua: l.zero(4096, 8192, fua, may_trim=False, fast=False),
], ids=["trim", "zero-may-trim", "zero"])
def test_a_trim_or_zero_with_fua_calls_fdatasync_before_returning(layer, monkeypatch, action):
    """Whether the range became a hole or written zeros."""
    synced = []
    monkeypatch.setattr(os, "fdatasync", lambda fd: synced.append(fd))
    asyncio.run(action(layer, False))
    assert synced == []
    asyncio.run(action(layer, True))
    assert len(synced) == 1


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


# -- after a failed fdatasync nothing is acknowledged any more (invariant 11) -----------------

class FailingSync:
    """fdatasync as the kernel does it after a writeback error: EIO once, then success
    (the error is reported once per open file), though the pages are gone."""

    def __init__(self):
        import threading
        self.calls = 0
        self.running = 0
        self.most_at_once = 0
        self.gate = threading.Event()     # the failing call waits for it
        self.gate.set()
        self._lock = threading.Lock()

    def __call__(self, fd: int) -> None:
        import errno
        with self._lock:
            self.calls += 1
            first = self.calls == 1
            self.running += 1
            self.most_at_once = max(self.most_at_once, self.running)
        try:
            if first:
                assert self.gate.wait(10)
                raise OSError(errno.EIO, "Input/output error")
        finally:
            with self._lock:
                self.running -= 1


@pytest.mark.parametrize("first", ["flush", "fua-write", "fua-zero"])
def test_after_a_failed_fdatasync_every_write_and_flush_fails(layer, monkeypatch, first):
    import errno
    sync = FailingSync()
    monkeypatch.setattr(os, "fdatasync", sync)
    start = {"flush": lambda: layer.flush(),
             "fua-write": lambda: layer.write(memoryview(b"x" * 10), 0, fua=True),
             "fua-zero": lambda: layer.zero(0, 4096, True, may_trim=False, fast=False)}
    with pytest.raises(OSError) as raised:
        asyncio.run(start[first]())
    assert raised.value.errno == errno.EIO
    for action in (lambda: layer.flush(),                       # the kernel says OK now
                   lambda: layer.write(memoryview(b"y" * 10), 4096, fua=False),
                   lambda: layer.write(memoryview(b"y" * 10), 4096, fua=True),
                   lambda: layer.trim(0, 4096, False),
                   lambda: layer.zero(0, 4096, False, may_trim=False, fast=False)):
        with pytest.raises(OSError) as raised:
            asyncio.run(action())
        assert raised.value.errno == errno.EIO
    assert not layer.write_now(memoryview(b"z"), 8192, False)
    assert read(layer, 4096, 10) == b"\xaa" * 10                # nothing more was written
    assert sync.calls == 1
    assert layer.failure and "fdatasync failed" in layer.failure      # for status


def test_a_flush_overlapping_the_failing_one_fails_too(layer, monkeypatch):
    """Two flushes at once: the kernel reports the error to one of them only. The other
    must not succeed on that account: fdatasync calls run one at a time."""
    sync = FailingSync()
    sync.gate.clear()
    monkeypatch.setattr(os, "fdatasync", sync)

    async def main():
        first = asyncio.ensure_future(layer.flush())
        while not sync.calls:                  # the first is in fdatasync, held there
            await asyncio.sleep(0.001)
        second = asyncio.ensure_future(layer.flush())
        await asyncio.sleep(0)                 # the second flush starts
        sync.gate.set()
        return await asyncio.gather(first, second, return_exceptions=True)

    results = asyncio.run(main())
    assert all(isinstance(r, OSError) for r in results), results
    assert sync.most_at_once == 1


class Shifted(Layer):
    """A layer between the others that changes reads: they must still go through it."""

    def read_now(self, buf, offset):
        return self._next().read_now(buf, offset + 4096)

    async def read(self, buf, offset):
        await self._next().read(buf, offset + 4096)

    async def write(self, data, offset, fua):
        raise NotImplementedError

    trim = zero = write


def test_reads_skip_the_layers_that_leave_them_alone(tmp_path):
    """The tracking chain (control, tracking, replication) does nothing to a read: a read
    from its top is one call into the file layer (each layer on the way cost a call or
    two per read: ~0.4 us of bmig-nbd's ~8 us, bench/README.md "Figures: several
    connections"); a layer that changes reads is kept in their way."""
    path = tmp_path / "b.img"
    path.write_bytes(b"a" * 4096 + b"b" * 4096)
    bottom = file_layer.FileLayer(str(path))

    class Tracker:
        session, connected = 1, True

    replicate = ReplicateLayer(bottom, "d")
    top = ControlLayer(TrackLayer(replicate, Tracker(), "d", 4096, mirror=replicate), "d")
    assert top.read_now == bottom.read_now and top.read == bottom.read
    assert read(top, 0, 4096) == b"a" * 4096
    shifted = ControlLayer(Shifted(ReplicateLayer(bottom, "d")), "d")
    assert read(shifted, 0, 4096) == b"b" * 4096
    buf = bytearray(4096)
    assert shifted.read_now(memoryview(buf), 0) and bytes(buf) == b"b" * 4096
    asyncio.run(bottom.close())
