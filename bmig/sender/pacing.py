"""How fast a pass sends and how much of it is compressed.

``RateLimit`` is the bandwidth limit (``--bwlimit``, changed by SIGHUP at any time);
``CompressionPacer`` compresses the share of frames that gets the data there soonest,
told what each frame cost the encoder and the sender and, by ``CpuWaits``, whether the
CPUs are all taken. They are told what happens and answer; none sends, or sleeps on
anything but the stop event it is given.
"""

from __future__ import annotations

import threading
import time
from typing import Callable


# --compress: auto, as much as pays in time (CompressionPacer); always, every frame that
# shrinks (a link whose bytes cost more than the time).
COMPRESS_CHOICES = ("auto", "always")
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
    """Compress the share of frames that gets the data there soonest.

    The encoder and the sender work side by side, so a pass goes at the pace of the
    slower one. Per raw byte, the encoder spends ``base`` (reading, hashing) and
    ``zstd`` more on a frame it compresses; the sender spends ``send`` per byte on the
    wire, and a compressed frame puts ``ratio`` of its bytes there. Compressing a share
    p of the frames costs the encoder base + p * zstd and the sender
    send * (1 - p * (1 - ratio)): the first grows with p, the second shrinks, and the
    pass is fastest where they meet (all frames when the sender is still the slower one
    then, none when the encoder is already the slower one without compressing). The four
    figures are measured on every frame, each new frame weighing WEIGHT, so the share
    follows the link, the data and the load.

    That model holds while the two sides do not share a CPU. While the encoder or the
    sender waits for a CPU (``cpu_wait``: the share of the wall-clock time it spent
    runnable and waiting, from ``CpuWaits``), the sender and the receiver are slow for
    want of the CPU compression would take: zstd costs several times the CPU it saves in
    sending, sealing and receiving, so none is compressed, which also leaves the CPU to
    the applications (``--compress always`` is for a link whose bytes matter more).
    Otherwise FLOOR keeps a few frames compressed, so ``zstd`` and ``ratio`` stay
    measured.

    What the sender's time cannot tell: a receiver held back by its disk looks like a
    slow link, and then frames are compressed that get there no sooner."""

    FLOOR = 0.02
    WEIGHT = 0.25          # of each new frame in the running figures
    CONTENDED = 0.1        # cpu_wait above which the CPUs count as all taken

    def __init__(self) -> None:
        # FLOOR until there are figures, but the first data frame is compressed to
        # measure. One pacer serves a migration's passes, so what it learnt lasts.
        self.share = self.FLOOR
        self._credit = 1.0
        self._encoder_waits = self._sender_waits = 0.0
        self._short = False                 # a CPU short: nothing compressed
        self._first_sent = False
        self.base: float | None = None      # encoder seconds per raw byte, not compressing
        self.zstd: float | None = None      # more seconds per raw byte, compressing
        self.ratio: float | None = None     # wire bytes per raw byte of a compressed frame
        self.send: float | None = None      # sender seconds per wire byte

    def _mix(self, old: float | None, new: float) -> float:
        return new if old is None else old + self.WEIGHT * (new - old)

    def encoded(self, raw: int, seconds: float, zstd_seconds: float | None, wire: int,
                cpu_wait: float = 0.0) -> None:
        """A data frame of ``raw`` bytes took the encoder ``seconds``, of which
        ``zstd_seconds`` compressing (None: not tried), and is ``wire`` bytes to send.
        The encoder's thread."""
        if raw <= 0:
            return
        self.base = self._mix(self.base, max(0.0, seconds - (zstd_seconds or 0.0)) / raw)
        if zstd_seconds is not None:
            self.zstd = self._mix(self.zstd, zstd_seconds / raw)
            self.ratio = self._mix(self.ratio, min(1.0, wire / raw))
        self._encoder_waits = cpu_wait
        waits = max(self._encoder_waits, self._sender_waits)
        # Short from above CONTENDED until below half of it: a share that flips with
        # every reading near the line would help no one.
        self._short = waits > self.CONTENDED or (self._short and waits > self.CONTENDED / 2)
        if self._short:
            self.share = 0.0
        elif None not in (self.zstd, self.ratio, self.send):
            self.share = max(self.FLOOR, min(1.0, self.best()))

    def sent(self, wire: int, seconds: float, cpu_wait: float = 0.0) -> None:
        """``wire`` bytes of a data frame took the sender ``seconds`` (the bandwidth
        limit's wait and a full socket included); the sender's ``cpu_wait``. The
        sender's thread. A pass's first frame also waits for the receiver to start, so
        it is not taken as the link's pace."""
        self._sender_waits = cpu_wait
        if wire > 0 and not self._first_sent:
            self._first_sent = True
        elif wire > 0:
            self.send = self._mix(self.send, seconds / wire)

    def begin_pass(self) -> None:
        self._first_sent = False
        self._sender_waits = 0.0            # the last pass's sender is gone

    def best(self) -> float:
        """The share at which the encoder and the sender take as long (0 to 1)."""
        assert self.base is not None and self.zstd is not None and \
            self.ratio is not None and self.send is not None
        slower_raw = self.base - self.send                 # encoder over sender at p = 0
        slower_all = self.base + self.zstd - self.send * self.ratio      # at p = 1
        if slower_all <= 0:
            return 1.0
        if slower_raw >= 0:
            return 0.0
        return -slower_raw / (slower_all - slower_raw)

    def compress(self) -> bool:
        """Whether the next frame is compressed: ``share`` of them, evenly spread."""
        self._credit += self.share
        if self._credit >= 1.0:
            self._credit -= 1.0
            return True
        return False


SCHEDSTAT = "/proc/thread-self/schedstat"


class CpuWaits:
    """How much of the time a thread spent waiting for a CPU while it could have run:
    Linux's schedstat of the thread (nanoseconds runnable on a run queue), over the
    wall-clock time since the last readings, each older reading weighing half as much
    as the one after it, so one busy moment does not decide. Of the wall-clock time,
    not of the time the thread wanted a CPU: a thread that mostly sleeps waits a little
    at each wake-up, and that says nothing of a CPU being short. Made and asked by the
    thread it measures; 0.0 where the kernel does not keep the figures."""

    def __init__(self, interval: float = 0.05, path: str = SCHEDSTAT,
                 clock: Callable[[], float] = time.monotonic):
        self._interval = interval
        self._path = path
        self._clock = clock
        self._at = clock()
        self._last = self._read()
        self._elapsed = self._waited = 0.0   # seconds, older readings halved
        self.share = 0.0

    def _read(self) -> int | None:
        try:
            with open(self._path, "rb") as f:
                return int(f.read(128).split()[1])
        except (OSError, ValueError, IndexError):
            return None

    def update(self) -> float:
        """The share, read again once ``interval`` has passed since the last reading."""
        now = self._clock()
        if now - self._at < self._interval or now <= self._at:
            return self.share
        waited = self._read()
        if waited is None:                   # this time: the next reading spans it
            return self.share
        if self._last is not None:
            self._elapsed = self._elapsed / 2 + (now - self._at)
            self._waited = self._waited / 2 + max(0, waited - self._last) / 1e9
            self.share = min(1.0, self._waited / self._elapsed)
        self._at, self._last = now, waited
        return self.share
