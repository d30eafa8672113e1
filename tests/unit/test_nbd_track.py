"""The tracking layer: mark durable with a hold, write, release later (invariants 1, 2, 4).

A held chunk stays dirty in breqd through any checkout and commit (tests/integration/
test_breqd_holds.py), so the release after the write is the second mark of invariant 2.
These tests drive the layer against a fake breqd that records what it is told, in order.
"""

from __future__ import annotations

import asyncio

import pytest

from bmig.errors import UnreachableError
from bmig.nbd.layers.base import Capabilities, Layer
from bmig.nbd.layers.track import (IDLE_SWEEPS, KEPT_MIRRORED_IDLES, TrackingFailed,
                                   TrackLayer, runs_of)

CHUNK = 4096


class Recorder(Layer):
    def __init__(self, events: list[str]):
        super().__init__(None)
        self.events = events
        self.gate: asyncio.Event | None = None     # set by a test to hold writes back

    @property
    def size(self) -> int:
        return 1 << 20

    def capabilities(self) -> Capabilities:
        return Capabilities(True, True, True, True, True)

    def write_now(self, data, offset, fua):
        if self.gate is not None:
            return False
        self.events.append(f"write {offset}+{len(data)}")
        return True

    async def write(self, data, offset, fua):
        if self.gate is not None:
            await self.gate.wait()
        self.events.append(f"write {offset}+{len(data)}")

    async def trim(self, offset, length, fua):
        self.events.append(f"trim {offset}+{length}")

    async def zero(self, offset, length, fua, may_trim, fast):
        self.events.append(f"zero {offset}+{length}")


class FakeTracker:
    """breqd as the layer sees it: a session number, marks with holds, releases."""

    def __init__(self, events: list[str], fail: bool = False):
        self.events = events
        self.fail = fail
        self.mirrors = False
        self.session = 1
        self.connected = True

    async def mark(self, device, ranges, hold=False, sync=False):
        await asyncio.sleep(0)      # durable only after a round trip
        if self.fail:
            raise UnreachableError("breqd is gone")
        kind = ("sync-hold" if sync else "hold") if hold else "mark"
        self.events.append(f"{kind} {ranges}")
        return self.session

    async def mark_sync(self, device, ranges):
        """A synchronous hold; ``mirrors`` says whether breqd answers that the chunks
        are mirrored (they were clean), else they were dirty already."""
        session = await self.mark(device, ranges, hold=True, sync=True)
        return session, (list(ranges) if self.mirrors else [])

    def release(self, device, ranges, synced=False):
        self.events.append(f"{'release-synced' if synced else 'release'} {ranges}")
        done = asyncio.get_running_loop().create_future()
        done.set_result(None)
        return done

    def lose_connection(self):
        self.session += 1


def make(events, **kw):
    tracker = FakeTracker(events, **kw)
    return TrackLayer(Recorder(events), tracker, "d", CHUNK, idle=3600), tracker


def sweep(layer: TrackLayer) -> None:
    """One idle period of the timer, and one more turn: what was not written in it goes."""
    for _ in range(IDLE_SWEEPS + 1):
        layer._release()


@pytest.mark.parametrize("call, done", [
    (lambda l: l.write(memoryview(b"x" * 10), 5, False), "write 5+10"),
    (lambda l: l.trim(5, 10, False), "trim 5+10"),
    (lambda l: l.zero(5, 10, False, True, False), "zero 5+10"),
])
def test_hold_durable_then_write_then_release_after_it(call, done):
    events: list[str] = []
    layer, _ = make(events)

    async def main():
        await call(layer)
        assert events == ["hold [(5, 10)]", done]
        sweep(layer)                       # idle for a sweep: the chunk is let go
        await asyncio.sleep(0)             # the release is sent
        await layer.close()

    asyncio.run(main())
    assert events == ["hold [(5, 10)]", done, f"release [(0, {CHUNK})]"]


def test_a_write_to_a_held_chunk_needs_no_message_to_breqd():
    events: list[str] = []
    layer, _ = make(events)

    async def main():
        await layer.write(memoryview(b"a" * 100), 0, False)
        assert layer.write_now(memoryview(b"b" * 100), 200, False)
        assert not layer.write_now(memoryview(b"c" * 100), CHUNK, False)   # not held
        await layer.close()

    asyncio.run(main())
    assert events == ["hold [(0, 100)]", "write 0+100", "write 200+100"]


