"""How fast a pass sends and how much of it is compressed.

``RateLimit`` is the bandwidth limit (``--bwlimit``, changed by SIGHUP at any time);
``CompressionPacer`` compresses only as much as pays in time. Both are told what
happens (bytes sent, how full the sender's queue is) and answer; neither sends,
reads or sleeps on anything but the stop event it is given.
"""

from __future__ import annotations

import threading
import time


RATE_RECHECK = 1.0      # seconds: a new rate (SIGHUP) applies this soon, even mid-frame


class RateLimit:
    """A token bucket over bytes on the wire; ``rate`` may change at any time (SIGHUP)."""

    def __init__(self, rate: int | None = None):
        self.rate = rate
        self._allowance = 0.0
        self._last = time.monotonic()

    def consume(self, nbytes: int, stop: threading.Event) -> None:
        """Take ``nbytes``, waiting until the bucket has them. The bucket holds a
        second's worth, or one frame if that is more, so a frame larger than a second's
        worth waits as long as it takes to send it at the rate."""
        while self.rate and not stop.is_set():
            now = time.monotonic()
            cap = float(max(self.rate, nbytes))
            self._allowance = min(self._allowance + (now - self._last) * self.rate, cap)
            self._last = now
            if self._allowance >= nbytes:
                self._allowance -= nbytes
                return
            # In pieces: a frame waiting at a low rate takes a raised one (or none) soon.
            stop.wait(min(RATE_RECHECK, (nbytes - self._allowance) / self.rate))
        self._last = time.monotonic()


class CompressionPacer:
    """Compress only as much as pays in time: when the sender waits for the encoder
    (its queue runs empty), compression is the bottleneck and fewer frames are
    compressed; when the encoder waits for the sender (the queue is full), the link is,
    and more are. On a fast link most data goes raw; on a slow one, all is compressed."""

    STEP = 0.1
    FLOOR = 0.05           # keep trying a little: the data or the link may change

    def __init__(self, depth: int):
        self.depth = depth     # the queue's length: full at this many frames
        self.share = 1.0
        self._credit = 0.0

    def observe(self, queued: int) -> None:
        if queued == 0:
            self.share = max(self.FLOOR, self.share - self.STEP)
        elif queued >= self.depth:
            self.share = min(1.0, self.share + self.STEP)

    def compress(self) -> bool:
        """Whether the next frame is compressed: ``share`` of them, evenly spread."""
        self._credit += self.share
        if self._credit >= 1.0:
            self._credit -= 1.0
            return True
        return False
