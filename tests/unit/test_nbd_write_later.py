"""Replicated writes with no task (``Layer.write_later``), against a paused fake breceive.

A replicated write to chunks already held goes through the layers at once: the local
write and the frame in the same step, and the answer from the acknowledgement's handler.
It keeps every rule of the task path (tests/unit/test_nbd_replica.py), forced here with
the fake target's gate (its sender thread held before the frame is on the wire):

- protocol C and B answer only once the target did (WRITTEN, RECEIVED); protocol A once
  the frame is queued with room, and never ahead of a writer waiting for room;
- a hold is let go synced only once a DURABLE covers the write, and never after a
  refused write;
- a freeze (cutover) and a stop of replication wait for such a write as for any other,
  and so does the end of the NBD connection it came on (its transmission drains it).
"""

from __future__ import annotations

import asyncio

import pytest

from bmig.errors import TargetError
from bmig.nbd import replica as replica_module
from bmig.nbd.layers.control import ControlLayer
from bmig.nbd.layers.replicate import ReplicateLayer
from bmig.nbd.layers.track import TrackLayer
from bmig.nbd.replica import Replica
from tests.unit.test_nbd_replica import (CHUNK, WAIT, FakeTarget, FakeTracker, Recorder,
                                         releases, sweep, until)


class Direct(Recorder):
    """The bottom layer with the synchronous fast path, as the file layer has it."""

    def write_now(self, data, offset, fua):
        self.events.append(f"write-now {offset}+{len(data)}")
        return True


class MirroringTracker(FakeTracker):
    """breqd making every chunk of a sync MARK mirrored (it was clean): the tracking
    layer keeps such holds once settled, so later writes find them held."""

    async def mark_sync(self, device, ranges):
        return await self.mark(device, ranges, hold=True, sync=True), list(ranges)


class Answers:
    """``write_later``'s completions, in order."""

    def __init__(self):
        self.got: list[tuple[object, BaseException | None]] = []

    def __call__(self, result, error) -> None:
        self.got.append((result, error))


def chain(protocol: str, policy: str = "degrade", bottom: type[Recorder] | None = None):
    """Control over tracking over replication over ``bottom`` (a layer with a fast
    path by default)."""
    events: list[str] = []
    replicate = ReplicateLayer((bottom or Direct)(events), "d1")
    track = TrackLayer(replicate, MirroringTracker(events), "d1", CHUNK, idle=3600,
                       mirror=replicate)
    control = ControlLayer(track, "d1")
    target = FakeTarget(protocol)
    replicate.start(Replica(target, protocol, asyncio.get_running_loop()), policy)
    return control, track, replicate, target, events


async def held_and_settled(control, track, target, chunk: int = 0) -> None:
    """A first write (by the task path) takes the hold of ``chunk``; a FLUSH settles it,
    and the hold is kept (mirrored)."""
    await control.write(memoryview(b"a" * 512), chunk * CHUNK, False)
    await control.flush()
    assert chunk in track.held, "the mirrored hold should be kept once settled"


async def write_later_held_at_the_target(control, target, data: bytes = b"b" * 512,
                                         offset: int = 0) -> Answers:
    """A task-less write started while the target holds back what reaches it; returns
    once its frame is at the target (and unanswered): its answers."""
    target.gate.clear()
    target.entered.clear()
    answers = Answers()
    assert control.write_later(memoryview(data), offset, False, answers)
    await asyncio.to_thread(target.entered.wait, WAIT)
    return answers