def fast_path_is_consistent(layer: TrackLayer) -> bool:
    """The fast path's bit for a chunk (``_plain``) says it is held and its Hold tainted,
    never more: a write under the bit skips the mark and the tainting. Its record of
    writes (``_written``) is only ever of held chunks."""
    return (all(c in layer.held and layer.held[c].tainted for c in layer._plain.search(1))
            and all(c in layer.held for c in layer._written.search(1)))


def test_a_chunk_let_go_is_marked_again_before_its_next_write():
    events: list[str] = []
    layer, _ = make(events)

    async def main():
        await layer.write(memoryview(b"a"), 0, False)
        assert layer.write_now(memoryview(b"b"), 0, False)
        sweep(layer)
        assert 0 not in layer.held and fast_path_is_consistent(layer)
        assert not layer.write_now(memoryview(b"c"), 0, False)
        await layer.write(memoryview(b"c"), 0, False)
        await layer.close()

    asyncio.run(main())
    assert [e for e in events if e.startswith(("hold", "release"))] == [
        "hold [(0, 1)]", f"release [(0, {CHUNK})]", "hold [(0, 1)]"]


def test_after_breqds_connection_changed_no_write_goes_under_a_forgotten_hold():
    """Holds end with the connection: once a write on the new one has made the layer
    start afresh, a chunk held on the old one is marked again before it is written."""
    events: list[str] = []
    layer, tracker = make(events)

    async def main():
        await layer.write(memoryview(b"a"), 0, False)            # held on session 1
        assert layer.write_now(memoryview(b"a"), 0, False)
        tracker.lose_connection()
        await layer.write(memoryview(b"b"), CHUNK, False)        # held on session 2
        assert set(layer.held) == {1} and fast_path_is_consistent(layer)
        assert layer.write_now(memoryview(b"c"), CHUNK, False)
        assert not layer.write_now(memoryview(b"d"), 0, False)
        await layer.close()

    asyncio.run(main())
    assert [e for e in events if e.startswith("hold")] == [
        "hold [(0, 1)]", f"hold [({CHUNK}, 1)]"]


def test_a_write_to_the_last_partial_chunk_takes_the_fast_path_and_is_let_go():
    class Short(Recorder):
        @property
        def size(self) -> int:
            return 3 * CHUNK + 1

    events: list[str] = []
    layer = TrackLayer(Short(events), FakeTracker(events), "d", CHUNK, idle=3600)

    async def main():
        await layer.write(memoryview(b"a"), 3 * CHUNK, False)
        assert layer.write_now(memoryview(b"b"), 3 * CHUNK, False)
        sweep(layer)
        await asyncio.sleep(0)
        assert not layer.held and fast_path_is_consistent(layer)
        await layer.close()

    asyncio.run(main())
    assert [e for e in events if e.startswith(("hold", "release"))] == [
        f"hold [({3 * CHUNK}, 1)]", f"release [({3 * CHUNK}, 1)]"]


def test_past_the_hold_limit_a_write_on_the_fast_path_counts_as_recent():
    events: list[str] = []
    layer = TrackLayer(Recorder(events), FakeTracker(events), "d", CHUNK, hold_limit=2,
                       idle=3600)

    async def main():
        await layer.write(memoryview(b"a"), 0, False)
        await layer.write(memoryview(b"b"), CHUNK, False)
        layer._release()                                         # a sweep: both older
        assert layer.write_now(memoryview(b"c"), 0, False)      # chunk 0 written since
        await layer.write(memoryview(b"d"), 2 * CHUNK, False)    # one too many
        assert set(layer.held) == {0, 2}
        await layer.close()

    asyncio.run(main())


def test_a_failed_mark_fails_the_request_and_writes_nothing():
    events: list[str] = []
    layer, _ = make(events, fail=True)
    with pytest.raises(TrackingFailed):
        asyncio.run(layer.write(memoryview(b"x"), 0, False))
    assert events == []
    assert not layer.held


