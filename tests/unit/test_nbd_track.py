"""The tracking layer's order: mark durable, write, mark again, then reply (invariants 1, 2)."""

from __future__ import annotations

import asyncio

import pytest

from bmig.errors import UnreachableError
from bmig.nbd.layers.base import Capabilities, Layer
from bmig.nbd.layers.track import TrackingFailed, TrackLayer


class Recorder(Layer):
    def __init__(self, events: list[str]):
        super().__init__(None)
        self.events = events

    @property
    def size(self) -> int:
        return 1 << 20

    def capabilities(self) -> Capabilities:
        return Capabilities(True, True, True, True, True)

    async def write(self, data, offset, fua):
        self.events.append(f"write {offset}+{len(data)}")

    async def trim(self, offset, length, fua):
        self.events.append(f"trim {offset}+{length}")

    async def zero(self, offset, length, fua, may_trim, fast):
        self.events.append(f"zero {offset}+{length}")


class FakeTracker:
    def __init__(self, events: list[str], fail: bool = False):
        self.events = events
        self.fail = fail

    async def mark(self, device, ranges):
        await asyncio.sleep(0)      # durable only after a round trip
        if self.fail:
            raise UnreachableError("breqd is gone")
        self.events.append(f"mark {ranges}")

    async def mark_completed(self, device, ranges):
        self.events.append(f"again {ranges}")


@pytest.mark.parametrize("call, done", [
    (lambda l: l.write(memoryview(b"x" * 10), 5, False), "write 5+10"),
    (lambda l: l.trim(5, 10, False), "trim 5+10"),
    (lambda l: l.zero(5, 10, False, True, False), "zero 5+10"),
])
def test_mark_durable_then_write_then_mark_again(call, done):
    events: list[str] = []
    layer = TrackLayer(Recorder(events), FakeTracker(events), "d")
    asyncio.run(call(layer))
    assert events == ["mark [(5, 10)]", done, "again [(5, 10)]"]


def test_a_failed_mark_fails_the_request_and_writes_nothing():
    events: list[str] = []
    layer = TrackLayer(Recorder(events), FakeTracker(events, fail=True), "d")
    with pytest.raises(TrackingFailed):
        asyncio.run(layer.write(memoryview(b"x"), 0, False))
    assert events == []


def test_a_layer_must_handle_every_write_like_command():
    class Forgetful(Layer):
        async def write(self, data, offset, fua): ...
        async def trim(self, offset, length, fua): ...

    with pytest.raises(TypeError):
        Forgetful(None)
