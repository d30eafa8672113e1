"""Replicated frames in batches, against a real breceive.

bmig-nbd sends the frames of one event-loop turn together (one write), and breceive
handles what one read brought as a batch, holding its RECEIVED and WRITTEN back to send
them together. What a batch must not change:

- each frame is still checked on its own: one bad frame in a batch is refused (ERROR
  with its seq, nothing of it written) and the frames around it are written;
- acknowledgements keep the order of the frames: the WRITTEN of a frame before the bad
  one arrives before the ERROR, so the sender, which fails the whole replica on that
  ERROR, never takes a write the target has for one it lacks, nor the reverse; with
  cumulative acknowledgements (OPEN's ``acks``) one of each kind per batch, still before
  the ERROR;
- the record is checked once per batch under the record lock (invariant 7), and the
  lock is free again once the batch is written: a promotion never waits for an idle
  session.
"""

from __future__ import annotations

import fcntl
import os
import select

from bmig.lineage import ROLE_PRIMARY, STATE_CONSISTENT, load_target, save_target
from bmig.receiver.target import RecordLock
from bmig.wire import codec
from bmig.wire.protocol import (FLAG_ACK_RECEIVED, FLAG_ACK_WRITTEN, T, decode_json,
                                pack_data, pack_seq, type_of, unpack_seq)
from tests.integration.sync_helpers import receivers, start_receiver  # noqa: F401
from tests.integration.test_sync_primary import A, read_at, refused_and_closed, replicating

BLOCK = 4096


def data_frame(seq: int, offset: int, data: bytes, flags: int,
               checksum: int | None = None) -> tuple[bytes, bytes]:
    digest = codec.checksum(data) if checksum is None else checksum
    return pack_data(codec.RAW, flags, len(data), seq, offset, digest), data


def replication_session(tmp_path, receivers, **fields):
    """A breceive with one target, and a replication session of lineage A opened on it
    with OPEN's ``fields``: (the receiver, the session, the target's path)."""
    target = str(tmp_path / "tgt.img")
    r = start_receiver(tmp_path, {"d": target})
    receivers.append(r)
    return r, replicating(r, A, **fields), target


def answers(raw, n: int) -> list[tuple[str, int]]:
    """The next ``n`` frames breceive sends, as (kind, seq)."""
    out = []
    for _ in range(n):
        body = raw.read()
        kind = type_of(body)
        if kind == T.ERROR:
            fields = decode_json(body).fields
            assert not fields.get("fatal"), fields
            out.append(("ERROR", fields["seq"]))
        else:
            out.append((kind.name, unpack_seq(body)))
    return out


def test_a_bad_frame_in_a_batch_is_refused_alone_and_acknowledgements_keep_their_order(
        tmp_path, receivers):
    _, raw, target = replication_session(tmp_path, receivers)
    good = [os.urandom(BLOCK) for _ in range(4)]
    bad = os.urandom(BLOCK)
    raw.channel.send_many([                              # one write: one batch
        data_frame(1, 0, good[0], FLAG_ACK_WRITTEN),
        data_frame(2, BLOCK, good[1], FLAG_ACK_RECEIVED),
        data_frame(3, 2 * BLOCK, bad, FLAG_ACK_WRITTEN, checksum=codec.checksum(bad) ^ 1),
        data_frame(4, 3 * BLOCK, good[2], FLAG_ACK_WRITTEN),
        data_frame(5, 4 * BLOCK, good[3], FLAG_ACK_WRITTEN),
        (pack_seq(T.FLUSH, 6), None),
    ])
    got = answers(raw, 6)
    assert got[:3] == [("WRITTEN", 1), ("RECEIVED", 2), ("ERROR", 3)], got
    assert sorted(got[3:]) == [("DURABLE", 6), ("WRITTEN", 4), ("WRITTEN", 5)], got
    assert read_at(target, 0, 2 * BLOCK) == good[0] + good[1]
    assert read_at(target, 2 * BLOCK, BLOCK) != bad              # nothing of it written
    assert read_at(target, 3 * BLOCK, 2 * BLOCK) == good[2] + good[3]
    raw.close()