def test_a_hold_lost_during_the_write_is_marked_again_before_the_reply():
    """breqd restarted while the write ran: a sender may have committed the chunk."""
    events: list[str] = []
    layer, tracker = make(events)

    async def main():
        recorder = layer.inner
        recorder.gate = asyncio.Event()
        write = asyncio.ensure_future(layer.write(memoryview(b"x" * 10), 0, False))
        while not layer.held:
            await asyncio.sleep(0)
        tracker.lose_connection()
        recorder.gate.set()
        await write
        recorder.gate = None          # the recorder takes fast writes again: only the
        assert not layer.write_now(memoryview(b"y"), 0, False)   # lost hold refuses it
        await layer.close()

    asyncio.run(main())
    assert events == ["hold [(0, 10)]", "write 0+10", "mark [(0, 10)]"]


def test_a_chunk_is_never_released_while_a_write_to_it_runs():
    events: list[str] = []
    layer, _ = make(events)

    async def main():
        recorder = layer.inner
        recorder.gate = asyncio.Event()
        write = asyncio.ensure_future(layer.write(memoryview(b"x" * 10), 0, False))
        while not layer._busy:             # the write holds its chunk and waits at the gate
            await asyncio.sleep(0)
        assert 0 in layer.held
        for _ in range(3):
            sweep(layer)
        await asyncio.sleep(0)
        assert 0 in layer.held
        assert not any(e.startswith("release") for e in events)
        recorder.gate.set()
        await write
        sweep(layer)
        await asyncio.sleep(0)
        await layer.close()

    asyncio.run(main())
    assert events == ["hold [(0, 10)]", "write 0+10", f"release [(0, {CHUNK})]"]


def test_a_chunk_written_within_each_idle_period_stays_held():
    """Random writes over a large device come back to each chunk only now and then:
    a chunk is let go only after a whole idle period without writes, not at the first
    sweep that finds it untouched."""
    events: list[str] = []
    layer, _ = make(events)

    async def main():
        await layer.write(memoryview(b"a"), 0, False)
        await layer.write(memoryview(b"b"), CHUNK, False)
        for _ in range(3 * IDLE_SWEEPS):
            assert layer.write_now(memoryview(b"c"), 0, False)    # chunk 0 kept busy
            layer._release()
        await asyncio.sleep(0)
        assert 0 in layer.held and 1 not in layer.held
        await layer.close()

    asyncio.run(main())
    assert [e for e in events if e.startswith(("hold", "release"))] == [
        "hold [(0, 1)]", f"hold [({CHUNK}, 1)]", f"release [({CHUNK}, {CHUNK})]"]


def test_a_chunk_goes_only_after_idle_sweeps_without_a_write():
    events: list[str] = []
    layer, _ = make(events)

    async def main():
        await layer.write(memoryview(b"a"), 0, False)
        for _ in range(IDLE_SWEEPS):
            layer._release()
        assert 0 in layer.held                 # idle for less than the whole period
        layer._release()
        assert 0 not in layer.held
        await layer.close()

    asyncio.run(main())


def test_past_the_hold_limit_the_oldest_chunks_are_released():
    events: list[str] = []
    tracker = FakeTracker(events)
    layer = TrackLayer(Recorder(events), tracker, "d", CHUNK, hold_limit=2, idle=60)

    async def main():
        for i in range(3):
            await layer.write(memoryview(b"x"), i * CHUNK, False)
        assert len(layer.held) <= 2
        await asyncio.sleep(0)
        await layer.close()

    asyncio.run(main())
    assert any(e.startswith("release") for e in events)


def test_past_the_hold_limit_no_chunk_is_released_before_or_while_it_is_written():
    """Two writes at once with room for one hold: neither the first's chunk (its write
    runs) nor the second's (taken for the write about to run) may be let go for the
    limit; either would leave a write with no hold and no mark after it."""
    events: list[str] = []
    layer = TrackLayer(Recorder(events), FakeTracker(events), "d", CHUNK, hold_limit=1,
                       idle=3600)

    async def main():
        recorder = layer.inner
        recorder.gate = asyncio.Event()
        first = asyncio.ensure_future(layer.write(memoryview(b"a"), 0, False))
        second = asyncio.ensure_future(layer.write(memoryview(b"b"), CHUNK, False))
        while len(layer._busy) < 2:        # both hold their chunk and wait at the gate
            await asyncio.sleep(0)
        await asyncio.sleep(0)             # a release would have been sent
        assert not any(e.startswith("release") for e in events), events
        recorder.gate.set()
        await first
        await second
        await layer.close()

    asyncio.run(main())
    assert events == ["hold [(0, 1)]", f"hold [({CHUNK}, 1)]", "write 0+1", f"write {CHUNK}+1"]


