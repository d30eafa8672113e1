"""bmig-nbd's breqd client when its connection goes: every request is answered.

bmig-nbd runs on uvloop, whose transports raise RuntimeError on a write once they are
closed (asyncio's drop the bytes in silence). A connection that breqd reset is closed
by the loop before the client's reader hears of it, so a request sent in between met a
closed transport: the RuntimeError got past the client, and the marks of that message
were never answered (their NBD writes hung, and so did bmig-nbd's stop). These tests
close the transport the same way (``abort``: closed now, told to the reader later) and
run on uvloop, as bmig-nbd does.
"""

from __future__ import annotations

import asyncio

import pytest
import uvloop

from bmig.errors import UnreachableError
from bmig.tracker.protocol import Op
from bmig.tracker.write_path_client import AsyncTrackerClient

SIZE = 1 << 20


def add_device(breqd) -> None:
    setup = breqd.client()
    try:
        setup.add_device("d", SIZE, chunk_size=4096)
    finally:
        setup.close()


def test_a_request_on_a_connection_closed_under_it_fails_as_unreachable(breqd):
    add_device(breqd)

    async def main() -> None:
        tracker = AsyncTrackerClient(breqd.control, client="test")
        try:
            await tracker.connect()
            tracker._writer.transport.abort()
            await asyncio.sleep(0)          # closed by now; the reader hears of it later
            with pytest.raises(UnreachableError, match="lost breqd"):
                await tracker.call(Op.STATS, {"device": "d"})
            # the next request connects again
            assert (await tracker.stats("d"))["size"] == SIZE
        finally:
            await tracker.close()

    uvloop.run(asyncio.wait_for(main(), 30))


def test_every_mark_of_a_message_is_answered_whatever_its_send_raised(breqd, monkeypatch):
    add_device(breqd)

    async def main() -> None:
        tracker = AsyncTrackerClient(breqd.control, client="test")

        async def broken(*args, **kwargs):
            raise RuntimeError("anything the send did not foresee")

        try:
            await tracker.connect()
            monkeypatch.setattr(tracker, "call", broken)
            marks = [tracker.mark("d", [(i * 4096, 4096)]) for i in range(3)]
            for mark in marks:
                with pytest.raises(RuntimeError, match="did not foresee"):
                    await mark
        finally:
            await tracker.close()

    uvloop.run(asyncio.wait_for(main(), 30))
