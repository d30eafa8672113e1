"""One tracked device: its definition, chunk state, bitmap file, group committer and
lineage record, opened together and closed together; ``mark_spans`` (the mark before
write: bits set, then the pages that need it queued for the next flush) and ``stats``.

The room may not know of connections, sessions or the config directory, and leaves the
bitmap format to store.py and the timing of writes to committer.py.
"""

from __future__ import annotations

import logging
import os
from concurrent.futures import Executor
from typing import Sequence

from bmig.errors import RequestError
from bmig.limits import DEFAULT_ACTIVITY_LOG, MAX_ACTIVITY_LOG
from bmig.lineage import hex_id, load_source
from bmig.tracker.chunks import ChunkMap
from bmig.tracker.committer import GroupCommitter, pages_of
from bmig.tracker.definitions import DeviceDefinition
from bmig.tracker.intervals import merge_spans
from bmig.tracker.store import (BITS_PER_PAGE, NO_SAVED_BITMAP, BitmapFile, Identity,
                                page_count, page_span)

log = logging.getLogger("breqd")

BITMAP_SUFFIX = ".bitmap"


def bitmap_path(state_dir: str, name: str) -> str:
    return os.path.join(state_dir, name + BITMAP_SUFFIX)


class TrackedDevice:
    """``log_chunks``: the size of the device's activity log (bmig.tracker.activity)."""

    def __init__(self, definition: DeviceDefinition, state_dir: str, executor: Executor,
                 log_chunks: int = DEFAULT_ACTIVITY_LOG):
        self.definition = definition
        ident = Identity(definition.device_id, definition.size, definition.chunk_size)
        self.bitmap, bits, self.recovered = BitmapFile.open(
            bitmap_path(state_dir, definition.name), ident)
        if self.recovered == NO_SAVED_BITMAP:
            log.info("%s: new bitmap %s, every chunk dirty", definition.name, self.bitmap.path)
        elif self.recovered:
            log.warning("%s: saved bitmap not trusted (%s): every chunk is dirty now and "
                        "the next sync ships the whole device", definition.name,
                        self.recovered)
        elif not self.bitmap.was_clean:
            log.info("%s: recovered after an unclean stop; every acknowledged mark is kept",
                     definition.name)
        self.lineage, why = load_source(state_dir, definition.name, definition.device_id)
        if why and self.recovered != NO_SAVED_BITMAP:
            log.warning("%s: %s; a new generation %s starts, and targets synced before "
                        "will refuse it until told to discard their data", definition.name,
                        why, hex_id(self.lineage.generation))
        self.chunks = ChunkMap(definition.size, definition.chunk_size, bits,
                               min(log_chunks, MAX_ACTIVITY_LOG))
        self.committer = GroupCommitter(definition.name, self.bitmap, self._page_image,
                                        executor)
        self.marks = 0

    @property
    def name(self) -> str:
        return self.definition.name

    def _page_image(self, index: int) -> bytes:
        first, end = page_span(index, self.chunks.nchunks)
        return self.chunks.disk_image(first, end).tobytes()

    def spans(self, ranges: Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
        """The chunk spans of a request's byte ranges, each checked (ChunkMap.span)."""
        if not ranges:
            raise RequestError("no ranges given")
        return [self.chunks.span(offset, length) for offset, length in ranges]

    def all_pages(self) -> range:
        return range(page_count(self.chunks.nchunks))

    def mark_spans(self, spans: list[tuple[int, int]], keep_mirrored: bool = False):
        """Set the spans dirty; return a future to await durability, or None if durable.
        ``keep_mirrored``: a synchronous write's mark, which leaves mirrored chunks so."""
        need: set[int] = set()
        committer = self.committer
        for first, end in merge_spans(spans):
            if not (self.chunks.covered(first, end) and committer.is_synced(first, end)):
                need.update(pages_of(first, end))
            evicted = self.chunks.mark(first, end, keep_mirrored)
            if evicted:     # out of the activity log: their bits may go with a lazy write
                committer.lazy({c // BITS_PER_PAGE for c in evicted})
        self.marks += len(spans)
        return committer.require(need) if need else None

    def stats(self) -> dict:
        d = self.definition
        return {
            "name": d.name,
            "size": d.size,
            "chunk_size": d.chunk_size,
            "dirty_bytes": self.chunks.dirty_bytes(),
            "inflight_bytes": self.chunks.inflight_bytes(),
            "held_bytes": self.chunks.held_bytes(),
            "mirrored_bytes": self.chunks.mirrored_bytes(),
            "device_id": f"{d.device_id:016x}",
            "generation": hex_id(self.lineage.generation),
            "previous": list(self.lineage.previous),
            "role": self.lineage.role,
            "successor": hex_id(self.lineage.successor),
            "ha": self.lineage.ha,
            "state_file": self.bitmap.path,
            "recovered": self.recovered,
            "marks": self.marks,
            "flushes": self.committer.flushes,
            "failed_flushes": self.committer.failed,
        }

    async def close(self) -> None:
        """Write what is pending and record a clean shutdown. No writer can mark any
        more, so the activity log goes first: on disk stays exactly dirty ∪ in flight."""
        clean = True
        self.committer.lazy({c // BITS_PER_PAGE for c in self.chunks.log.clear()})
        try:
            await self.committer.drain()
        except Exception as exc:  # the state stays unclean; the bits already durable hold
            log.error("%s: final bitmap write failed: %s", self.name, exc)
            clean = False
        try:
            self.bitmap.close(clean=clean)
        except Exception as exc:
            log.error("%s: %s", self.name, exc)