def test_runs_of_chunks():
    assert runs_of([5, 1, 2, 3, 9]) == [(1, 4), (5, 6), (9, 10)]
    assert runs_of([]) == []


def test_a_layer_must_handle_every_write_like_command():
    class Forgetful(Layer):
        async def write(self, data, offset, fua): ...
        async def trim(self, offset, length, fua): ...

    with pytest.raises(TypeError):
        Forgetful(None)


def test_write_now_is_refused_by_default_so_a_layer_sees_every_write():
    class Passing(Layer):
        async def write(self, data, offset, fua): ...
        async def trim(self, offset, length, fua): ...
        async def zero(self, offset, length, fua, may_trim, fast): ...

    assert Passing(Recorder([])).write_now(memoryview(b"x"), 0, False) is False


# -- while replicating (invariant 6): holds go synced once durable on the target -----------

class FakeMirror:
    """The replication layer as the tracking layer sees it."""

    def __init__(self):
        self.active = True
        self.generation = 1
        self.durable_seq = 0
        self.listeners = []

    def add_listener(self, callback):
        self.listeners.append(callback)

    def durable(self, seq: int) -> None:
        self.durable_seq = seq
        for callback in self.listeners:
            callback()


class Replicated(Recorder):
    """Writes answered with the replica seq they were sent under (None: not replicated)."""

    def __init__(self, events):
        super().__init__(events)
        self.seq = 0
        self.reaches_target = True

    async def write(self, data, offset, fua):
        await super().write(data, offset, fua)
        if not self.reaches_target:
            return None
        self.seq += 1
        return self.seq


def make_replicated(events):
    tracker, mirror = FakeTracker(events), FakeMirror()
    inner = Replicated(events)
    return TrackLayer(inner, tracker, "d", CHUNK, idle=3600, mirror=mirror), inner, mirror


def test_a_replicated_write_is_released_synced_only_once_durable_on_the_target():
    """Protocol A answers before the target has the write: however long that takes,
    the hold must not lapse into plain dirty, or the next sync ships it again."""
    events: list[str] = []
    layer, _, mirror = make_replicated(events)

    async def main():
        await layer.write(memoryview(b"a"), 0, False)            # seq 1
        await layer.write(memoryview(b"b"), CHUNK, False)        # seq 2
        sweep(layer)
        sweep(layer)                                             # idle, but not durable
        await asyncio.sleep(0)
        assert set(layer.held) == {0, 1}
        mirror.durable(1)                                        # covers chunk 0 only
        await asyncio.sleep(0)
        assert set(layer.held) == {1}
        mirror.durable(2)
        await asyncio.sleep(0)
        assert not layer.held
        await layer.close()

    asyncio.run(main())
    assert [e for e in events if e.startswith(("sync-hold", "release"))] == [
        "sync-hold [(0, 1)]", f"sync-hold [({CHUNK}, 1)]",
        f"release-synced [(0, {CHUNK})]", f"release-synced [({CHUNK}, {CHUNK})]"]


def test_a_hold_taken_while_replicating_is_not_marked_for_the_fast_path():
    """A replicated write's hold keeps a replication record (it is not tainted): the
    fast path's bit, under which a write would skip the tainting, is not set for it."""
    events: list[str] = []
    layer, _, _ = make_replicated(events)

    async def main():
        await layer.write(memoryview(b"a"), 0, False)
        assert 0 in layer.held and not layer.held[0].tainted
        assert fast_path_is_consistent(layer)
        await layer.close()

    asyncio.run(main())


