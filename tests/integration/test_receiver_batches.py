"""How long a batch of frames holds the target's record lock in breceive.

A batch (the frames one read brought) takes the record lock, shared, at its first
write and keeps it to its last, so that the record is checked once (invariant 7). A
session that changes the record waits for the batches under way, so each batch is
bounded in frames and in bytes written or zeroed (session.BATCH_FRAMES, BATCH_BYTES):
a few large frames end a batch as a full socket buffer of small ones does.

The session runs in-process over a socket pair; the record lock's takes and releases
and the target's writes are recorded in order.
"""

from __future__ import annotations

from bmig.receiver import session as session_module
from bmig.receiver import target as target_module
from bmig.wire import codec
from bmig.wire.channel import Channel
from bmig.wire.protocol import (FLAG_ACK_WRITTEN, T, decode_json, pack_data, pack_zero,
                                type_of, unpack_seq)
from tests.integration.wire_helpers import bye_in_process, replicating_in_process

BLOCK = 4096


def recorded(monkeypatch) -> list[str]:
    """The target's writes and zeroings and the record lock's takes and releases, in
    order."""
    events: list[str] = []
    real_write = target_module.TargetDevice.write
    real_zero = target_module.TargetDevice.zero
    real_acquire = target_module.RecordLock.acquire
    real_release = target_module.RecordLock.release

    def write(self, offset, payload):
        real_write(self, offset, payload)
        events.append("write")

    def zero(self, offset, length):
        real_zero(self, offset, length)
        events.append(f"zero {length}")

    def acquire(self, exclusive):
        real_acquire(self, exclusive)
        events.append("exclusive" if exclusive else "take")

    def release(self):
        events.append("release")
        real_release(self)

    monkeypatch.setattr(target_module.TargetDevice, "write", write)
    monkeypatch.setattr(target_module.TargetDevice, "zero", zero)
    monkeypatch.setattr(target_module.RecordLock, "acquire", acquire)
    monkeypatch.setattr(target_module.RecordLock, "release", release)
    return events


def written(sender: Channel, n: int) -> list[int]:
    seqs = []
    while len(seqs) < n:
        body = sender.read()
        assert type_of(body) == T.WRITTEN, decode_json(body)
        seqs.append(unpack_seq(body))
    return seqs


def test_a_batch_ends_after_its_byte_budget(tmp_path, monkeypatch):
    events = recorded(monkeypatch)
    monkeypatch.setattr(session_module, "BATCH_BYTES", 3 * BLOCK)
    sender, thread = replicating_in_process(tmp_path)
    try:
        frames = []
        for seq in range(1, 9):                      # 8 frames in one write: one read
            payload = bytes([seq]) * BLOCK
            frames.append((pack_data(codec.RAW, FLAG_ACK_WRITTEN, BLOCK, seq, seq * BLOCK,
                                     codec.checksum(payload)), payload))
        sender.send_many(frames)
        assert written(sender, 8) == list(range(1, 9))
    finally:
        bye_in_process(sender, thread)
    batches: list[int] = []
    for event in events[events.index("take"):]:
        if event == "take":
            batches.append(0)
        elif event == "write":
            batches[-1] += 1
    assert sum(batches) == 8 and max(batches) <= 3, (batches, events)


def test_a_long_zero_lets_go_of_the_record_lock_between_its_pieces(tmp_path, monkeypatch):
    """One ZERO of 2.5 pieces: zeroed in three, the lock taken again (and the record
    checked) for each, so a change of the record waits for one piece at most."""
    events = recorded(monkeypatch)
    monkeypatch.setattr(session_module, "ZERO_PIECE", 2 * BLOCK)
    sender, thread = replicating_in_process(tmp_path)
    try:
        sender.send(pack_zero(1, 0, 5 * BLOCK, FLAG_ACK_WRITTEN))
        assert written(sender, 1) == [1]
    finally:
        bye_in_process(sender, thread)
    zeroing = events[events.index("take"):]
    zeroing = zeroing[:zeroing.index(f"zero {BLOCK}") + 2]
    assert zeroing == ["take", f"zero {2 * BLOCK}", "release", "take", f"zero {2 * BLOCK}",
                       "release", "take", f"zero {BLOCK}", "release"], events