@pytest.mark.parametrize("protocol", ["B", "C"])
def test_a_write_later_is_answered_only_once_the_target_answered(protocol):
    """The target is held before the frame reaches it: no answer yet. Once let through,
    RECEIVED (B) or WRITTEN (C) answers it."""
    async def main():
        control, track, replicate, target, events = chain(protocol)
        await held_and_settled(control, track, target)
        target.gate.clear()
        target.entered.clear()
        answers = Answers()
        assert control.write_later(memoryview(b"b" * 512), 0, False, answers)
        assert "write-now 0+512" in events           # the local write, at once
        await asyncio.to_thread(target.entered.wait, WAIT)
        for _ in range(5):
            await asyncio.sleep(0)
        early = list(answers.got)
        target.gate.set()
        await until(lambda: answers.got, "the answer")
        await control.close()
        return early, answers.got

    early, got = asyncio.run(main())
    assert early == [], f"answered before the target did: {early}"
    assert got[0][1] is None and got[0][0] is None


def test_protocol_a_answers_a_write_later_once_queued():
    async def main():
        control, track, replicate, target, events = chain("A")
        await held_and_settled(control, track, target)
        target.gate.clear()
        answers = Answers()
        assert control.write_later(memoryview(b"b" * 512), 0, False, answers)
        at_once = list(answers.got)
        target.gate.set()
        await control.close()
        return at_once

    at_once = asyncio.run(main())
    assert at_once == [(None, None)]


def test_protocol_a_write_later_never_overtakes_a_writer_waiting_for_room(monkeypatch):
    """A writer waits for queue room: a write that could go at once must take the task
    path behind it, not slip into the queue first."""
    monkeypatch.setattr(replica_module, "QUEUE_BYTES", 1000)

    async def main():
        control, track, replicate, target, events = chain("A")
        await held_and_settled(control, track, target)
        target.gate.clear()
        replica = replicate.replica
        await replica.write(0, b"x" * 1000, False)                   # the queue is full
        waiting = asyncio.ensure_future(replica.write(CHUNK, b"y" * 10, False))
        await until(lambda: replica._room_waiters, "a writer to wait for room")
        replica._queued = 0                   # room, as if WRITTEN came, not told yet
        took = replica.takes_now(10)
        started = control.write_later(memoryview(b"b" * 10), 0, False, Answers())
        target.gate.set()
        await asyncio.wait_for(waiting, WAIT)
        await control.close()
        return took, started

    took, started = asyncio.run(main())
    assert (took, started) == (False, False)


def test_a_hold_written_later_goes_synced_only_once_durable(monkeypatch):
    """WRITTEN answers the write; the FLUSH is not answered: the hold must stay (not
    synced) until a DURABLE covers the write."""
    monkeypatch.setattr(replica_module, "FLUSH_DELAY", 3600)      # the test flushes

    async def main():
        control, track, replicate, target, events = chain("C")
        await held_and_settled(control, track, target)
        del events[:]
        answers = Answers()
        assert control.write_later(memoryview(b"b" * 512), 0, False, answers)
        await until(lambda: answers.got, "WRITTEN")
        track.let_go_settled()
        before = releases(events)
        target.answer_flush = False
        sent = len(target.wire)
        flushing = asyncio.ensure_future(replicate.replica.flush())
        await until(lambda: len(target.wire) > sent, "the FLUSH on the wire")
        track.let_go_settled()
        unanswered = releases(events)
        kind, seq = target.wire[-1]
        assert kind == "flush"
        replicate.replica.durable(seq)                               # DURABLE at last
        await asyncio.wait_for(flushing, WAIT)
        track.let_go_settled()
        after = releases(events)
        await control.close()
        return before, unanswered, after

    before, unanswered, after = asyncio.run(main())
    assert before == [] and unanswered == [], (before, unanswered)
    assert after == [f"release-synced [(0, {CHUNK})]"], after


@pytest.mark.parametrize("protocol", ["A", "B", "C"])
def test_a_refused_write_later_is_never_released_synced(protocol):
    """breceive refuses the write (EIO): the replica fails, the hold goes plain."""
    async def main():
        control, track, replicate, target, events = chain(protocol)
        await held_and_settled(control, track, target)
        del events[:]
        target.refuse[0] = TargetError("write of 512 bytes at 0: Input/output error")
        answers = Answers()
        assert control.write_later(memoryview(b"b" * 512), 0, False, answers)
        await until(lambda: answers.got and not replicate.active, "the refusal")
        sweep(track)                 # tracking only now: the hold goes when idle
        await until(lambda: not track.held, "the hold to be let go")
        await control.close()
        return answers.got, events

    got, events = asyncio.run(main())
    assert got == [(None, None)]                # degrade: the write itself is done
    assert releases(events) == [f"release [(0, {CHUNK})]"], events