def test_after_replication_stops_a_fast_write_under_a_replicated_hold_taints_it():
    """A hold taken while replicating, still held when replication stops (its write
    runs): the next write to it with no replication takes the fast path, and taints
    it, so no later replication counts it as settled."""
    events: list[str] = []
    layer, inner, mirror = make_replicated(events)

    async def main():
        gate = inner.gate = asyncio.Event()
        write = asyncio.ensure_future(layer.write(memoryview(b"a"), 0, False))
        while 0 not in layer._busy:
            await asyncio.sleep(0)
        mirror.active, mirror.generation = False, 2
        for callback in mirror.listeners:
            callback()
        assert 0 in layer.held and not layer.held[0].tainted and not layer._plain[0]
        inner.gate = None
        assert layer.write_now(memoryview(b"b"), 10, False)
        assert layer.held[0].tainted and layer._plain[0]
        assert fast_path_is_consistent(layer)
        gate.set()
        await write
        await layer.close()

    asyncio.run(main())


def test_holds_let_go_when_replication_starts_leave_no_fast_path_record():
    """Tracking only, a chunk written on the fast path; replication starts and lets
    its tainted hold go at once (no sweep, so nothing folded its record first)."""
    events: list[str] = []
    layer, _, mirror = make_replicated(events)

    async def main():
        mirror.active = False
        await layer.write(memoryview(b"a"), 0, False)
        assert layer.write_now(memoryview(b"b"), 0, False)
        mirror.active, mirror.generation = True, 2
        for callback in mirror.listeners:
            callback()
        await asyncio.sleep(0)
        assert 0 not in layer.held and fast_path_is_consistent(layer)
        await layer.close()

    asyncio.run(main())


def test_a_write_that_missed_the_target_is_released_plain_at_once():
    events: list[str] = []
    layer, inner, _ = make_replicated(events)

    async def main():
        inner.reaches_target = False
        await layer.write(memoryview(b"a"), 0, False)
        await asyncio.sleep(0)
        assert not layer.held
        await layer.close()

    asyncio.run(main())
    assert [e for e in events if e.startswith(("sync-hold", "release"))] == [
        "sync-hold [(0, 1)]", f"release [(0, {CHUNK})]"]


def test_a_chunk_written_again_waits_for_its_latest_write():
    events: list[str] = []
    layer, _, mirror = make_replicated(events)

    async def main():
        await layer.write(memoryview(b"a"), 0, False)            # seq 1
        mirror.durable_seq = 0
        await layer.write(memoryview(b"b"), 0, False)            # seq 2, same chunk
        mirror.durable(1)
        await asyncio.sleep(0)
        assert 0 in layer.held                                   # seq 2 not yet durable
        mirror.durable(2)
        await asyncio.sleep(0)
        assert not layer.held
        await layer.close()

    asyncio.run(main())


def test_a_durable_never_releases_a_chunk_while_another_write_to_it_runs():
    """The first write's DURABLE settles its seq; the second write to the chunk is still
    running and may yet miss the target: the hold must wait for it."""
    events: list[str] = []
    layer, inner, mirror = make_replicated(events)

    async def main():
        await layer.write(memoryview(b"a"), 0, False)            # seq 1
        inner.gate = asyncio.Event()
        second = asyncio.ensure_future(layer.write(memoryview(b"b"), 0, False))
        while not layer._busy:
            await asyncio.sleep(0)
        mirror.durable(1)
        await asyncio.sleep(0)
        assert 0 in layer.held and not releases(events), events
        inner.gate.set()
        await second                                             # seq 2
        mirror.durable(2)
        await asyncio.sleep(0)
        assert not layer.held
        await layer.close()

    asyncio.run(main())
    assert releases(events) == [f"release-synced [(0, {CHUNK})]"]
    assert events.index(releases(events)[0]) > events.index("write 0+1", 2)


def test_a_write_that_missed_the_target_never_releases_a_chunk_another_write_runs_on():
    events: list[str] = []
    layer, inner, _ = make_replicated(events)

    async def main():
        inner.gate = asyncio.Event()
        first = asyncio.ensure_future(layer.write(memoryview(b"a"), 0, False))
        while not layer._busy:
            await asyncio.sleep(0)
        gate, inner.gate = inner.gate, None
        inner.reaches_target = False
        await layer.write(memoryview(b"b"), 0, False)            # taints chunk 0
        await asyncio.sleep(0)
        assert 0 in layer.held and not releases(events), events
        inner.reaches_target = True
        gate.set()
        await first
        await asyncio.sleep(0)
        assert not layer.held                                    # tainted: let go plain
        await layer.close()

    asyncio.run(main())
    assert releases(events) == [f"release [(0, {CHUNK})]"]
    assert events[-1] == f"release [(0, {CHUNK})]"


