"""The tracking layer: every write-like command is marked in breqd around the write.

Order for WRITE, TRIM and WRITE_ZEROES (invariants 1, 2 and 4): mark the byte range
durable in breqd, then pass the request on, then mark it again as completed. If the first
mark fails for any reason the request fails and the source is never touched.
"""

from __future__ import annotations

import logging
from typing import Awaitable, Callable, Protocol

from bmig.errors import BmigError
from bmig.nbd.layers.base import Layer

log = logging.getLogger("bmig-nbd")


class Tracker(Protocol):
    async def mark(self, device: str, ranges: list[tuple[int, int]]) -> None: ...
    async def mark_completed(self, device: str, ranges: list[tuple[int, int]]) -> None: ...


class TrackingFailed(Exception):
    """breqd could not record the range: the request must fail with NBD_EIO."""


class TrackLayer(Layer):
    def __init__(self, inner: Layer, tracker: Tracker, device: str):
        super().__init__(inner)
        self.tracker = tracker
        self.device = device

    async def _tracked(self, offset: int, length: int,
                       action: Callable[[], Awaitable[None]]) -> None:
        ranges = [(offset, length)]
        try:
            await self.tracker.mark(self.device, ranges)
        except BmigError as exc:
            raise TrackingFailed(f"{self.device}: cannot mark {offset}+{length} dirty: "
                                 f"{exc.message}") from None
        await action()
        # A sender may have checked the range out while the write ran: without the second
        # mark it could commit the old data. One retry covers a reconnect to breqd.
        for attempt in (1, 2):
            try:
                await self.tracker.mark_completed(self.device, ranges)
                return
            except BmigError as exc:
                log.warning("%s: second mark of %d+%d failed (attempt %d): %s",
                            self.device, offset, length, attempt, exc.message)
        raise TrackingFailed(f"{self.device}: cannot mark {offset}+{length} again after "
                             "the write")

    async def write(self, data: memoryview, offset: int, fua: bool) -> None:
        await self._tracked(offset, len(data), lambda: self._next().write(data, offset, fua))

    async def trim(self, offset: int, length: int, fua: bool) -> None:
        await self._tracked(offset, length, lambda: self._next().trim(offset, length, fua))

    async def zero(self, offset: int, length: int, fua: bool, may_trim: bool,
                   fast: bool) -> None:
        await self._tracked(offset, length,
                            lambda: self._next().zero(offset, length, fua, may_trim, fast))
