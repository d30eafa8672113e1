"""Holds: a writer's marked chunks stay dirty through a sender's commit until released.

A writer (bmig-nbd) marks with ``hold`` before it writes and releases with
MARK_COMPLETED after its last write to the chunk. While held, a chunk that a sender
checks out and commits stays dirty: the sender may have read it before the write landed
(invariant 2). When the writer's connection ends, its holds go and the chunks stay dirty.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from bmig.limits import MAX_HELD_RUNS
from bmig.errors import RequestError
from bmig.tracker.protocol import Op
from tests.daemon import wait_until

CHUNK = 64 << 10
SIZE = 64 * CHUNK


@pytest.fixture
def device(breqd):
    c = breqd.client()
    c.add_device("h", SIZE)
    c.clear_all("h", force=True)
    c.close()
    return "h"


def ship_everything(client, device: str) -> list[tuple[int, int]]:
    """What a sender does: check out, (ship,) commit; returns what it took."""
    taken = client.checkout(device, SIZE)
    if taken:
        client.commit(device, taken)
    return taken


def test_a_held_chunk_stays_dirty_after_a_sender_commits_it(breqd, device):
    writer, sender = breqd.client(), breqd.client()
    writer.mark(device, [(CHUNK, 4096)], hold=True)
    assert ship_everything(sender, device) == [(CHUNK, CHUNK)]
    stats = sender.stats(device)
    assert stats["dirty_bytes"] == CHUNK and stats["held_bytes"] == CHUNK
    writer.mark_completed(device, [(CHUNK, 4096)])
    assert sender.stats(device)["held_bytes"] == 0
    assert ship_everything(sender, device) == [(CHUNK, CHUNK)]
    assert sender.stats(device)["dirty_bytes"] == 0


def test_a_settled_checkout_leaves_held_chunks_until_the_writer_lets_go(breqd, device):
    """The catch-up service's checkouts (settled): a held chunk would only ship again, so
    it is not taken while held; once released it is, like any dirty chunk."""
    writer, sender = breqd.client(), breqd.client()
    writer.mark(device, [(CHUNK, 4096)], hold=True)
    sender.mark(device, [(3 * CHUNK, 4096)])                 # dirty, not held
    taken = sender.checkout(device, SIZE, settled=True)
    assert taken == [(3 * CHUNK, CHUNK)]
    sender.commit(device, taken)
    assert sender.checkout(device, SIZE, settled=True) == []
    stats = sender.stats(device)
    assert stats["dirty_bytes"] == CHUNK and stats["held_bytes"] == CHUNK
    writer.mark_completed(device, [(CHUNK, 4096)])
    assert sender.checkout(device, SIZE, settled=True) == [(CHUNK, CHUNK)]
    sender.commit(device, [(CHUNK, CHUNK)])
    assert sender.stats(device)["dirty_bytes"] == 0


def test_a_writer_that_dies_leaves_its_held_chunks_dirty(breqd, device):
    """kill -9 of the writer between its write and its release: the chunk still ships."""
    script = (
        "import os, sys\n"
        "from bmig.tracker.blocking_client import TrackerClient\n"
        f"c = TrackerClient({breqd.control!r})\n"
        f"c.mark({device!r}, [(0, 4096), ({5 * CHUNK}, {2 * CHUNK})], hold=True)\n"
        "print('held', flush=True)\n"
        "sys.stdin.read()\n")
    writer = subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert writer.stdout.readline().strip() == "held"
        sender = breqd.client()
        assert sender.stats(device)["held_bytes"] == 3 * CHUNK
        ship_everything(sender, device)
        writer.kill()
        writer.wait(timeout=30)
    finally:
        if writer.poll() is None:
            writer.kill()
            writer.wait(timeout=30)
        writer.stdin.close()
        writer.stdout.close()
    sender = breqd.client()
    stats = sender.stats(device)
    assert stats["held_bytes"] == 0 and stats["dirty_bytes"] == 3 * CHUNK
    assert ship_everything(sender, device) == [(0, CHUNK), (5 * CHUNK, 2 * CHUNK)]
    assert sender.stats(device)["dirty_bytes"] == 0


def test_holds_of_two_writers_are_released_separately(breqd, device):
    a, b, sender = breqd.client(), breqd.client(), breqd.client()
    a.mark(device, [(0, 3 * CHUNK)], hold=True)
    b.mark(device, [(CHUNK, 4096)], hold=True)
    a.mark_completed(device, [(0, 3 * CHUNK)])
    assert sender.stats(device)["held_bytes"] == CHUNK
    ship_everything(sender, device)
    assert sender.stats(device)["dirty_bytes"] == CHUNK
    b.close()
    ship_everything(sender, device)
    assert sender.stats(device)["dirty_bytes"] == 0


def test_release_without_a_hold_is_a_plain_mark(breqd, device):
    c = breqd.client()
    c.mark_completed(device, [(2 * CHUNK, 1)])
    assert c.stats(device)["dirty_bytes"] == CHUNK and c.stats(device)["held_bytes"] == 0


def test_clear_all_keeps_held_chunks_dirty(breqd, device):
    writer, admin = breqd.client(), breqd.client()
    writer.mark(device, [(4 * CHUNK, CHUNK)], hold=True)
    admin.mark(device, [(8 * CHUNK, CHUNK)])
    admin.clear_all(device, force=True)
    assert admin.stats(device)["dirty_bytes"] == CHUNK


def test_held_chunks_survive_kill9_of_breqd(breqd, device):
    writer = breqd.client()
    writer.mark(device, [(3 * CHUNK, 10)], hold=True)
    sender = breqd.client()
    ship_everything(sender, device)          # committed, but held: stays dirty
    breqd.daemon.kill9()
    breqd.restart()
    stats = breqd.client().stats(device)
    assert stats["dirty_bytes"] == CHUNK and stats["held_bytes"] == 0


def test_too_many_held_runs_are_refused(breqd, tmp_path):
    c = breqd.client()
    c.add_device("big", (MAX_HELD_RUNS + 10) * 2 * 4096, chunk_size=4096)
    # Every other chunk: each range is a run of its own.
    ranges = [(2 * i * 4096, 1) for i in range(MAX_HELD_RUNS)]
    for start in range(0, len(ranges), 65536):
        c.mark("big", ranges[start:start + 65536], hold=True)
    assert c.stats("big")["held_bytes"] == MAX_HELD_RUNS * 4096
    with pytest.raises(RequestError, match="held runs"):
        c.mark("big", [(2 * (MAX_HELD_RUNS + 1) * 4096, 1)], hold=True)
    c.mark_completed("big", [(0, 1)])
    c.mark("big", [(2 * (MAX_HELD_RUNS + 1) * 4096, 1)], hold=True)   # room again
    c.close()


def test_query_answers_the_differing_runs(breqd, device):
    c = breqd.client()
    c.mark(device, [(CHUNK, 2 * CHUNK), (10 * CHUNK, 1)])
    taken = c.checkout(device, CHUNK)                    # in flight: still differs
    assert taken == [(CHUNK, CHUNK)]
    runs, end = c.query(device, 0, SIZE)
    assert runs == [(CHUNK, 2 * CHUNK), (10 * CHUNK, CHUNK)] and end == SIZE
    runs, end = c.query(device, CHUNK + 100, 4096)
    assert runs == [(CHUNK, CHUNK)] and end == CHUNK + 100 + 4096


# -- synchronous writes (protocol A/B/C): mirrored chunks -------------------------------------

def test_a_synchronous_write_to_a_clean_chunk_leaves_it_clean_when_it_reached_the_target(
        breqd, device):
    writer, sender = breqd.client(), breqd.client()
    writer.mark(device, [(2 * CHUNK, 100)], hold=True, sync=True)
    stats = sender.stats(device)
    assert stats["dirty_bytes"] == CHUNK and stats["mirrored_bytes"] == CHUNK
    assert sender.checkout(device, SIZE) == []        # the writer sends it itself
    writer.mark_completed(device, [(2 * CHUNK, 100)], synced=True)
    stats = sender.stats(device)
    assert stats["dirty_bytes"] == 0 and stats["mirrored_bytes"] == 0


def test_a_synchronous_write_that_did_not_reach_the_target_leaves_the_chunk_dirty(
        breqd, device):
    writer, sender = breqd.client(), breqd.client()
    writer.mark(device, [(0, 1)], hold=True, sync=True)
    writer.mark_completed(device, [(0, 1)])           # not synced: degraded, or failed
    assert sender.stats(device)["mirrored_bytes"] == 0
    assert ship_everything(sender, device) == [(0, CHUNK)]


def test_a_synchronous_writer_that_dies_leaves_its_chunks_dirty(breqd, device):
    writer = breqd.client()
    writer.mark(device, [(CHUNK, 1)], hold=True, sync=True)
    writer.close()
    sender = breqd.client()
    wait_until(lambda: sender.stats(device)["held_bytes"] == 0, timeout=10,
               what="breqd to see the writer go")
    assert sender.stats(device)["mirrored_bytes"] == 0
    assert ship_everything(sender, device) == [(CHUNK, CHUNK)]


def test_a_synchronous_write_to_a_chunk_in_flight_for_resync_ships_it_again(breqd, device):
    """Invariant 6: the resync may have read the chunk before the write; its older copy
    may land on the target after the newer one, so the chunk must be shipped again."""
    sender, writer = breqd.client(), breqd.client()
    sender.mark(device, [(3 * CHUNK, 1)])                         # waiting for resync
    assert sender.checkout(device, SIZE) == [(3 * CHUNK, CHUNK)]  # in flight
    writer.mark(device, [(3 * CHUNK, 10)], hold=True, sync=True)  # the application writes
    writer.mark_completed(device, [(3 * CHUNK, 10)], synced=True)
    sender.commit(device, [(3 * CHUNK, CHUNK)])                   # the old copy is durable
    assert sender.stats(device)["dirty_bytes"] == CHUNK           # ... and not trusted
    assert ship_everything(sender, device) == [(3 * CHUNK, CHUNK)]
    assert sender.stats(device)["dirty_bytes"] == 0


def test_a_chunk_waiting_for_resync_is_not_made_clean_by_a_synchronous_write(breqd, device):
    """The write brings only its own bytes to the target, not the rest of the chunk."""
    sender, writer = breqd.client(), breqd.client()
    sender.mark(device, [(4 * CHUNK, 1)])
    writer.mark(device, [(4 * CHUNK, 10)], hold=True, sync=True)
    assert sender.stats(device)["mirrored_bytes"] == 0
    writer.mark_completed(device, [(4 * CHUNK, 10)], synced=True)
    assert ship_everything(sender, device) == [(4 * CHUNK, CHUNK)]


def test_a_mirrored_chunk_held_by_two_writers_stays_dirty_until_both_let_go(breqd, device):
    """One writer's synced release says nothing of the other's write, still on its way."""
    a, b, sender = breqd.client(), breqd.client(), breqd.client()
    a.mark(device, [(5 * CHUNK, 10)], hold=True, sync=True)
    b.mark(device, [(5 * CHUNK, 10)], hold=True, sync=True)
    a.mark_completed(device, [(5 * CHUNK, 10)], synced=True)
    stats = sender.stats(device)
    assert stats["dirty_bytes"] == CHUNK and stats["held_bytes"] == CHUNK
    b.mark_completed(device, [(5 * CHUNK, 10)], synced=True)
    assert sender.stats(device)["dirty_bytes"] == 0


def test_a_plain_mark_of_a_mirrored_chunk_survives_the_synced_release(breqd, device):
    """A write that was not replicated (another writer, a plain mark) dirties the chunk
    for good: the synchronous writer's synced release must not make it clean."""
    writer, other = breqd.client(), breqd.client()
    writer.mark(device, [(6 * CHUNK, 10)], hold=True, sync=True)
    assert other.stats(device)["mirrored_bytes"] == CHUNK
    other.mark(device, [(6 * CHUNK + 100, 10)])
    writer.mark_completed(device, [(6 * CHUNK, 10)], synced=True)
    assert other.stats(device)["dirty_bytes"] == CHUNK
    assert ship_everything(other, device) == [(6 * CHUNK, CHUNK)]


def test_sync_without_hold_is_refused(breqd, device):
    with pytest.raises(RequestError, match="sync needs hold"):
        breqd.client().call(Op.MARK, {"device": device, "sync": True}, [(0, 1)])