def test_a_refused_write_later_fails_under_policy_block():
    async def main():
        control, track, replicate, target, events = chain("C", policy="block")
        await held_and_settled(control, track, target)
        target.refuse[0] = TargetError("write of 512 bytes at 0: Input/output error")
        answers = Answers()
        assert control.write_later(memoryview(b"b" * 512), 0, False, answers)
        await until(lambda: answers.got, "the refusal")
        await control.close()
        return answers.got

    got = asyncio.run(main())
    assert isinstance(got[0][1], OSError) and got[0][1].errno == 5


def test_a_freeze_and_a_stop_wait_for_a_write_later():
    """A cutover freezes writes and then flushes both sides: a replicated write started
    with no task must count as running until its answer, for the freeze and for
    stopping replication alike."""
    async def main():
        control, track, replicate, target, events = chain("C")
        await held_and_settled(control, track, target)
        answers = await write_later_held_at_the_target(control, target)
        freeze = asyncio.ensure_future(control.freeze())
        stop = asyncio.ensure_future(replicate.stop())
        for _ in range(5):
            await asyncio.sleep(0)
        early = (freeze.done(), stop.done(), replicate.active)
        target.gate.set()
        await asyncio.wait_for(asyncio.gather(freeze, stop), WAIT)
        control.thaw()
        await control.close()
        return early, answers.got

    early, got = asyncio.run(main())
    assert early == (False, False, True), early
    assert got == [(None, None)]


class FakeTransport:
    """The NBD client's socket as bmig-nbd's connection sees it: what was written."""

    def __init__(self):
        self.written = bytearray()

    def write(self, data) -> None:
        self.written += data

    def is_closing(self) -> bool:
        return False

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def get_extra_info(self, name, default=None):
        return default

    def close(self) -> None:
        pass

    def abort(self) -> None:
        pass


def test_a_connection_that_ends_is_finished_only_once_its_writes_later_are_answered():
    """The client sends a WRITE to a held chunk and closes. The write waits for the
    target (held back): the transmission must not call itself finished (bmig-nbd would
    close the connection, and at a stop flush the export) before it is answered."""
    from bmig.nbd import protocol as p
    from bmig.nbd.connection import Connection
    from bmig.nbd.handshake import ExportInfo, Negotiated
    from bmig.nbd.transmission import Transmission

    async def main():
        control, track, replicate, target, events = chain("C")
        await held_and_settled(control, track, target)
        target.gate.clear()
        target.entered.clear()
        conn = Connection()
        transport = FakeTransport()
        conn.transport = transport
        request = p.REQUEST.pack(p.REQUEST_MAGIC, 0, p.Cmd.WRITE, 7, 0, 512) + b"w" * 512
        conn.buf[:len(request)] = request
        conn.end = len(request)
        t = Transmission(conn, control, Negotiated(ExportInfo("d1", 1 << 20, 1)), "test")
        conn.transmission = t
        t.process()
        t.end_of_stream()
        drained = asyncio.ensure_future(t.drain())
        await asyncio.to_thread(target.entered.wait, WAIT)
        for _ in range(5):
            await asyncio.sleep(0)
        early = (t.finished.done(), drained.done(), bytes(transport.written))
        target.gate.set()
        await asyncio.wait_for(asyncio.gather(t.finished, drained), WAIT)
        await control.close()
        return early, bytes(transport.written)

    early, written = asyncio.run(main())
    from bmig.nbd import protocol as p
    assert early == (False, False, b""), early
    assert p.SIMPLE_REPLY.unpack(written) == (p.SIMPLE_REPLY_MAGIC, 0, 7)
