"""Synchronous replication in bmig-nbd against a fake breceive (invariants 5, 6 and 11).

The fake target stands where bmig.wire.client.WireTarget stands: the Replica's sender
thread hands it frames, and it answers from that thread, in frame order, as breceive's
session does (a refused frame is answered ERROR before any later DURABLE). The tests
force the interleavings they are about with gates and direct calls, never with time.

- The wire order is the seq order: a timed FLUSH queued while a protocol A writer waits
  for queue room goes out after that writer's frame, never before it with a higher seq.
- A frame breceive refuses (ENOSPC, EIO) after its writer was answered (protocols A and
  B) is never covered by a later DURABLE: the replica fails, the chunks it wrote are
  released plain dirty in breqd (never ``synced``), the reason is in the layer's status,
  and the policy applies (degrade: tracking only; block: writes fail with EIO).
- A lost connection is heard by the layer at once, without waiting for a write.
- A seq belongs to the replication that gave it: when replication starts again, the new
  replica's DURABLE does not cover a write of the old one.
"""

from __future__ import annotations

import asyncio
import threading

import pytest

from bmig.errors import TargetError, TargetFull
from bmig.nbd import replica as replica_module
from bmig.nbd.layers.base import Capabilities, Layer
from bmig.nbd.layers.replicate import ReplicateLayer
from bmig.nbd.layers.track import IDLE_SWEEPS, TrackLayer
from bmig.nbd.replica import Replica

CHUNK = 4096
WAIT = 10.0          # seconds before a condition that should hold soon fails the test


class Recorder(Layer):
    """The bottom layer: records what reaches the source."""

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

    async def flush(self):
        self.events.append("flush")


class FakeTracker:
    """breqd as the tracking layer sees it: holds, and releases plain or synced."""

    def __init__(self, events: list[str]):
        self.events = events
        self.session = 1
        self.connected = True

    async def mark(self, device, ranges, hold=False, sync=False):
        await asyncio.sleep(0)
        self.events.append(f"{'sync-hold' if sync else 'hold'} {ranges}")
        return self.session

    async def mark_sync(self, device, ranges):
        return await self.mark(device, ranges, hold=True, sync=True), []

    def release(self, device, ranges, synced=False):
        self.events.append(f"{'release-synced' if synced else 'release'} {ranges}")
        done = asyncio.get_running_loop().create_future()
        done.set_result(None)
        return done


