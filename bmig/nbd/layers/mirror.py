"""Invariant 6 in bmig-nbd: writes are never reordered against resync.

DESIGN.md: in synchronous mode a chunk that is in flight for resync and is written by
the application is marked dirty again and shipped later, so an older copy can never land
after a newer one and stay there. While bmig-nbd replicates a device (protocol A, B or
C), each application write goes to the target at once, and a sync pass (the resync) runs
beside it; the two must never leave on the target an older copy than the source has,
with the chunk clean in breqd.

The rule has two halves.

breqd's half (bmig.tracker): a MARK with ``hold`` and ``sync`` (the MARK field that says
"these writes also go to the target") makes *mirrored* those of its chunks that were
clean (``ChunkMap.clean``, then ``ChunkMap.hold`` with those bits): the target has
everything of them but the writes under way, so senders leave them alone (a checkout
skips mirrored chunks). Every other chunk of the mark is plain dirty, held: one in flight
for resync is re-marked, and the resync's commit leaves it dirty, so it ships again after
the write (invariant 2). A MARK_COMPLETED with ``synced`` makes the mirrored chunks nobody
holds any more clean (``ChunkMap.release_mirrored``); without it they are plain dirty.
Anything else that dirties a mirrored chunk makes it plain dirty.

bmig-nbd's half (this module): a hold is released ``synced`` only when that is true:
every write under it was replicated by the replication that is still running, and a
DURABLE of that replication covers the last of them. Otherwise it is released plain, and
a later pass ships the chunk. What a write leaves in its hold (``Hold``):

    tainted      a write under the hold did not reach the target: the replica failed or
                 was stopped while it ran, replication was off when it began, or it went
                 by the fast path (which replication never takes)
    last_seq        the replica seq of the last write under the hold (0: none yet)
    seq_generation  the replication that gave ``last_seq``

A seq means something only to the replica that gave it (each counts from 1), so the
replication layer moves its generation (``ReplicationGeneration``) on whenever
replication starts, stops or fails, and tells the tracking layer at once. A hold waiting
for a seq of another generation is tainted then: no DURABLE of the new replica covers a
write it never carried (invariant 11). While replicating, tainted holds are let go at
once (plain), so the resync beside ships them. A hold that settled goes at once
(``synced``) unless breqd said its chunk is mirrored (``Hold.mirrored``, from the MARK's
reply): a chunk that was dirty when held must be free now and then for a sender to make
it clean, while a mirrored one is left alone by senders anyway, so its hold is kept like
a hold of tracking only (the next write to it needs no MARK) and the idle sweep lets it
go, synced once settled: an idle time after its last write, or, written or not,
``KEPT_MIRRORED_IDLES`` idle times after it was taken (bmig.nbd.layers.track), in
either case only at a sweep that finds no write running on it. The idle sweep never
lets go a hold that still waits for the target, or the next pass would ship again what
the target is about to have.

This module keeps that bookkeeping and decides; the tracking layer (bmig.nbd.layers.track)
owns the holds, asks it, and sends the releases. It may not talk to breqd or to the
target, nor change which chunks are held: it only reads the holds table and writes the
replication fields of its holds.

Tests: tests/unit/test_nbd_track.py (the "while replicating" ones: synced only once
durable, a write that missed the target let go plain at once, a chunk written again waits
for its latest write); tests/unit/test_nbd_mirror.py (the same once the generation was
seen); tests/unit/test_nbd_replica.py (a refused write is never released
synced in protocols A, B and C, a DURABLE after a refusal covers nothing, a seq of an
earlier replication is not covered by the next one's DURABLE);
tests/integration/test_replicate.py::test_an_older_resync_copy_landing_after_a_newer_write_is_shipped_again
(the interleaving forced end to end); breqd's half in tests/integration/test_breqd_holds.py
(the "synchronous write" tests).
"""

from __future__ import annotations

import heapq
from collections import Counter
from typing import Any, Callable, Protocol


class Mirror(Protocol):
    """What the tracking layer reads of the replication layer below it."""

    active: bool
    generation: int           # changes whenever replication starts, stops or degrades
    durable_seq: int

    def add_listener(self, callback: Callable[[], None]) -> None: ...


class ReplicationGeneration:
    """The replication layer's half of the contract: which replication a seq belongs to,
    and the news that the generation or the durable watermark moved.

    ``advance`` when replication starts, stops or fails, before anything the old replica
    gave is looked at again; ``announce`` once the layer's state says what happened (and
    at every DURABLE), so the listeners settle or taint their holds at once."""

    __slots__ = ("value", "_listeners")

    def __init__(self) -> None:
        self.value = 0
        self._listeners: list[Callable[[], None]] = []

    def add_listener(self, callback: Callable[[], None]) -> None:
        self._listeners.append(callback)

    def advance(self) -> None:
        self.value += 1

    def announce(self) -> None:
        for callback in self._listeners:
            callback()


class Hold:
    """One held chunk: was every write under it replicated, and up to which seq; and when
    it was last written (``seen``, for the tracking layer's idle sweep)."""

    __slots__ = ("tainted", "last_seq", "seq_generation", "seen", "taken", "mirrored")

    def __init__(self, tainted: bool, seen: int, mirrored: bool = False):
        self.tainted = tainted       # a write under the hold did not reach the target
        self.last_seq = 0            # the replica seq of the last write under the hold
        self.seq_generation = -1     # the replication that gave ``last_seq``
        self.seen = seen             # sweeps done when the chunk was last written
        self.taken = seen            # sweeps done when the hold was taken
        self.mirrored = mirrored     # breqd said the chunk is mirrored under this hold


