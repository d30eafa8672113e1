"""Replicated writes reach the source and the target in one order, or their chunks stay
dirty; failures and breqd reconnects never leave a written range clean.

A write is written locally at once, before its frame leaves (a FUA write too, flushed
after). A trim, a zero or a write of more than one frame, whose local part and frames may
interleave with another request's in another order on each side, taints the holds when
it overlaps a request in flight, so the chunk ships again. A local write that fails
taints the holds on either path; a write that fails after breqd's connection changed is
marked again; a replication started over another one answers the old one's writes as a
failure of that replica, not of replication.
"""

from __future__ import annotations

import asyncio

import pytest

from bmig.errors import TargetError
from bmig.nbd import replica as replica_module
from bmig.nbd.layers import track as track_module
from bmig.nbd.replica import Replica
from tests.unit.test_nbd_replica import WAIT, FakeTarget, Recorder, releases, until
from tests.unit.test_nbd_write_later import (Answers, chain, held_and_settled,
                                             write_later_held_at_the_target)


def recorded_frames(target: FakeTarget) -> list[tuple[int, int, bytes]]:
    """(seq, offset, first byte) of each DATA frame ``target`` is given from now on."""
    frames: list[tuple[int, int, bytes]] = []
    orig = target.data_frame

    def data_frame(seq, offset, codec, payload, raw_length, digest, flags=0):
        frames.append((seq, offset, bytes(payload)[:1]))
        return orig(seq, offset, codec, payload, raw_length, digest, flags)
    target.data_frame = data_frame
    return frames


@pytest.mark.parametrize("path", ["without a task", "through the task path"])
def test_a_local_write_that_fails_taints_the_holds(path):
    """A local pwrite fails (EIO, perhaps after part of it landed) on a settled kept
    hold: the target has none of it, so the hold is never released synced."""
    async def main():
        control, track, replicate, target, events = chain("C")
        await held_and_settled(control, track, target)

        def failing(data, offset, fua):
            raise OSError(5, "Input/output error")

        replicate.inner.write_now = failing
        del events[:]
        with pytest.raises(OSError):
            if path == "without a task":
                control.write_later(memoryview(b"b" * 512), 0, False, Answers())
            else:
                await control.write(memoryview(b"b" * 512), 0, False)
        track.let_go_settled()
        rel = releases(events)
        await control.close()
        return rel

    rel = asyncio.run(main())
    assert not any("synced" in r for r in rel), rel


def test_a_write_of_more_than_one_frame_is_never_released_synced(monkeypatch):
    """W1 (two frames, task path) and W2 (write_later, inside W1's second frame) overlap.
    Locally W2 lands last. On the wire, W2's frame goes between W1's frames, so the
    target ends with W1's bytes. The chunk must not then be released synced (clean)."""
    monkeypatch.setattr(replica_module, "MAX_DATA", 1024)
    monkeypatch.setattr(track_module, "MAX_DATA", 1024)
    monkeypatch.setattr(replica_module, "FLUSH_DELAY", 3600)

    async def main():
        control, track, replicate, target, events = chain("C")
        await held_and_settled(control, track, target)
        frames = recorded_frames(target)
        target.gate.clear()
        target.entered.clear()
        w1 = asyncio.ensure_future(control.write(memoryview(b"1" * 2048), 0, False))
        await asyncio.to_thread(target.entered.wait, WAIT)
        answers = Answers()
        started = control.write_later(memoryview(b"2" * 512), 1024, False, answers)
        target.gate.set()
        await asyncio.wait_for(w1, WAIT)
        await until(lambda: answers.got, "W2")
        del events[:]
        await control.flush()
        track.let_go_settled()
        rel = releases(events)
        await control.close()
        return started, frames, rel

    started, frames, rel = asyncio.run(main())
    last_at_1024 = [f for f in frames if f[1] <= 1024 < f[1] + 1024][-1]
    assert started and last_at_1024[2] == b"1", frames     # the target ends with W1's
    assert not any("synced" in r for r in rel), (frames, rel)