def releases(events: list[str]) -> list[str]:
    return [e for e in events if e.startswith("release")]


# -- holds of mirrored chunks are kept once settled, like holds of tracking only -----------

def test_a_settled_mirrored_hold_is_kept_and_the_next_write_to_it_sends_no_mark():
    """breqd answered that chunk 0 is mirrored (it was clean): no sender ships it, so the
    hold stays after its write is durable on the target, and the next write to the chunk
    needs no MARK. The idle sweep lets it go synced."""
    events: list[str] = []
    layer, _, mirror = make_replicated(events)
    layer.tracker.mirrors = True

    async def main():
        await layer.write(memoryview(b"a"), 0, False)            # seq 1
        mirror.durable(1)
        await asyncio.sleep(0)
        assert 0 in layer.held and not releases(events)
        await layer.write(memoryview(b"b"), 0, False)            # seq 2: no MARK
        mirror.durable(2)
        sweep(layer)
        await asyncio.sleep(0)
        assert not layer.held
        await layer.close()

    asyncio.run(main())
    assert [e for e in events if e.startswith(("sync-hold", "release"))] == [
        "sync-hold [(0, 1)]", f"release-synced [(0, {CHUNK})]"]


def test_a_kept_mirrored_hold_is_never_let_go_before_a_durable_covers_its_last_write():
    """The target stops answering (no DURABLE comes: a paused receiver) after the second
    write to a kept chunk: however idle the chunk, the hold stays until a DURABLE covers
    that write, then goes synced; had it gone before, breqd would keep the chunk clean
    while the target may lose the write."""
    events: list[str] = []
    layer, _, mirror = make_replicated(events)
    layer.tracker.mirrors = True

    async def main():
        await layer.write(memoryview(b"a"), 0, False)            # seq 1
        mirror.durable(1)
        await layer.write(memoryview(b"b"), 0, False)            # seq 2, not durable
        for _ in range(3):
            sweep(layer)
        await asyncio.sleep(0)
        assert 0 in layer.held and not releases(events), events
        mirror.durable(2)
        await asyncio.sleep(0)
        assert 0 in layer.held                                   # settled, kept
        sweep(layer)
        await asyncio.sleep(0)
        assert not layer.held
        await layer.close()

    asyncio.run(main())
    assert releases(events) == [f"release-synced [(0, {CHUNK})]"]


def test_only_the_chunks_breqd_calls_mirrored_are_kept():
    """One MARK holds chunks 0 and 1; breqd answers that only chunk 1 is mirrored (chunk
    0 was dirty): once settled, chunk 0 goes at once, so a sender can make it clean
    between writes, and chunk 1 stays."""
    events: list[str] = []
    layer, _, mirror = make_replicated(events)

    async def mark_sync(device, ranges):
        session = await layer.tracker.mark(device, ranges, hold=True, sync=True)
        return session, [(CHUNK, CHUNK)]

    layer.tracker.mark_sync = mark_sync

    async def main():
        await layer.write(memoryview(b"a" * 2), CHUNK - 1, False)   # seq 1, chunks 0, 1
        mirror.durable(1)
        await asyncio.sleep(0)
        assert set(layer.held) == {1}
        await layer.close()

    asyncio.run(main())
    assert releases(events) == [f"release-synced [(0, {CHUNK})]"]


def test_when_replication_ends_a_kept_hold_goes_synced_only_if_a_durable_covered_it():
    """Chunk 0's write is durable on the target (kept, settled), chunk 1's is not; then
    replication stops. Chunk 0 goes synced (the target has it: the next sync need not
    ship it), chunk 1 plain (no DURABLE of any later replication will cover its write)."""
    events: list[str] = []
    layer, _, mirror = make_replicated(events)
    layer.tracker.mirrors = True

    async def main():
        await layer.write(memoryview(b"a"), 0, False)            # seq 1
        mirror.durable(1)
        await layer.write(memoryview(b"b"), CHUNK, False)        # seq 2, never durable
        await asyncio.sleep(0)
        assert set(layer.held) == {0, 1}
        mirror.active, mirror.generation, mirror.durable_seq = False, 2, 0
        for callback in mirror.listeners:                        # replication stopped
            callback()
        await asyncio.sleep(0)
        assert not layer.held
        await layer.close()

    asyncio.run(main())
    assert sorted(releases(events)) == [f"release [({CHUNK}, {CHUNK})]",
                                        f"release-synced [(0, {CHUNK})]"]