async def until(condition, what: str) -> None:
    """Poll ``condition`` on the loop (other threads answer through it)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + WAIT
    while not condition():
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.001)


class FakeTarget:
    """breceive as the Replica sees it. Frames are recorded in wire order; DATA at an
    offset in ``refuse`` is answered ERROR with its seq (nothing written), the rest as
    the frame's flags ask; a FLUSH is answered DURABLE. ``gate``, when cleared, holds
    the sender thread in its next send."""

    description = "tcp://fake/d1"

    def __init__(self, protocol: str):
        self.protocol = protocol
        self.wire: list[tuple[str, int]] = []       # (kind, seq) in the order sent
        self.refuse: dict[int, Exception] = {}      # offset -> the error breceive answers
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Event()            # the sender is in a send
        self.answer_flush = True
        self.acks = None
        self.batches: list[list[int]] = []          # the seqs of each send_batch

    def set_acks(self, acks) -> None:
        self.acks = acks

    def read_on(self, loop) -> bool:              # its acknowledgements come from a thread
        return False

    def _send(self, kind: str, seq: int) -> None:
        self.entered.set()
        assert self.gate.wait(WAIT), "the test never opened the gate"
        self.wire.append((kind, seq))

    def send_data(self, seq, offset, codec, payload, raw_length, digest, flags=0):
        self._send("data", seq)
        self._answer(seq, offset, flags)

    def send_zero(self, seq, offset, length, flags=0):
        self._send("zero", seq)
        self._answer(seq, offset, flags)

    def _answer(self, seq: int, offset: int, flags: int) -> None:
        from bmig.wire.protocol import FLAG_ACK_RECEIVED, FLAG_ACK_WRITTEN, FLAG_FUA
        if flags & FLAG_ACK_RECEIVED:
            self.acks.received(seq)                  # B: before the write is tried
        if offset in self.refuse:
            self.acks.failed(seq, self.refuse[offset])
            return
        if flags & FLAG_FUA:
            self.acks.durable(seq)
        elif flags & FLAG_ACK_WRITTEN:
            self.acks.written(seq)

    def request_durable(self, seq: int) -> None:
        self._send("flush", seq)
        if self.answer_flush:
            self.acks.durable(seq)

    # The frames of one loop turn come together, built by these (WireTarget's shape).
    def data_frame(self, seq, offset, codec, payload, raw_length, digest, flags=0):
        return ("data", seq, offset, flags)

    def zero_frame(self, seq, offset, length, flags=0):
        return ("zero", seq, offset, flags)

    def durable_frame(self, seq):
        return ("flush", seq, 0, 0)

    def send_batch(self, frames) -> None:
        self.batches.append([seq for _, seq, _, _ in frames])
        for kind, seq, offset, flags in frames:
            if kind == "flush":
                self.request_durable(seq)
            elif kind == "data":
                self.send_data(seq, offset, None, None, 0, 0, flags)
            else:
                self.send_zero(seq, offset, 0, flags)

    def abort(self) -> None:
        self.gate.set()

    def close(self) -> None:
        pass


# -- the wire order is the seq order (protocol A) ------------------------------------------

def test_a_timed_flush_never_overtakes_a_write_waiting_for_queue_room(monkeypatch):
    """DATA 1 fills the queue; DATA of the second write waits for room; the timed
    FLUSH fires meanwhile. Whatever seq each frame has, a FLUSH must follow every frame
    with a lower seq on the wire, or its DURABLE covers a frame sent after it."""
    monkeypatch.setattr(replica_module, "QUEUE_BYTES", 100)
    monkeypatch.setattr(replica_module, "FLUSH_DELAY", 3600)   # the test fires it

    async def main():
        target = FakeTarget("A")
        target.answer_flush = False
        target.gate.clear()
        replica = Replica(target, "A", asyncio.get_running_loop())
        try:
            await replica.write(0, b"a" * 200, False)               # queued: the queue is full
            await asyncio.to_thread(target.entered.wait, WAIT)      # ... and in the sender
            second = asyncio.ensure_future(replica.write(CHUNK, b"b" * 200, False))
            await until(lambda: replica._room._waiters, "the second write to wait for room")
            replica._timed_flush()                                  # the timer fires now
            target.gate.set()
            await asyncio.wait_for(second, WAIT)
            replica._timed_flush()
            await until(lambda: len(target.wire) == 4, "every frame on the wire")
        finally:
            replica.close()
        return target.wire

    wire = asyncio.run(main())
    seqs = [seq for _, seq in wire]
    assert seqs == sorted(seqs), f"sent out of seq order: {wire}"
    assert [kind for kind, _ in wire] == ["data", "flush", "data", "flush"]


# -- a refused frame is never covered by a later DURABLE -----------------------------------

def chain(protocol: str, policy: str = "degrade"):
    """TrackLayer over ReplicateLayer over a recorder, replicating to a FakeTarget."""
    events: list[str] = []
    recorder = Recorder(events)
    replicate = ReplicateLayer(recorder, "d1")
    tracker = FakeTracker(events)
    track = TrackLayer(replicate, tracker, "d1", CHUNK, idle=3600, mirror=replicate)
    target = FakeTarget(protocol)
    replica = Replica(target, protocol, asyncio.get_running_loop())
    replicate.start(replica, policy)
    return track, replicate, target, events


def sweep(layer: TrackLayer) -> None:
    """One idle period of the sweeper, and one more turn."""
    for _ in range(IDLE_SWEEPS + 1):
        layer._release()


def releases(events: list[str]) -> list[str]:
    return [e for e in events if e.startswith("release")]


@pytest.mark.parametrize("error", [TargetFull("write of 4096 bytes at 0: No space left on "
                                              "device"),
                                   TargetError("write of 4096 bytes at 0: Input/output "
                                               "error")], ids=["ENOSPC", "EIO"])
@pytest.mark.parametrize("protocol", ["A", "B", "C"])
def test_a_refused_write_is_never_released_as_synced(protocol, error):
    """The write to chunk 0 is refused by the target; the write to chunk 1 after it is
    fine, and a FLUSH after both is answered DURABLE. Chunk 0 must be let go plain
    dirty, and chunk 1 too: the replica failed before that DURABLE."""
    async def main():
        track, replicate, target, events = chain(protocol)
        target.refuse[0] = error
        await track.write(memoryview(b"x" * 4096), 0, False)
        await track.write(memoryview(b"y" * 4096), CHUNK, False)
        await track.flush()          # answered DURABLE by the target, after the ERROR
        sweep(track)                 # what is still held goes after an idle time
        await until(lambda: not track.held, "the holds to be let go")
        await track.close()
        return replicate, events

    replicate, events = asyncio.run(main())
    assert "release-synced" not in " ".join(events), events
    assert releases(events) and all(e.startswith("release [") for e in releases(events))
    assert not replicate.active
    assert replicate.failed and "refused seq 1" in replicate.failed
    assert error.message in replicate.failed


@pytest.mark.parametrize("protocol", ["A", "B"])
def test_a_durable_that_arrives_after_a_refusal_covers_nothing(protocol):
    """The exact bug: ERROR(1) finds no writer waiting (it was answered already), then
    DURABLE(2) comes. The watermark must not move past the refused seq."""
    async def main():
        target = FakeTarget(protocol)
        replica = Replica(target, protocol, asyncio.get_running_loop())
        failures: list[Exception] = []
        replica.on_failed = failures.append
        target.refuse[0] = TargetFull("No space left on device")
        try:
            seq = await replica.write(0, b"x" * 512, False)
            with pytest.raises(TargetFull):      # the refusal comes before its DURABLE
                await replica.write(CHUNK, b"y" * 512, False)
                await replica.flush()
            await until(lambda: failures, "the replica to fail")
            replica._durable(seq + 10)                  # a late DURABLE from the reader
        finally:
            replica.close()
        return replica, seq, failures

    replica, seq, failures = asyncio.run(main())
    assert replica.durable_seq < seq
    assert isinstance(failures[0], TargetFull) and "refused seq 1" in failures[0].message


def test_policy_block_fails_writes_after_a_refused_one():
    async def main():
        track, replicate, target, events = chain("A", policy="block")
        target.refuse[0] = TargetError("Input/output error")
        try:                         # answered before or after the refusal arrives
            await track.write(memoryview(b"x" * 4096), 0, False)
            await track.flush()      # its DURABLE comes after the ERROR
        except OSError:
            pass                     # blocked already
        with pytest.raises(OSError) as raised:
            await track.write(memoryview(b"y" * 4096), CHUNK, False)
        await track.close()
        return raised.value, events

    raised, events = asyncio.run(main())
    assert raised.errno == 5
    assert "release-synced" not in " ".join(events)


def test_the_layer_hears_a_lost_connection_without_a_write():
    """A target lost while nothing is written: the status says so at once (a cutover
    checks it), not only at the next write."""
    async def main():
        track, replicate, target, events = chain("A")
        await track.write(memoryview(b"x" * 4096), 0, False)
        from bmig.errors import UnreachableError
        replicate.replica.fatal(UnreachableError("tcp://fake/d1 closed the connection"))
        await until(lambda: not replicate.active, "the layer to give up")
        await until(lambda: not track.held, "the holds to be let go")   # not busy: at once
        await track.close()
        return replicate, events

    replicate, events = asyncio.run(main())
    assert "closed the connection" in replicate.failed
    assert releases(events) == [f"release [(0, {CHUNK})]"]


# -- a seq belongs to the replication that gave it -----------------------------------------

class FakeMirror:
    """The replication layer as the tracking layer sees it."""

    def __init__(self):
        self.active = True
        self.generation = 1
        self.durable_seq = 0
        self.listeners = []

    def add_listener(self, callback):
        self.listeners.append(callback)

    def changed(self) -> None:
        for callback in self.listeners:
            callback()


class Replicated(Recorder):
    """Writes answered with the seq the current replica gave them, from 1."""

    def __init__(self, events):
        super().__init__(events)
        self.seq = 0

    async def write(self, data, offset, fua):
        await super().write(data, offset, fua)
        self.seq += 1
        return self.seq


def test_a_seq_of_an_earlier_replication_is_not_covered_by_the_next_ones_durable():
    """Replication restarted before a write's DURABLE came: the new replica counts
    from 1 again, and its DURABLE(5) says nothing about the old replica's seq 1."""
    events: list[str] = []
    mirror = FakeMirror()
    inner = Replicated(events)
    layer = TrackLayer(inner, FakeTracker(events), "d1", CHUNK, idle=3600, mirror=mirror)

    async def main():
        await layer.write(memoryview(b"a"), 0, False)       # seq 1 of generation 1
        mirror.generation, mirror.durable_seq = 2, 0         # stopped, started again
        mirror.changed()
        mirror.durable_seq = 5                               # the new replica's DURABLE
        mirror.changed()
        sweep(layer)
        await asyncio.sleep(0)                               # the releases are sent
        await layer.close()

    asyncio.run(main())
    assert releases(events) == [f"release [(0, {CHUNK})]"], events