class MirroredHolds:
    """The replication record of the tracking layer's holds, and when a hold may go.

    ``held`` and ``busy`` are the tracking layer's tables (chunk -> Hold, and the chunks
    with a write running), read here and never changed."""

    def __init__(self, mirror: Mirror, held: dict[int, Hold], busy: Counter[int]):
        self.mirror = mirror
        self._held = held
        self._busy = busy
        # A heap of (replica seq, chunk): holds that settle once a DURABLE reaches seq.
        self._awaiting_durable: list[tuple[int, int]] = []
        self._generation_seen = -1          # the replication the heap belongs to
        self._durable_seen = 0              # its durable watermark, the last one seen

    def forget(self) -> None:
        """The holds are gone (breqd's connection changed)."""
        self._awaiting_durable.clear()

    def note(self, chunks: range, generation: int | None, result: Any) -> None:
        """A write to ``chunks`` that began under replication ``generation`` (None: not
        replicating) ended with ``result`` (the replica seq, or None when it did not
        reach the target): record the seq in its holds, or taint them."""
        replicated = (generation is not None and isinstance(result, int) and result > 0
                      and self.mirror.generation == generation)
        held = self._held
        for c in chunks:
            hold = held.get(c)
            if hold is None:
                continue
            if not replicated or (hold.last_seq and hold.seq_generation != generation):
                hold.tainted = True      # a seq of another replication covers nothing here
            else:
                hold.last_seq = max(hold.last_seq, result)
                hold.seq_generation = generation
                heapq.heappush(self._awaiting_durable, (result, c))

    def awaits_target(self, hold: Hold) -> bool:
        """The hold waits for a DURABLE of the current replication."""
        mirror = self.mirror
        return (not hold.tainted and hold.last_seq > 0
                and hold.seq_generation == mirror.generation
                and hold.last_seq > mirror.durable_seq)

    def settled(self, hold: Hold) -> bool:
        """Every write under the hold was replicated and is durable on the target: by a
        DURABLE of the replication that carried them, which is still running."""
        mirror = self.mirror
        return (not hold.tainted and hold.last_seq > 0
                and mirror.active and hold.seq_generation == mirror.generation
                and hold.last_seq <= mirror.durable_seq)

    def tainted(self, chunks: range) -> list[int]:
        """The held chunks among ``chunks`` that a write left dirty, and none runs on."""
        held, busy = self._held, self._busy
        return [c for c in chunks if c in held and held[c].tainted and c not in busy]

    def may_settle(self) -> bool:
        """``settle`` would find something to do: the generation changed, or a DURABLE
        reached the lowest seq waiting. Cheap, for the hot path: False means ``settle``
        would return nothing."""
        mirror = self.mirror
        if mirror.generation != self._generation_seen:
            return True
        awaiting = self._awaiting_durable
        return bool(awaiting) and awaiting[0][0] <= mirror.durable_seq

    def settle(self) -> tuple[list[int], list[int]]:
        """What may go now, while replicating: (tainted, settled) chunks, the first to be
        let go plain and then the second synced. A settled hold that breqd made
        mirrored is kept, like a hold of tracking only: no sender ships it meanwhile,
        and the next write to it needs no MARK; the idle sweep lets it go (synced once
        settled). A settled hold of a chunk that was dirty when held goes at once, so
        that a sender can make the chunk clean between writes.

        Called after every replicated write, every DURABLE and every change of
        generation, so it looks only at the chunks whose writes the new durable seq
        covers; a new generation looks at every hold once, and taints those still
        waiting for a seq of another one; a kept hold whose writes a DURABLE of the
        replication that ended had covered goes synced then."""
        mirror = self.mirror
        held, busy = self._held, self._busy
        tainted: list[int] = []
        settled: set[int] = set()
        if mirror.generation != self._generation_seen:
            previous, durable_before = self._generation_seen, self._durable_seen
            self._generation_seen = mirror.generation
            for c, hold in held.items():
                if hold.last_seq and hold.seq_generation != mirror.generation:
                    if (not hold.tainted and hold.seq_generation == previous
                            and hold.last_seq <= durable_before and c not in busy):
                        # Settled by a DURABLE of the replication that carried every
                        # write under it, before it ended (a kept hold): synced.
                        settled.add(c)
                        hold.last_seq = 0
                    else:
                        hold.tainted = True
            self._awaiting_durable = [(hold.last_seq, c) for c, hold in held.items()
                                      if hold.last_seq and not hold.tainted]
            heapq.heapify(self._awaiting_durable)
            tainted = [c for c, hold in held.items() if hold.tainted and c not in busy]
        # The watermark always belongs to ``_generation_seen``: each replica counts its
        # seqs from 1, so one of another replication could cover seqs it never saw. When
        # a change went unseen (nothing was held), it is at most lower than the truth.
        self._durable_seen = mirror.durable_seq
        durable, awaiting = mirror.durable_seq, self._awaiting_durable
        while awaiting and awaiting[0][0] <= durable:
            _, c = heapq.heappop(awaiting)
            # A chunk still being written is seen again when that write is answered; a
            # mirrored one is kept (``keeps``).
            hold = held.get(c)
            if c not in busy and hold is not None and self.settled(hold) \
                    and not hold.mirrored:
                settled.add(c)
        return tainted, sorted(settled)
