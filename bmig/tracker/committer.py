"""Group commit: many marks, one fdatasync.

A page of the bitmap file is *unsynced* while it may lack a bit that is set in memory.
A mark whose chunks are already dirty or in flight, on pages that are all synced, costs
no I/O. Otherwise the mark sets its bits, queues its pages and waits for the next flush;
every mark that arrives while a flush runs joins the one after it. Pages whose only
changes are clears (commits) are written lazily, with the next flush or by ``flush_lazy``.

The room decides when pages are written and who waits for them; it may not change chunk
state (it only reads page images through the callable it is given) or the file format
(store.py writes the pages).
"""

from __future__ import annotations

import asyncio
import logging
from concurrent.futures import Executor
from typing import Callable

from bmig.errors import StateWriteError
from bmig.limits import PAGES_PER_WRITE
from bmig.tracker.store import BITS_PER_PAGE, BitmapFile

log = logging.getLogger("breqd")


def pages_of(first: int, end: int) -> range:
    """Bitmap pages that keep chunks [first, end)."""
    return range(first // BITS_PER_PAGE, (end - 1) // BITS_PER_PAGE + 1)


class GroupCommitter:
    def __init__(self, name: str, bitmap: BitmapFile, image: Callable[[int], bytes],
                 executor: Executor):
        self._name = name
        self._bitmap = bitmap
        self._image = image          # page index -> bytes that page must hold now
        self._executor = executor
        self.unsynced: set[int] = set()
        self._queued: set[int] = set()
        self._lazy: set[int] = set()
        self._next: asyncio.Future | None = None
        self._task: asyncio.Task | None = None
        self.flushes = 0
        self.failed = 0

    def is_synced(self, first: int, end: int) -> bool:
        if not self.unsynced:
            return True
        return not any(p in self.unsynced for p in pages_of(first, end))

    def require(self, pages) -> asyncio.Future:
        """Queue ``pages`` for the next flush; the future resolves when it is durable."""
        self.unsynced.update(pages)
        self._queued.update(pages)
        return self._schedule()

    def lazy(self, pages) -> None:
        """Pages that only lost bits: written with the next flush, whenever that is."""
        self._lazy.update(pages)

    def flush_lazy(self) -> asyncio.Future | None:
        if not self._lazy and not self._queued:
            return None
        return self._schedule()

    def _schedule(self) -> asyncio.Future:
        loop = asyncio.get_running_loop()
        if self._next is None:
            self._next = loop.create_future()
        future = self._next
        if self._task is None:
            self._task = loop.create_task(self._run())
        return future

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while self._next is not None:
                batch = self._queued | self._lazy
                self._queued, self._lazy = set(), set()
                waiters, self._next = self._next, None
                try:
                    await self._write(loop, sorted(batch))
                except StateWriteError as exc:
                    self.failed += 1
                    log.error("%s: %s; marks fail until it can be written", self._name,
                              exc.message)
                    self._lazy |= batch - self.unsynced
                    _settle(waiters, exc)
                    continue
                self.flushes += 1
                # Pages queued again since the snapshot stay unsynced for the next flush.
                self.unsynced -= batch - self._queued
                _settle(waiters, None)
        finally:
            self._task = None

    async def _write(self, loop: asyncio.AbstractEventLoop, pages: list[int]) -> None:
        """Write ``pages`` in slices, then one fdatasync.

        Each slice's images are taken on the loop thread, so a mark that changes a page
        after its image was taken has queued that page again for the next flush. Slices
        bound the memory of a flush of a large bitmap to PAGES_PER_WRITE page images.
        """
        if not pages:
            return
        for start in range(0, len(pages), PAGES_PER_WRITE):
            payloads = {index: self._image(index)
                        for index in pages[start:start + PAGES_PER_WRITE]}
            await loop.run_in_executor(self._executor, self._bitmap.stage_pages, payloads)
        await loop.run_in_executor(self._executor, self._bitmap.sync_staged)

    async def drain(self) -> None:
        """Write everything still queued or lazy (at shutdown and on removal)."""
        future = self.flush_lazy()
        if future is not None:
            await future
        while self._task is not None:
            await asyncio.shield(self._task)


def _settle(future: asyncio.Future, exc: BaseException | None) -> None:
    if future.done():
        return
    if exc is None:
        future.set_result(None)
    else:
        future.set_exception(exc)
        # A lazy flush has no waiter: retrieve the exception so asyncio stays quiet.
        future.add_done_callback(lambda f: f.exception())
