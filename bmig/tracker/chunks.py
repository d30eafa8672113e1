"""The chunk state machine of one device, in memory, with no I/O.

Each chunk is in one of four states, kept in two bit arrays:

    dirty  inflight
      0       0      clean
      1       0      dirty: must be shipped
      0       1      in flight: checked out by a sender, not yet durable on the target
      1       1      in flight and re-marked since checkout: commit leaves it dirty

So ``commit`` only has to clear ``inflight``: a chunk written after its checkout keeps its
dirty bit and ships again (invariant 2). What must survive a crash is ``dirty | inflight``
(invariant 3); ``disk_image`` gives exactly that for a page of the bitmap file.

A third array, ``held``, has the chunks a writer holds: it marked them before writing and
has not released them yet, so a write to them may be under way. A checkout of a held chunk
leaves it re-marked (dirty and in flight), so whatever the sender read, the chunk ships
again after the writer lets go. Held chunks are always dirty: ``dirty >= held``. Who holds
what is kept by breqd's sessions; this map only keeps the union.

A fourth, ``mirrored``, has the chunks that are dirty only because synchronous writes to
them are under way: the writer sends each write to the target as well (protocol A/B/C).
They were clean when the hold began, so the target has everything else in them. Senders
leave them alone (checkout skips them), and a release that says every write reached the
target makes them clean again. Anything else that dirties a mirrored chunk (a plain mark,
a hold without ``sync``, a release without ``synced``) makes it plain dirty. On disk a
mirrored chunk is dirty, like any held chunk, until the release is written lazily.

Beside the four arrays, ``log`` (activity.py) keeps the chunks marked most recently:
they stay dirty on disk while a commit may make them clean in memory, so the on-disk
image is dirty | in flight | logged, and a mark of a logged chunk needs no flush.
``mark`` returns the clean chunks the log let go of: their pages may be written lazily.

The room is pure state: it may not do I/O, know of sessions or connections, or decide
when bits reach the disk (tracked.py and committer.py do).
"""

from __future__ import annotations

from bitarray import bitarray

from bmig.chunkmath import chunk_count, chunk_span
from bmig.errors import RangeError
from bmig.tracker.activity import ActivityLog

ENDIAN = "little"


def zeros(n: int) -> bitarray:
    bits = bitarray(n, endian=ENDIAN)
    bits.setall(0)
    return bits