def test_replication_stopped_and_started_again_is_a_new_generation():
    """The same through the real layers: a write replicated (protocol A) but not yet
    durable when replication is stopped; started again to another replica, whose seqs
    start at 1 too, its DURABLE must leave the old write's chunk dirty."""
    async def main():
        track, replicate, first, events = chain("A")
        first.answer_flush = False                   # the old write is never durable
        await track.write(memoryview(b"x" * 4096), 0, False)               # old seq 1
        await replicate.stop()
        second = FakeTarget("A")
        replicate.start(Replica(second, "A", asyncio.get_running_loop()), "degrade")
        await track.write(memoryview(b"y" * 4096), CHUNK, False)           # new seq 1
        await track.flush()                                                 # DURABLE(2)
        sweep(track)
        await until(lambda: not track.held, "the holds to be let go")
        await track.close()
        return events

    events = asyncio.run(main())
    assert sorted(releases(events)) == [f"release [(0, {CHUNK})]",
                                        f"release-synced [({CHUNK}, {CHUNK})]"], events


# -- the frames of one loop turn leave together ----------------------------------------------

def test_the_frames_of_one_loop_turn_leave_in_one_batch_in_seq_order():
    """Three writes started in one turn: their frames reach the sender thread together
    (one wake-up of it, one write to the socket), in seq order."""

    async def main():
        target = FakeTarget("C")
        replica = Replica(target, "C", asyncio.get_running_loop())
        try:
            seqs = await asyncio.wait_for(asyncio.gather(
                replica.write(0, b"a", False), replica.write(CHUNK, b"b", False),
                replica.zero(2 * CHUNK, 10, False)), WAIT)
        finally:
            replica.close()
        return seqs, target.batches

    seqs, batches = asyncio.run(main())
    assert seqs == [1, 2, 3]
    assert batches[0] == [1, 2, 3], batches