def test_a_breqd_reconnect_during_a_write_later_marks_again_before_the_answer():
    async def main():
        control, track, replicate, target, events = chain("C")
        await held_and_settled(control, track, target)
        answers = await write_later_held_at_the_target(control, target)
        del events[:]
        track.tracker.session = 2          # breqd reconnected: the hold is gone
        marks_at_answer = []
        orig_mark = track.tracker.mark
        async def mark(device, ranges, hold=False, sync=False):
            r = await orig_mark(device, ranges, hold, sync)
            marks_at_answer.append(list(answers.got))
            return r
        track.tracker.mark = mark
        target.gate.set()
        await until(lambda: answers.got, "the answer")
        await control.close()
        return events, marks_at_answer, answers.got

    events, marks, got = asyncio.run(main())
    assert any(e.startswith("hold [(0, 512)]") for e in events), events
    assert marks == [[]], marks            # marked again before the answer
    assert got == [(None, None)]


def test_a_new_replication_started_over_one_in_flight_answers_its_writes(caplog):

    async def main():
        control, track, replicate, target, events = chain("C", policy="block")
        await held_and_settled(control, track, target)
        old = replicate.replica
        old.written = lambda seq: None          # WRITTEN never comes back
        answers = Answers()
        assert control.write_later(memoryview(b"b" * 512), 0, False, answers)
        await until(lambda: target.wire and target.wire[-1][0] == "data", "frame sent")
        task_write = asyncio.ensure_future(control.write(memoryview(b"c" * 512), 0, False))
        await until(lambda: len(old._waiting) == 2, "two writers waiting")
        new_target = FakeTarget("C")
        replicate.start(Replica(new_target, "C", asyncio.get_running_loop()), "block")
        got_now = list(answers.got)
        try:
            await asyncio.wait_for(task_write, WAIT)
            task_result = "ok"
        except Exception as exc:
            task_result = repr(exc)
        await control.close()
        return got_now, task_result

    got_now, task_result = asyncio.run(main())
    msgs = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert not any("failed" in m for m in msgs), msgs
    assert got_now == [(None, None)] and task_result == "ok", (got_now, task_result, msgs)


def test_no_write_later_while_frozen_or_read_only():
    async def main():
        control, track, replicate, target, events = chain("C")
        await held_and_settled(control, track, target)
        await control.freeze()
        frozen = control.write_later(memoryview(b"b" * 512), 0, False, Answers())
        control.thaw()
        control.read_only = True
        ro = control.write_later(memoryview(b"b" * 512), 0, False, Answers())
        control.read_only = False
        await control.close()
        return frozen, ro

    assert asyncio.run(main()) == (False, False)


def test_no_write_later_once_breqds_connection_changed():
    async def main():
        control, track, replicate, target, events = chain("C")
        await held_and_settled(control, track, target)
        track.tracker.session = 2             # reconnected: the holds are gone
        del events[:]
        started = control.write_later(memoryview(b"b" * 512), 0, False, Answers())
        local = [e for e in events if e.startswith("write")]
        await control.close()
        return started, local

    started, local = asyncio.run(main())
    assert (started, local) == (False, []), (started, local)


def test_a_failed_write_later_after_a_breqd_reconnect_is_marked_again():
    """Policy block: the local write is done, the target refuses it, and breqd's
    connection changed meanwhile: the written range must be marked again."""

    async def main():
        control, track, replicate, target, events = chain("C", policy="block")
        await held_and_settled(control, track, target)
        target.gate.clear()
        target.entered.clear()
        target.refuse[0] = TargetError("write of 512 bytes at 0: Input/output error")
        answers = Answers()
        assert control.write_later(memoryview(b"b" * 512), 0, False, answers)
        await asyncio.to_thread(target.entered.wait, WAIT)
        del events[:]
        track.tracker.session = 2
        target.gate.set()
        await until(lambda: answers.got, "the answer")
        for _ in range(20):
            await asyncio.sleep(0)
        await control.close()
        return answers.got, list(events)

    got, events = asyncio.run(main())
    assert isinstance(got[0][1], OSError)
    assert any(e.startswith("hold [(0, 512)]") for e in events), events


