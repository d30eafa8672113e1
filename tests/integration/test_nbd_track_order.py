"""The tracking layer against a real breqd: what bmig-nbd believes it holds, breqd holds.

The fast path writes to a chunk with no message when the layer thinks it holds it, so a
chunk the layer holds that breqd does not is a write nobody marks (invariant 1): a sender
that checked it out ships it, commits it, and it is clean while the source differs. The
order of the layer's messages on its one connection is what keeps the two views equal:
a release sent for a chunk must reach breqd before the next hold of that chunk.
"""

from __future__ import annotations

import asyncio

from bmig.nbd.layers.base import Capabilities, Layer
from bmig.nbd.layers.track import IDLE_SWEEPS, TrackLayer
from bmig.tracker.write_path_client import AsyncTrackerClient

CHUNK = 4096
SIZE = 64 * CHUNK


class Sink(Layer):
    """A device that takes every write at once."""

    def __init__(self) -> None:
        super().__init__(None)

    @property
    def size(self) -> int:
        return SIZE

    def capabilities(self) -> Capabilities:
        return Capabilities(True, True, True, True, True)

    def write_now(self, data, offset, fua):
        return True

    async def write(self, data, offset, fua): ...
    async def trim(self, offset, length, fua): ...
    async def zero(self, offset, length, fua, may_trim, fast): ...


def held_in_breqd(breqd, device: str) -> int:
    client = breqd.client()
    try:
        return int(client.stats(device)["held_bytes"])
    finally:
        client.close()


def test_a_chunk_let_go_and_written_again_in_one_turn_stays_held_in_breqd(breqd):
    """The sweep lets chunk 0 go while a write that covers it is already on its way to
    the slow path (it spans chunk 1, which is not held). The write holds chunks 0 and 1
    again; the release of chunk 0 was decided first and must reach breqd first, or breqd
    drops the new hold and the layer keeps writing chunk 0 with no mark."""
    setup = breqd.client()
    setup.add_device("d", SIZE, chunk_size=CHUNK)
    setup.clear_all("d", force=True)
    setup.close()

    async def main() -> None:
        tracker = AsyncTrackerClient(breqd.control, client="test")
        layer = TrackLayer(Sink(), tracker, "d", CHUNK, idle=3600)
        try:
            await layer.write(memoryview(b"a" * 10), 0, False)       # holds chunk 0
            for _ in range(IDLE_SWEEPS):
                layer._release()                                    # chunk 0 idles
            # In one loop turn, in this order: a write whose hold is queued first (chunk
            # 9, not held), the sweep that lets chunk 0 go, and a write to chunks 0 and 1
            # (chunk 1 is not held, so it takes the slow path and holds both).
            other = asyncio.ensure_future(layer.write(memoryview(b"c"), 9 * CHUNK, False))
            asyncio.get_running_loop().call_soon(layer._release)
            both = asyncio.ensure_future(
                layer.write(memoryview(b"b" * 100), CHUNK - 50, False))
            await both
            await other
            await tracker.stats("d")      # answered after everything sent before it
            assert 0 in layer.held and 1 in layer.held
            assert held_in_breqd(breqd, "d") == 3 * CHUNK, \
                "breqd dropped a hold the layer still writes under"
        finally:
            await layer.close()
            await tracker.close()

    asyncio.run(asyncio.wait_for(main(), 30))