class DirectTarget(FakeTarget):
    """A target whose socket takes a turn's frames at once (``try_send_batch``), unless
    ``full``: then it takes none and leaves them all to the sender thread."""

    def __init__(self, protocol: str):
        super().__init__(protocol)
        self.full = False
        self.direct: list[list[int]] = []          # the seqs of each batch sent at once

    def try_send_batch(self, frames):
        if self.full:
            return list(frames)
        self.direct.append([seq for _, seq, _, _ in frames])
        for kind, seq, offset, flags in frames:
            self.wire.append((kind, seq))
            if kind == "flush":
                self.acks.durable(seq)
            else:
                self._answer(seq, offset, flags)
        return []

    def send_rest(self, parts) -> None:
        self.send_batch(parts)


def test_frames_go_out_at_once_when_the_socket_takes_them():
    async def main():
        target = DirectTarget("C")
        replica = Replica(target, "C", asyncio.get_running_loop())
        try:
            await asyncio.wait_for(asyncio.gather(replica.write(0, b"a", False),
                                                  replica.write(CHUNK, b"b", False)), WAIT)
        finally:
            replica.close()
        return target

    target = asyncio.run(main())
    assert target.direct[0] == [1, 2] and not target.batches


def test_a_turn_after_one_the_socket_did_not_take_waits_for_the_sender_thread():
    """The socket takes nothing of turn 1 (left to the sender thread, stuck in its send);
    turn 2 finds the socket free again but must not overtake: the wire order is the seq
    order, or a DURABLE could cover a frame sent after it."""

    async def main():
        target = DirectTarget("C")
        target.full = True
        target.gate.clear()
        replica = Replica(target, "C", asyncio.get_running_loop())
        try:
            first = asyncio.ensure_future(replica.write(0, b"a", False))
            await asyncio.to_thread(target.entered.wait, WAIT)     # the thread has turn 1
            target.full = False
            second = asyncio.ensure_future(replica.write(CHUNK, b"b", False))
            await asyncio.sleep(0)
            await asyncio.sleep(0)                                  # turn 2 handed over
            target.gate.set()
            await asyncio.wait_for(asyncio.gather(first, second), WAIT)
        finally:
            replica.close()
        return target

    target = asyncio.run(main())
    seqs = [seq for _, seq in target.wire]
    assert seqs[:2] == [1, 2], target.wire
    assert not target.direct, target.direct