def announce(mirror) -> None:
    for callback in mirror.listeners:
        callback()


def test_a_hold_is_never_settled_by_the_durable_watermark_of_an_earlier_replication():
    """Each replica counts seqs from 1. R1 reached DURABLE(3) and ended with nothing
    held; R2's seq 1 to a clean chunk never became durable when R2 failed: its hold must
    go plain, not synced (which would make breqd call the chunk clean)."""
    events: list[str] = []
    layer, inner, mirror = make_replicated(events)
    layer.tracker.mirrors = True

    async def main():
        for _ in range(3):
            await layer.write(memoryview(b"a"), 0, False)
        mirror.durable(3)
        await asyncio.sleep(0)
        sweep(layer)
        await asyncio.sleep(0)
        assert not layer.held
        mirror.active, mirror.generation, mirror.durable_seq = False, 2, 0   # R1 stops
        announce(mirror)
        mirror.active, mirror.generation, mirror.durable_seq = True, 3, 0    # R2 starts
        inner.seq = 0
        announce(mirror)
        await layer.write(memoryview(b"b"), 5 * CHUNK, False)               # R2's seq 1
        await asyncio.sleep(0)
        assert 5 in layer.held
        mirror.active, mirror.generation, mirror.durable_seq = False, 4, 0   # R2 fails
        announce(mirror)
        await asyncio.sleep(0)
        await layer.close()

    asyncio.run(main())
    assert f"release-synced [({5 * CHUNK}, {CHUNK})]" not in releases(events)
    assert f"release [({5 * CHUNK}, {CHUNK})]" in releases(events), releases(events)


def test_a_kept_mirrored_hold_goes_some_idle_times_after_it_was_taken_even_while_written():
    """breqd may make a kept chunk plain dirty (a plain mark, set-dirty); held for ever
    by a chunk written in every idle period, it could never be made clean and a cutover
    would not converge. A kept hold goes (synced, once settled) KEPT_MIRRORED_IDLES idle
    times after it was taken, written or not; not after one, which cost a MARK per hot
    chunk every idle time."""
    events: list[str] = []
    layer, inner, mirror = make_replicated(events)
    layer.tracker.mirrors = True
    kept_sweeps = IDLE_SWEEPS * KEPT_MIRRORED_IDLES
    released_at: list[int] = []

    async def main():
        for sweep in range(1, kept_sweeps + 3):
            await layer.write(memoryview(b"a"), 0, False)
            mirror.durable(inner.seq)
            await asyncio.sleep(0)
            layer._release()               # one sweep per write: never idle
            if not released_at and f"release-synced [(0, {CHUNK})]" in releases(events):
                released_at.append(sweep)
        await layer.close()

    asyncio.run(main())
    assert released_at == [kept_sweeps + 1], (released_at, releases(events))
    # taken, then taken again by the write after it went
    assert [e for e in events if e.startswith("sync-hold")] == ["sync-hold [(0, 1)]"] * 2


def test_a_flush_through_the_control_socket_lets_go_of_the_kept_settled_holds():
    """A cutover freezes, flushes, then waits until nothing is held: kept mirrored holds
    whose writes are durable go at once (synced), not an idle time later; one whose
    write is not durable yet stays."""
    events: list[str] = []
    layer, inner, mirror = make_replicated(events)
    layer.tracker.mirrors = True

    async def main():
        await layer.write(memoryview(b"a"), 0, False)
        mirror.durable(inner.seq)
        await asyncio.sleep(0)
        await layer.write(memoryview(b"b"), 3 * CHUNK, False)     # not durable yet
        await asyncio.sleep(0)
        assert 0 in layer.held and 3 in layer.held                # kept / waiting
        layer.let_go_settled()
        assert 0 not in layer.held and 3 in layer.held
        await layer.close()

    asyncio.run(main())
    assert f"release-synced [(0, {CHUNK})]" in releases(events), releases(events)
    assert f"release-synced [({3 * CHUNK}, {CHUNK})]" not in releases(events)
