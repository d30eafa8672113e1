"""breqd's sessions room without a socket: a MARK works on bounded pieces (invariant 8),
and a session's end gives back its checkouts and lets go of its holds (invariant 3)."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

import pytest

from bmig.limits import MARK_PIECE
from bmig.tracker.definitions import DeviceDefinition
from bmig.tracker.protocol import Message, Op
from bmig.tracker.registry import Registry
from bmig.tracker.sessions import Sessions

CHUNK = 4096
SIZE = (2 * MARK_PIECE + 3) * CHUNK - 100          # three pieces, the last one short


@pytest.fixture
def room(tmp_path):
    with ThreadPoolExecutor(1) as executor:
        registry = Registry(str(tmp_path / "conf"), str(tmp_path), executor)
        device = registry.track(DeviceDefinition("d", SIZE, CHUNK, 1))
        assert device is not None
        sessions = Sessions(registry)
        registry.untrack_listeners.append(sessions.forget_device)
        yield sessions, device
        device.bitmap.close(clean=True)


def request(op: Op, fields: dict, ranges=()) -> Message:
    return Message(op, 1, {"device": "d", **fields}, list(ranges))


def test_a_mark_of_whole_device_ranges_works_on_pieces_of_mark_piece_chunks(room):
    sessions, device = room
    seen: list[tuple[int, int]] = []
    clean, mark_spans = device.chunks.clean, device.mark_spans

    def recording_clean(first, end):
        seen.append((first, end))
        return clean(first, end)

    def recording_mark_spans(spans, keep_mirrored=False):
        seen.extend(spans)
        return mark_spans(spans, keep_mirrored)

    device.chunks.clean = recording_clean
    device.mark_spans = recording_mark_spans
    session = sessions.open("test")
    reply = sessions.mark(session, request(Op.MARK, {"hold": True, "sync": True},
                                           [(0, SIZE)] * 64))
    assert isinstance(reply, Message) and reply.op == Op.REPLY_OK   # all dirty: no flush
    assert seen and max(end - first for first, end in seen) <= MARK_PIECE
    assert {first for first, _ in seen} == {0, MARK_PIECE, 2 * MARK_PIECE}
    assert device.chunks.held_bytes() == SIZE


def test_the_end_of_a_session_aborts_its_checkouts_and_lets_go_of_its_holds(room):
    sessions, device = room
    writer, sender, other = sessions.open("writer"), sessions.open("sender"), sessions.open("o")
    sessions.mark(writer, request(Op.MARK, {"hold": True}, [(0, CHUNK)]))
    sessions.mark(other, request(Op.MARK, {"hold": True}, [(0, CHUNK)]))
    reply = sessions.checkout(sender, request(Op.CHECKOUT, {"max_bytes": 8 * CHUNK}))
    assert reply.ranges and device.chunks.inflight_bytes() == 8 * CHUNK
    sessions.end(sender)
    assert device.chunks.inflight_bytes() == 0              # back to dirty
    assert device.chunks.dirty[:8].all()
    sessions.end(writer)
    assert device.chunks.held[0]                            # the other writer still holds it
    sessions.end(other)
    assert not device.chunks.held[0] and device.chunks.dirty[0]   # let go of, still dirty



def test_a_synchronous_mark_answers_which_of_its_chunks_are_mirrored(room):
    """Chunks 0, 2 and 3 were clean, chunk 1 dirty: the reply names 0 and 2-3 (mirrored:
    the writer may keep those holds), never 1 (a sender must be able to make it clean)."""
    sessions, device = room
    device.chunks.clear_all()
    device.chunks.mark(1, 2)

    async def main():
        session = sessions.open("test")
        reply = sessions.mark(session, request(Op.MARK, {"hold": True, "sync": True},
                                               [(0, 4 * CHUNK)]))
        return reply if isinstance(reply, Message) else await reply

    assert list(asyncio.run(main()).ranges) == [(0, CHUNK), (2 * CHUNK, 2 * CHUNK)]