def test_protocol_a_gives_a_frames_room_back_once_even_when_written_comes_before_sent():
    """The WRITTEN of a frame may reach the loop before its sender thread says the frame
    left (two threads): the room (QUEUE_BYTES, invariant 8) comes back once, on WRITTEN,
    never twice, or the queue could hold more than its cap."""
    async def main():
        target = FakeTarget("A")           # answers WRITTEN inside its send: before "sent"
        replica = Replica(target, "A", asyncio.get_running_loop())
        try:
            for i in range(4):
                await replica.write(i * CHUNK, b"x" * 1000, False)
            await until(lambda: len(target.wire) == 4, "every frame on the wire")
            await until(lambda: not replica._unwritten and not replica._in_thread,
                        "every frame written there and reported sent")
            return replica.lag_bytes
        finally:
            replica.close()

    assert asyncio.run(main()) == 0


# -- an acknowledgement covers the frames before it ------------------------------------------

class CumulativeTarget(FakeTarget):
    """breceive after OPEN's ``acks: "cumulative"``: one RECEIVED and one WRITTEN per
    batch, the last seq of each kind, once the batch is written (a FUA frame still
    waits for its DURABLE, which comes only when ``answer_flush``)."""

    def send_batch(self, frames) -> None:
        from bmig.wire.protocol import FLAG_ACK_RECEIVED, FLAG_ACK_WRITTEN, FLAG_FUA
        self.batches.append([seq for _, seq, _, _ in frames])
        last: dict[str, int] = {}
        for kind, seq, offset, flags in frames:
            self._send(kind, seq)
            if flags & FLAG_ACK_RECEIVED:
                last["received"] = seq
            elif flags & FLAG_ACK_WRITTEN:
                last["written"] = seq
            elif flags & FLAG_FUA and self.answer_flush:
                self.acks.durable(seq)
        for kind, seq in last.items():
            getattr(self.acks, kind)(seq)