class ChunkMap:
    """Dirty and in-flight bits of one device of ``size`` bytes in ``chunk_size`` chunks."""

    def __init__(self, size: int, chunk_size: int, dirty: bitarray | None = None,
                 log_chunks: int = 0):
        self.size = size
        self.chunk_size = chunk_size
        self.nchunks = chunk_count(size, chunk_size)
        if dirty is None:
            dirty = zeros(self.nchunks)
        if len(dirty) != self.nchunks:
            raise ValueError(f"bitmap has {len(dirty)} bits, device needs {self.nchunks}")
        self.dirty = dirty
        self.inflight = zeros(self.nchunks)
        self.held = zeros(self.nchunks)
        self.mirrored = zeros(self.nchunks)
        self.log = ActivityLog(self.nchunks, log_chunks)
        self._cursor = 0  # where the next checkout starts scanning: passes sweep the device

    # -- byte ranges and chunk spans -------------------------------------------------

    def span(self, offset: int, length: int) -> tuple[int, int]:
        """Chunks [first, end) covering bytes [offset, offset + length), validated."""
        if length <= 0:
            raise RangeError(f"empty range at offset {offset}")
        if offset < 0 or offset + length > self.size:
            raise RangeError(
                f"range {offset}+{length} is outside the device (size {self.size})")
        return chunk_span(offset, length, self.chunk_size)

    def chunk_bytes(self, first: int, end: int) -> tuple[int, int]:
        """The byte range (offset, length) of chunks [first, end), clipped to the device."""
        offset = first * self.chunk_size
        return offset, min(end * self.chunk_size, self.size) - offset

    def bytes_of(self, bits: bitarray) -> int:
        """Bytes covered by the set bits of ``bits`` (the last chunk may be short)."""
        total = bits.count() * self.chunk_size
        if self.nchunks and bits[-1]:
            total -= self.nchunks * self.chunk_size - self.size
        return total

    # -- transitions -----------------------------------------------------------------

    def covered(self, first: int, end: int) -> bool:
        """True when every chunk in [first, end) is in the on-disk image: dirty, in
        flight or in the activity log."""
        logged = self.log.bits
        if end - first == 1:
            return bool(self.dirty[first] or self.inflight[first]
                        or (logged is not None and logged[first]))
        image = self.dirty[first:end] | self.inflight[first:end]
        if logged is not None:
            image |= logged[first:end]
        return image.all()

    def mark(self, first: int, end: int, keep_mirrored: bool = False) -> list[int]:
        """Make [first, end) dirty; chunks in flight become re-marked, mirrored chunks
        plain dirty (unless ``keep_mirrored``: the mark of a synchronous write). The
        chunks enter the activity log; returns those it evicted that are clean, whose
        bits on disk may go now."""
        self.dirty[first:end] = 1
        if not keep_mirrored:
            self.mirrored[first:end] = 0
        evicted = self.log.add(first, end)
        if not evicted:
            return evicted
        dirty, inflight = self.dirty, self.inflight
        return [c for c in evicted if not (dirty[c] or inflight[c])]

    def checkout(self, max_chunks: int, max_runs: int = 1 << 62,
                 settled: bool = False) -> list[tuple[int, int]]:
        """Move up to ``max_chunks`` dirty chunks, not in flight, to in flight.

        Returns at most ``max_runs`` runs (first, end). The scan starts where the previous one stopped and
        wraps once, so successive checkouts sweep the whole device. With ``settled``,
        chunks a writer holds are left alone too: shipped now, they would stay dirty and
        go again once the writer lets go (a catch-up service ships each of them once).
        """
        runs: list[tuple[int, int]] = []
        budget = max_chunks
        # Runs are cut short at, and skipped from, the chunks in flight (re-marked ones
        # too), the mirrored ones (written synchronously: not ours to ship) and, with
        # ``settled``, the held ones: found run by run, never by combining whole arrays.
        skips = [self.inflight]
        if self.mirrored.any():
            skips.append(self.mirrored)
        if settled and self.held.any():
            skips.append(self.held)
        start = self._cursor if self._cursor < self.nchunks else 0
        for lo, hi in ((start, self.nchunks), (0, start)):
            pos = lo
            while budget > 0 and pos < hi and len(runs) < max_runs:
                first = self.dirty.find(1, pos, hi)
                if first < 0:
                    break
                end = self.dirty.find(0, first, hi)
                if end < 0:
                    end = hi
                skipped = False
                for bits in skips:
                    at = bits.find(1, first, end)
                    if at == first:
                        free = bits.find(0, first, end)
                        pos = end if free < 0 else free
                        skipped = True
                        break
                    if at >= 0:
                        end = at
                if skipped:
                    continue
                end = min(end, first + budget)
                self.dirty[first:end] = self.held[first:end]   # held chunks stay re-marked
                self.inflight[first:end] = 1
                runs.append((first, end))
                budget -= end - first
                pos = end
                self._cursor = end
            if budget <= 0 or len(runs) >= max_runs:
                break
        return runs

    def commit(self, first: int, end: int) -> None:
        """In flight to clean; re-marked chunks stay dirty."""
        self.inflight[first:end] = 0

    def abort(self, first: int, end: int) -> None:
        """In flight back to dirty."""
        self.inflight[first:end] = 0
        self.dirty[first:end] = 1

    def clean(self, first: int, end: int) -> bitarray:
        """Which chunks of [first, end) are clean now (neither dirty nor in flight)."""
        return ~(self.dirty[first:end] | self.inflight[first:end])

    def hold(self, first: int, end: int, mirror: bitarray | None = None) -> None:
        """A writer holds [first, end): dirty until released, whatever a sender commits.
        ``mirror``: the writes also go to the target, and these chunks (those that were
        clean before the mark, from ``clean``) become mirrored; None: none does, and the
        range is plain dirty."""
        if mirror is not None:
            self.mirrored[first:end] |= mirror
        else:
            self.mirrored[first:end] = 0
        self.dirty[first:end] = 1
        self.held[first:end] = 1

    def release_mirrored(self, first: int, end: int, synced: bool) -> bool:
        """After the holds over [first, end) were recomputed: mirrored chunks no longer
        held become clean when every write reached the target (``synced``), plain dirty
        otherwise. True when some chunk became clean."""
        done = self.mirrored[first:end] & ~self.held[first:end]
        if not done.any():
            return False
        self.mirrored[first:end] &= self.held[first:end]
        if synced:
            self.dirty[first:end] &= ~done
        return synced

    def set_held(self, first: int, end: int, held: bool) -> None:
        """Set the union of holds over [first, end) (breqd recomputes it on release)."""
        self.held[first:end] = held
        if held:
            self.dirty[first:end] = 1

    def set_all_dirty(self) -> None:
        self.dirty.setall(1)
        self.mirrored.setall(0)

    def clear_all(self) -> None:
        """Forget every dirty chunk not held by a writer (chunks in flight stay in flight),
        and empty the activity log."""
        self.dirty.setall(0)
        self.dirty |= self.held
        self.log.clear()

    # -- persistence -----------------------------------------------------------------

    def disk_image(self, first: int, end: int) -> bitarray:
        """What must be on disk for chunks [first, end): dirty or in flight, and the
        chunks of the activity log."""
        image = self.dirty[first:end] | self.inflight[first:end]
        if self.log.bits is not None:
            image |= self.log.bits[first:end]
        return image

    def dirty_bytes(self) -> int:
        return self.bytes_of(self.dirty)

    def inflight_bytes(self) -> int:
        return self.bytes_of(self.inflight)

    def held_bytes(self) -> int:
        return self.bytes_of(self.held)

    def mirrored_bytes(self) -> int:
        return self.bytes_of(self.mirrored)

    def differing_runs(self, first: int, end: int, max_runs: int) -> tuple[list[tuple[int, int]], int]:
        """Runs of chunks in [first, end) that may differ from the target (dirty or in
        flight), at most ``max_runs``, and the chunk up to which the answer is complete."""
        image = self.dirty[first:end] | self.inflight[first:end]
        runs: list[tuple[int, int]] = []
        pos = 0
        n = end - first
        while pos < n:
            start = image.find(1, pos)
            if start < 0:
                return runs, end
            if len(runs) == max_runs:
                return runs, first + start
            stop = image.find(0, start)
            stop = n if stop < 0 else stop
            runs.append((first + start, first + stop))
            pos = stop
        return runs, end
