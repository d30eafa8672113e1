"""The tracking layer: every write-like command is marked in breqd before the write.

For WRITE, TRIM and WRITE_ZEROES (invariants 1, 2 and 4) the chunks the request touches
are marked durable in breqd, with a hold, before the request goes on. A held chunk stays
dirty in breqd whatever a sender checks out and commits, until this layer releases it, so
a sender that read the chunk before the write landed ships it again. That is the second
mark of invariant 2, taken in advance: it covers the write even if this process dies
before it could say "done".

The layer keeps the chunks it holds, like DRBD's activity log: a write to chunks already
held needs no message to breqd at all, which is what makes the fast path fast. Chunks not
written for ``idle`` seconds, or the oldest ones beyond ``hold_limit``, are released with
MARK_COMPLETED (a mark again, then the hold goes), never while a write to them runs.

While the device is replicated synchronously (bmig.nbd.layers.replicate is active), a
write takes its holds with ``sync`` and what it leaves in them decides how they are
released: bmig.nbd.layers.mirror keeps that record and says when a hold may go as
``synced`` (invariant 6); this layer asks it and sends the releases. breqd's answer to
such a MARK names the chunks it made mirrored; their holds are kept once settled, so a
replicated write to a chunk written lately needs no message to breqd either, and runs
with no task (``write_later``: the reply comes with the target's answer).

Holds belong to the breqd connection. When it is lost they are gone: the table is
emptied, the next write marks again, and a write that was running while the connection
changed is marked again after it completed, before its reply. If breqd cannot be reached
or a mark fails, the request fails with EIO and the source is not touched.

It reaches breqd only through the Tracker protocol (the caller plugs the client in), may
not talk to the target, and may not decide when a replicated hold may go: it asks
bmig.nbd.layers.mirror.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import heapq
import logging
from collections import Counter
from typing import Any, Awaitable, Callable, Protocol

from bitarray.util import zeros

from bmig.chunkmath import chunk_span
from bmig.constants import HOLD_IDLE, HOLD_IDLE_SWEEPS
from bmig.errors import BmigError
from bmig.limits import DEFAULT_HOLD_LIMIT, MAX_DATA
from bmig.nbd import protocol as p
from bmig.nbd.layers.base import Layer, WriteDone
from bmig.nbd.layers.mirror import Hold, Mirror, MirroredHolds

log = logging.getLogger("bmig-nbd")

Ranges = list[tuple[int, int]]

DEFAULT_HOLD_IDLE = HOLD_IDLE     # seconds without a write before a chunk is let go
IDLE_SWEEPS = HOLD_IDLE_SWEEPS    # sweeps per idle period: a chunk goes idle..1.25 idle late
# While replicating, a hold kept because breqd called its chunk mirrored goes this many
# idle periods after it was taken, even if still written (``_sweep_idle``: 16-16.5 s).
# Every time it goes, the next write to the chunk takes it again with a MARK: after one
# idle period, as before, that was one MARK per hot chunk every ~2.2 s; at iodepth 32,
# 0.02 MARKs per replicated write on a 64 MiB device and 0.41-0.48 on a 1 GiB one, where
# breqd used half a core (bench/README.md, "Latency figures: kept mirrored holds"). The
# cost of a longer life: a chunk that something else made plain dirty under such a hold
# (a plain MARK, set-dirty) is let go that much later, and only then can a pass make it
# clean (``bmigrate run``'s hot refresh ships held chunks every 30 s by default, but
# they stay dirty while held).
KEPT_MIRRORED_IDLES = 8
DIRTY = 1                         # qemu:dirty-bitmap extent flag


class Tracker(Protocol):
    """breqd as this layer needs it (bmig.tracker.write_path_client.AsyncTrackerClient). The flags
    keep the names of the control protocol's fields: ``sync`` on a MARK says the writes
    under the hold also go to the target; ``synced`` on a release (MARK_COMPLETED) says
    they are all durable there."""

    session: int
    connected: bool

    async def mark(self, device: str, ranges: Ranges, hold: bool = False,
                   sync: bool = False) -> int: ...
    async def mark_sync(self, device: str, ranges: Ranges) -> tuple[int, Ranges]: ...
    def release(self, device: str, ranges: Ranges,
                synced: bool = False) -> "asyncio.Future[None]": ...
    async def query(self, device: str, offset: int,
                    length: int) -> tuple[Ranges, int]: ...


class _ChunkRuns:
    """Sorted, disjoint byte ranges (a MARK reply's) asked chunk by chunk."""

    def __init__(self, ranges: Ranges, chunk_size: int):
        self._starts = [offset // chunk_size for offset, _ in ranges]
        self._ends = [-(-(offset + length) // chunk_size) for offset, length in ranges]

    def __contains__(self, chunk: int) -> bool:
        i = bisect.bisect_right(self._starts, chunk) - 1
        return i >= 0 and chunk < self._ends[i]


class TrackingFailed(Exception):
    """breqd could not record the range: the request must fail with NBD_EIO."""


def runs_of(chunks) -> list[tuple[int, int]]:
    """Sorted chunk numbers as (first, end) runs."""
    runs: list[tuple[int, int]] = []
    for c in sorted(chunks):
        if runs and runs[-1][1] == c:
            runs[-1] = (runs[-1][0], c + 1)
        else:
            runs.append((c, c + 1))
    return runs


class TrackLayer(Layer):
    def __init__(self, inner: Layer, tracker: Tracker, device: str, chunk_size: int,
                 hold_limit: int = DEFAULT_HOLD_LIMIT, idle: float = DEFAULT_HOLD_IDLE,
                 mirror: Mirror | None = None):
        super().__init__(inner)
        self.tracker = tracker
        self.device = device
        self.chunk_size = chunk_size
        self.hold_limit = max(1, hold_limit)
        self.idle = idle
        self.mirror = mirror
        self.held: dict[int, Hold] = {}      # chunks held under ``self._session``
        self._busy: Counter[int] = Counter()  # chunks with a slow-path request running
        # ... of which a request whose local part and frames may interleave with another
        # request's in another order on each side (a trim, a zero, a write of several
        # frames): an overlap with one taints the holds (the chunk ships again).
        self._unordered: Counter[int] = Counter()
        self._session = -1
        self._sweeps = 0                      # sweeps done; ``Hold.seen`` counts in them
        self._unrecorded: Ranges = []         # written, but the mark again failed
        # The fast path's tables, a bit per chunk of the device (two bits where breqd
        # keeps four or five): ``_plain``, the chunk is held with no replication record
        # to keep (its Hold is tainted), so a write to it only sets its bit in
        # ``_written``, which the sweeps fold into ``Hold.seen``. A dict lookup and two
        # stores into a Hold, on every write to a random place, missed the CPU's caches
        # (bench/README.md, "Figures: the fast path's bits"). Both bits are set only for
        # a chunk in ``held`` (``_plain``: whose Hold is tainted) and cleared when it
        # leaves, so the sweeps and a lost connection touch only the held chunks' bits.
        chunks = -(-self.size // chunk_size)
        self._plain = zeros(chunks)
        self._written = zeros(chunks)
        self._sweeper: asyncio.Task | None = None
        # What replicated writes left in the holds (invariant 6), when there is a mirror.
        self._mirrored = (MirroredHolds(mirror, self.held, self._busy)
                          if mirror is not None else None)
        if mirror is not None:
            mirror.add_listener(self._settle_mirrored)

    # -- holds -----------------------------------------------------------------------

    def _span(self, offset: int, length: int) -> range:
        return range(*chunk_span(offset, length, self.chunk_size))

    def _holds_valid(self) -> bool:
        """True while the holds in ``held`` are still breqd's; empties them otherwise."""
        tracker = self.tracker
        if tracker.connected and tracker.session == self._session:
            return True
        if self.held:
            log.info("%s: breqd connection changed; %d held chunks forgotten", self.device,
                     len(self.held))
        plain, written = self._plain, self._written
        for c in self.held:
            plain[c] = written[c] = 0
        self.held.clear()
        if self._mirrored is not None:
            self._mirrored.forget()
        self._session = tracker.session
        return False

    def _fold_written(self) -> None:
        """Bring ``Hold.seen`` up to date with what the fast path wrote since the last
        fold. The sweep count has not moved since (a fold comes before each sweep), so
        ``seen`` gets what it would have got at the write. Walks the held chunks, not
        the device's bits: its cost follows the holds, as the sweep's does."""
        written, now = self._written, self._sweeps
        for c, hold in self.held.items():
            if written[c]:
                hold.seen = now
                written[c] = 0

    def _saw(self, chunks: range) -> None:
        """The held ones among ``chunks`` were written: not idle since this sweep."""
        held, now = self.held, self._sweeps
        for c in chunks:
            hold = held.get(c)
            if hold is not None:
                hold.seen = now

    def _holds_all(self, chunks: range) -> bool:
        held = self.held
        if len(chunks) == 1:
            return chunks[0] in held
        return all(c in held for c in chunks)

    async def _acquire(self, offset: int, length: int, mirrored: bool) -> int:
        """Hold every chunk of the range (durably marked); returns the hold's session.
        ``mirrored``: the write also goes to the target (MARK's ``sync``)."""
        chunks = self._span(offset, length)
        if self._holds_valid() and self._holds_all(chunks):
            self._saw(chunks)
            return self._session
        earlier = len(self._unrecorded)
        ranges = self._unrecorded[:earlier] + [(offset, length)]
        try:
            if mirrored:
                session, in_mirror = await self.tracker.mark_sync(self.device, ranges)
            else:
                session = await self.tracker.mark(self.device, ranges, hold=True)
                in_mirror = []
        except BmigError as exc:
            raise TrackingFailed(f"{self.device}: cannot mark {offset}+{length} dirty: "
                                 f"{exc.message}") from None
        del self._unrecorded[:earlier]
        self._holds_valid()              # a new connection answered: start afresh
        if session != self._session:     # ... and has been lost since: hold nothing
            return session
        held, plain = self.held, self._plain
        mirrored_runs = _ChunkRuns(in_mirror, self.chunk_size)
        for range_offset, range_length in ranges:
            for c in self._span(range_offset, range_length):
                if c not in held:
                    held[c] = Hold(tainted=not mirrored, seen=self._sweeps,
                                   mirrored=c in mirrored_runs)
                    if not mirrored:
                        plain[c] = 1
        self._saw(chunks)
        if len(held) > self.hold_limit:
            self._let_go_oldest(keep=chunks)
        self._ensure_sweeper()
        return session

    def _overlaps(self, chunks: range, unordered: bool) -> bool:
        """A request starting on ``chunks`` meets one in flight whose order on the source
        and on the target may differ from its own (``unordered``: this one is such)."""
        unordered_busy, busy = self._unordered, self._busy
        if not unordered and not unordered_busy:    # a replicated write's usual case
            return False
        return any(c in unordered_busy or (unordered and c in busy) for c in chunks)

    async def _tracked(self, offset: int, length: int,
                       action: Callable[[], Awaitable[Any]], unordered: bool = False) -> None:
        mirror = self.mirror if self.mirror is not None and self.mirror.active else None
        generation = mirror.generation if mirror is not None else None
        session = await self._acquire(offset, length, mirrored=mirror is not None)
        chunks = self._span(offset, length)
        busy = self._busy
        overlapped = self._overlaps(chunks, unordered)
        for c in chunks:
            busy[c] += 1
            if unordered:
                self._unordered[c] += 1
        result = None
        try:
            result = await action()
        except Exception:
            # Failed, perhaps after the local write landed; if the hold was lost
            # meanwhile, breqd must hear of the range again all the same.
            if session != self.tracker.session:
                with contextlib.suppress(BmigError):
                    await self._mark_again(offset, length)
            raise
        finally:
            for c in chunks:
                busy[c] -= 1
                if not busy[c]:
                    del busy[c]
                if unordered:
                    self._unordered[c] -= 1
                    if not self._unordered[c]:
                        del self._unordered[c]
            self._saw(chunks)
            if self._mirrored is not None:
                self._mirrored.note(chunks, generation, None if overlapped else result)
        if session != self.tracker.session:
            await self._mark_again(offset, length)
        elif self._mirrored is not None and self._mirrored.mirror.active:
            if self._holds_valid():
                # A write that did not reach the target leaves its chunks dirty: let them
                # go at once (plain), so the resync beside us can ship them.
                self._let_go(self._mirrored.tainted(chunks), False)
            self._settle_mirrored()

    async def _mark_again(self, offset: int, length: int) -> None:
        """The hold was lost while the write ran: a sender may have committed the chunk
        since, so mark it again now (invariant 2). One retry covers a reconnect."""
        for attempt in (1, 2):
            try:
                await self.tracker.mark(self.device, [(offset, length)])
                return
            except BmigError as exc:
                log.warning("%s: mark again of %d+%d failed (attempt %d): %s", self.device,
                            offset, length, attempt, exc.message)
        self._unrecorded.append((offset, length))
        log.error("%s: %d+%d was written but breqd could not be told again; it is marked "
                  "with the next write that reaches breqd", self.device, offset, length)
        raise TrackingFailed(f"{self.device}: cannot mark {offset}+{length} again after "
                             "the write")

    # -- releasing -------------------------------------------------------------------

    def _byte_ranges(self, chunks) -> Ranges:
        ranges = [(first * self.chunk_size, (end - first) * self.chunk_size)
                  for first, end in runs_of(chunks)]
        if ranges:
            last_offset, last_length = ranges[-1]
            ranges[-1] = (last_offset, min(last_length, self.size - last_offset))
        return ranges

    def _let_go(self, chunks: list[int], settled: bool) -> None:
        """Forget the holds and queue their release (MARK_COMPLETED) at once, in this very
        step: a write that holds one of the chunks again is queued after it, so breqd
        never drops a hold this layer still writes under (its fast path sends no
        message). ``settled``: every write under them is durable on the target (the
        release's ``synced`` field); if not, breqd marks the chunks again."""
        if not chunks:
            return
        held, plain, written = self.held, self._plain, self._written
        for c in chunks:
            del held[c]
            plain[c] = written[c] = 0
        ranges = self._byte_ranges(chunks)
        for start in range(0, len(ranges), 65536):
            done = self.tracker.release(self.device, ranges[start:start + 65536], settled)
            done.add_done_callback(self._log_failed_release)

    def _log_failed_release(self, done: "asyncio.Future[None]") -> None:
        exc = done.exception()
        if isinstance(exc, BmigError):   # the holds end with the connection anyway
            log.debug("%s: release failed: %s", self.device, exc.message)

    def _let_go_settled_or_plain(self, chunks: list[int]) -> None:
        """Let go of ``chunks``: those whose writes are all durable on the target as
        settled, the others plain."""
        mirrored, held = self._mirrored, self.held
        settled: list[int] = []
        plain: list[int] = []
        for c in chunks:
            (settled if mirrored is not None and mirrored.settled(held[c])
             else plain).append(c)
        self._let_go(settled, True)
        self._let_go(plain, False)

    def _sweep_idle(self) -> None:
        """One sweep (``IDLE_SWEEPS`` per ``idle`` seconds): let go of the held chunks not
        written for a whole idle time and with no write running.

        Writes spread over the whole device come back to a chunk only every second or
        so: letting it go sooner would mean a round trip to breqd on most of them."""
        if not self._holds_valid():
            return
        self._fold_written()
        self._sweeps += 1
        held, busy = self.held, self._busy
        # While replicating, a hold whose writes are still on their way to the target
        # is let go (settled) once they are durable there, not plain before.
        mirrored = self._mirrored
        if mirrored is not None and not mirrored.mirror.active:
            mirrored = None
        # Seen before the sweep IDLE_SWEEPS ago: not written for a whole idle time. A
        # hold kept because breqd called its chunk mirrored goes KEPT_MIRRORED_IDLES
        # idle times after it was taken even if still written: breqd may have made the
        # chunk plain dirty since (a plain mark, set-dirty), and a sender can make it
        # clean only between holds.
        oldest = self._sweeps - IDLE_SWEEPS
        oldest_kept = self._sweeps - IDLE_SWEEPS * KEPT_MIRRORED_IDLES
        self._let_go_settled_or_plain(
            [c for c, hold in held.items()
             if (hold.seen < oldest or (mirrored is not None and hold.mirrored
                                        and hold.taken < oldest_kept))
             and c not in busy
             and not (mirrored is not None and mirrored.awaits_target(hold))])

    # The name the tests drive the sweeper by, one sweep per call.
    _release = _sweep_idle

    def _let_go_oldest(self, keep: range = range(0)) -> None:
        """Past the hold limit: down to 7/8 of it, least recently written first (letting
        go of more would only mean marking them again at the next write), but never a
        chunk a write runs on, nor ``keep`` (just held for the write about to run: let go
        now, it would be written with no hold and no mark after it)."""
        if not self._holds_valid():
            return
        self._fold_written()
        held, busy = self.held, self._busy
        want = len(held) - self.hold_limit + self.hold_limit // 8
        self._let_go_settled_or_plain(heapq.nsmallest(
            want, (c for c in held if c not in busy and c not in keep),
            key=lambda c: held[c].seen))

    def _settle_mirrored(self) -> None:
        """While replicating: let go at once of every hold whose writes all settled, and
        of tainted ones (plain), so the resync beside us finds them free."""
        if not self.held or not self._holds_valid():
            return
        assert self._mirrored is not None
        tainted, settled = self._mirrored.settle()
        self._let_go(tainted, False)
        self._let_go(settled, True)

    def let_go_settled(self) -> None:
        """While replicating: let go now of every hold whose writes are all durable on
        the target (synced), the kept ones too. After a freeze and a flush nothing more
        comes to them, and a cutover waits until nothing is held."""
        mirrored = self._mirrored
        if not self.held or not self._holds_valid() or mirrored is None \
                or not mirrored.mirror.active:
            return
        held, busy = self.held, self._busy
        self._let_go([c for c, hold in held.items()
                      if c not in busy and mirrored.settled(hold)], True)

    def _ensure_sweeper(self) -> None:
        if self._sweeper is None or self._sweeper.done():
            self._sweeper = asyncio.get_running_loop().create_task(self._run_sweeper())

    async def _run_sweeper(self) -> None:
        while self.held:
            await asyncio.sleep(self.idle / IDLE_SWEEPS)
            self._sweep_idle()

    # -- requests --------------------------------------------------------------------

    def write_now(self, data: memoryview, offset: int, fua: bool) -> bool:
        # The hot path of the whole proxy, hence written out: a write inside one chunk
        # held on the current breqd connection goes straight on, with no message, and
        # leaves one bit (``_plain`` and ``_written``: see ``__init__``).
        if self.tracker.session != self._session:     # a lost connection changes it too
            return False
        mirror = self.mirror
        if mirror is not None and mirror.active:
            return False
        cs = self.chunk_size
        first = offset // cs
        if (offset + len(data) - 1) // cs == first and self._plain[first]:
            if not self.inner.write_now(data, offset, fua):
                return False
            self._written[first] = 1
            return True
        chunks = self._span(offset, len(data))
        if not self._holds_all(chunks) or not self.inner.write_now(data, offset, fua):
            return False
        held, now, plain = self.held, self._sweeps, self._plain
        for c in chunks:
            hold = held[c]
            hold.tainted = True
            hold.seen = now
            plain[c] = 1
        return True

    def write_later(self, data: memoryview, offset: int, fua: bool,
                    done: WriteDone) -> bool:
        """While replicating, a write to chunks held on the current breqd connection
        goes on at once, with no mark and no task (the replicated twin of ``write_now``):
        the chunks are busy until the layer below answers, and what that answer leaves
        in the holds is recorded as ``_tracked`` records it, before ``done``."""
        if self.tracker.session != self._session:
            return False
        mirror = self.mirror
        if mirror is None or not mirror.active:
            return False
        length = len(data)
        chunks = self._span(offset, length)
        if not self._holds_all(chunks):
            return False
        generation, session = mirror.generation, self._session
        busy = self._busy
        overlapped = self._overlaps(chunks, False)
        for c in chunks:
            busy[c] += 1
        answered_at_once = False

        def answered(result: Any, error: BaseException | None) -> None:
            nonlocal answered_at_once
            answered_at_once = True
            for c in chunks:
                busy[c] -= 1
                if not busy[c]:
                    del busy[c]
            try:
                self._saw(chunks)
                mirrored = self._mirrored
                assert mirrored is not None
                mirrored.note(chunks, generation,
                              None if error is not None or overlapped else result)
                if session != self.tracker.session:     # written locally: mark again
                    self._mark_again_then(offset, length,
                                          done if error is None else
                                          lambda _, __: done(None, error))
                    return
                if error is None and mirrored.mirror.active:
                    if self._holds_valid():
                        self._let_go(mirrored.tainted(chunks), False)
                    if mirrored.may_settle():
                        self._settle_mirrored()
                outcome: tuple[Any, BaseException | None] = (None, error)
            except Exception as exc:    # a bug: the writer is answered all the same
                log.exception("%s: after a replicated write of %d+%d", self.device, offset,
                              length)
                outcome = (None, exc)
            done(*outcome)

        started = False
        try:
            started = self.inner.write_later(data, offset, fua, answered)
        except BaseException:
            # The local pwrite failed, perhaps after part of it landed: the target has
            # none of it, so the holds are tainted, as the task path taints them.
            if not answered_at_once and self._mirrored is not None:
                self._mirrored.note(chunks, generation, None)
            raise
        finally:
            if not started and not answered_at_once:
                for c in chunks:
                    busy[c] -= 1
                    if not busy[c]:
                        del busy[c]
        if started:
            self._saw(chunks)
        return started

    def _mark_again_then(self, offset: int, length: int, done: WriteDone) -> None:
        """``_mark_again`` for a write that ran without a task, then its answer."""
        def finished(task: asyncio.Task) -> None:
            exc = task.exception() if not task.cancelled() else TrackingFailed(
                f"{self.device}: mark again of {offset}+{length} cancelled")
            done(None, exc)

        asyncio.get_running_loop().create_task(
            self._mark_again(offset, length)).add_done_callback(finished)

    async def write(self, data: memoryview, offset: int, fua: bool) -> None:
        await self._tracked(offset, len(data), lambda: self._next().write(data, offset, fua),
                            unordered=len(data) > MAX_DATA)

    async def trim(self, offset: int, length: int, fua: bool) -> None:
        await self._tracked(offset, length, lambda: self._next().trim(offset, length, fua),
                            unordered=True)

    async def zero(self, offset: int, length: int, fua: bool, may_trim: bool,
                   fast: bool) -> None:
        await self._tracked(offset, length,
                            lambda: self._next().zero(offset, length, fua, may_trim, fast),
                            unordered=True)

    # -- the dirty bitmap as a meta context --------------------------------------------

    @property
    def dirty_context(self) -> str:
        return p.META_DIRTY_BITMAP_PREFIX + self.device

    def contexts(self) -> tuple[str, ...]:
        return (self.dirty_context,) + super().contexts()

    async def context_extents(self, context: str, offset: int,
                              length: int) -> list[tuple[int, int]]:
        if context != self.dirty_context:
            return await super().context_extents(context, offset, length)
        try:
            runs, end = await self.tracker.query(self.device, offset, length)
        except BmigError as exc:
            raise TrackingFailed(f"{self.device}: cannot read the dirty bitmap: "
                                 f"{exc.message}") from None
        extents: list[tuple[int, int]] = []
        pos = offset
        for run_offset, run_length in runs:
            start, stop = max(run_offset, offset), min(run_offset + run_length, end)
            if start > pos:
                extents.append((start - pos, 0))
            if stop > start:
                extents.append((stop - start, DIRTY))
                pos = stop
        if end > pos:
            extents.append((end - pos, 0))
        return extents

    async def close(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
        await super().close()