@pytest.mark.parametrize("protocol", ["B", "C"])
def test_one_acknowledgement_answers_every_earlier_write_of_its_kind_but_not_a_fua(protocol):
    """Four writes in one turn, the third with FUA: the batch's one WRITTEN (C) or
    RECEIVED (B), for seq 4, answers writes 1, 2 and 4; write 3 waits for its DURABLE."""

    async def main():
        target = CumulativeTarget(protocol)
        target.answer_flush = False
        replica = Replica(target, protocol, asyncio.get_running_loop())
        try:
            writes = [asyncio.ensure_future(replica.write(i * CHUNK, b"x", i == 2))
                      for i in range(4)]
            await until(lambda: sum(w.done() for w in writes) == 3, "three writes answered")
            answered = [w.done() for w in writes]
            replica._durable(4)                   # the DURABLE of a FLUSH after them
            await asyncio.wait_for(writes[2], WAIT)
        finally:
            replica.close()
        return answered, target.batches

    answered, batches = asyncio.run(main())
    assert batches[0] == [1, 2, 3, 4], batches
    assert answered == [True, True, False, True], answered


def test_protocol_a_gets_the_room_of_every_frame_before_one_written_back(monkeypatch):
    """Protocol A: one WRITTEN for a batch's last frame gives back the room of every
    frame of the batch (QUEUE_BYTES, invariant 8), not of that frame alone."""
    monkeypatch.setattr(replica_module, "FLUSH_DELAY", 3600)   # no timed FLUSH between

    async def main():
        target = CumulativeTarget("A")
        replica = Replica(target, "A", asyncio.get_running_loop())
        try:
            await asyncio.gather(*(replica.write(i * CHUNK, b"x" * 1000, False)
                                   for i in range(3)))
            await until(lambda: len(target.wire) == 3, "every frame on the wire")
            await until(lambda: not replica._in_thread, "the batch reported sent")
            return target.batches, replica.lag_bytes
        finally:
            replica.close()

    batches, lag = asyncio.run(main())
    assert batches[0] == [1, 2, 3], batches
    assert lag == 0


def test_a_long_turn_hands_its_frames_over_every_few_writes():
    """More writes in one turn than HAND_OVER_EVERY: the frames leave in pieces of
    HAND_OVER_EVERY, in seq order, so breceive starts on them while the turn goes on."""
    n = 2 * replica_module.HAND_OVER_EVERY + 3

    async def main():
        target = FakeTarget("C")
        replica = Replica(target, "C", asyncio.get_running_loop())
        try:
            await asyncio.wait_for(asyncio.gather(*(replica.write(i * CHUNK, b"x", False)
                                                    for i in range(n))), WAIT)
        finally:
            replica.close()
        return target.batches

    batches = asyncio.run(main())
    every = replica_module.HAND_OVER_EVERY
    assert [len(b) for b in batches] == [every, every, 3], batches
    assert [s for b in batches for s in b] == list(range(1, n + 1))


def test_a_replica_asks_breceive_for_cumulative_acknowledgements(monkeypatch):
    """OPEN carries ``acks: "cumulative"`` (a receiver that does not know it acknowledges
    every frame, which the replica reads the same way)."""
    opened: dict = {}

    class Opening(FakeTarget):
        def open(self, source, discard, mode="pass", extra=None):
            opened.update(mode=mode, **(extra or {}))
            return "same"

    monkeypatch.setattr(replica_module, "connect", lambda parsed, options: Opening("C"))

    async def main():
        replica = replica_module.open_replica("tcp://127.0.0.1:1/d1", None, None, "C",
                                              asyncio.get_running_loop())
        replica.close()

    asyncio.run(main())
    assert opened == {"mode": "replicate", "protocol": "C", "acks": "cumulative",
                      "window": 0}, opened