def test_cumulative_acknowledgements_are_one_of_each_kind_per_batch_and_still_before_an_error(
        tmp_path, receivers):
    _, raw, target = replication_session(tmp_path, receivers, acks="cumulative")
    blocks = [os.urandom(BLOCK) for _ in range(7)]
    bad = blocks[4]
    raw.channel.send_many([                              # one write: one batch
        data_frame(1, 0, blocks[0], FLAG_ACK_WRITTEN),
        data_frame(2, BLOCK, blocks[1], FLAG_ACK_WRITTEN),
        data_frame(3, 2 * BLOCK, blocks[2], FLAG_ACK_RECEIVED),
        data_frame(4, 3 * BLOCK, blocks[3], FLAG_ACK_RECEIVED),
        data_frame(5, 4 * BLOCK, bad, FLAG_ACK_WRITTEN, checksum=codec.checksum(bad) ^ 1),
        data_frame(6, 5 * BLOCK, blocks[5], FLAG_ACK_WRITTEN),
        data_frame(7, 6 * BLOCK, blocks[6], FLAG_ACK_WRITTEN),
        (pack_seq(T.FLUSH, 8), None),
    ])
    got = answers(raw, 5)
    assert got[:3] == [("WRITTEN", 2), ("RECEIVED", 4), ("ERROR", 5)], got
    assert sorted(got[3:]) == [("DURABLE", 8), ("WRITTEN", 7)], got
    assert read_at(target, 0, 4 * BLOCK) == b"".join(blocks[:4])
    assert read_at(target, 4 * BLOCK, BLOCK) != bad              # nothing of it written
    assert read_at(target, 5 * BLOCK, 2 * BLOCK) == blocks[5] + blocks[6]
    raw.close()


def test_the_record_lock_is_free_once_a_batch_is_written(tmp_path, receivers):
    """A batch holds the record lock (shared) from its one check to its last write; it
    lets go before it acknowledges, so a session that changes the record (a promotion
    takes the lock exclusively) is never kept waiting by an idle replication session."""
    r, raw, target = replication_session(tmp_path, receivers)
    raw.channel.send_many([data_frame(seq, seq * BLOCK, os.urandom(BLOCK), FLAG_ACK_WRITTEN)
                           for seq in (1, 2, 3)])
    assert answers(raw, 3) == [("WRITTEN", 1), ("WRITTEN", 2), ("WRITTEN", 3)]
    fd = os.open(os.path.join(r.state_dir, "d.record.lock"), os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)   # BlockingIOError if still held
        fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)
    raw.close()


def test_a_batch_waits_for_the_record_lock_and_checks_the_record_once_it_has_it(
        tmp_path, receivers):
    """A change of the record under way (the lock held exclusively, as a promotion holds
    it): a batch that arrives meanwhile writes nothing until the change is done, then
    finds the new record and ends the session, with nothing of it written."""
    r, raw, target = replication_session(tmp_path, receivers)
    changing = RecordLock(r.state_dir, "d")
    changing.acquire(exclusive=True)
    try:
        block = os.urandom(BLOCK)
        raw.channel.send_many([data_frame(1, 0, block, FLAG_ACK_WRITTEN)])
        answered, _, _ = select.select([raw.sock], [], [], 0.5)
        assert not answered, "the batch was written while the record was being changed"
        record = load_target(r.state_dir, "d")
        record.state, record.role, record.generation = STATE_CONSISTENT, ROLE_PRIMARY, 0xee
        save_target(r.state_dir, record)                # promoted meanwhile
    finally:
        changing.release()
        changing.close()
    refused_and_closed(raw, "is the primary now")
    assert read_at(target, 0, BLOCK) == bytes(BLOCK)