class LocalOrder(Recorder):
    """The bottom layer, recording the order of local writes (FUA: no fast path)."""

    def write_now(self, data, offset, fua):
        if fua:
            return False
        self.events.append(f"local {bytes(data[:1])}")
        return True

    async def write(self, data, offset, fua):
        self.events.append(f"local {bytes(data[:1])}")


def test_a_fua_write_and_an_overlapping_write_land_in_one_order_on_both_sides(monkeypatch):
    monkeypatch.setattr(replica_module, "FLUSH_DELAY", 3600)

    async def main():
        control, track, replicate, target, events = chain("C", bottom=LocalOrder)
        await held_and_settled(control, track, target)
        sent = recorded_frames(target)
        del events[:]
        w1 = asyncio.ensure_future(control.write(memoryview(b"1" * 512), 0, True))   # FUA
        w2 = asyncio.ensure_future(control.write(memoryview(b"2" * 512), 0, False))
        await asyncio.wait_for(asyncio.gather(w1, w2), WAIT)
        local = [e for e in events if e.startswith("local")]
        del events[:]
        await control.flush()
        track.let_go_settled()
        rel = releases(events)
        await control.close()
        return local, [first for _, _, first in sent], rel

    local, frames, rel = asyncio.run(main())
    assert [e.split()[1] for e in local] == [repr(f) for f in frames], (local, frames)


def test_a_zero_overlapping_a_write_in_flight_leaves_its_chunk_dirty():
    # Its local part runs beside its frame: with a write in flight on the same chunk, the
    # two may land in another order on each side, so the chunk is never released
    # synced; a zero alone settles as a write does (test_replicate.py).
    async def main():
        control, track, replicate, target, events = chain("C")
        await held_and_settled(control, track, target)
        answers = await write_later_held_at_the_target(control, target)
        zero = asyncio.ensure_future(control.zero(0, 4096, False, False, False))
        await until(lambda: track._unordered, "the zero to start")
        del events[:]
        target.gate.set()
        await asyncio.wait_for(zero, WAIT)
        await until(lambda: answers.got, "the write's answer")
        await control.flush()
        track.let_go_settled()
        rel = releases(events)
        await control.close()
        return rel

    rel = asyncio.run(main())
    assert rel and not any("synced" in r for r in rel), rel


def test_a_write_later_is_answered_even_when_its_bookkeeping_fails():
    # A bug in a layer's bookkeeping after the target answered must not leave the
    # writer unanswered and the write counted as running: a freeze would never end.
    async def main():
        control, track, replicate, target, events = chain("C")
        await held_and_settled(control, track, target)

        def broken(*args, **kwargs):
            raise RuntimeError("bookkeeping bug")

        track._mirrored.note = broken
        answers = Answers()
        assert control.write_later(memoryview(b"b" * 512), 0, False, answers)
        await until(lambda: answers.got, "the answer")
        await asyncio.wait_for(control.freeze(), WAIT)
        control.thaw()
        await control.close()
        return answers.got

    got = asyncio.run(main())
    assert len(got) == 1 and isinstance(got[0][1], RuntimeError), got


def test_a_replicated_fua_write_is_flushed_locally_before_it_is_answered(monkeypatch):
    # Written at once like a plain write (one order on both sides), a FUA write still
    # owes its client a durable local copy: the flush runs beside the target's answer.
    monkeypatch.setattr(replica_module, "FLUSH_DELAY", 3600)

    async def main():
        control, track, replicate, target, events = chain("C", bottom=LocalOrder)
        del events[:]
        await control.write(memoryview(b"1" * 512), 0, True)
        seen = [e for e in events if e.startswith("local") or e == "flush"]
        await control.close()
        return seen

    assert asyncio.run(main()) == ["local b'1'", "flush"]
