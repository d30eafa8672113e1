"""One pass: check out dirty chunks, read, encode, send, commit on "durable".

    planner (caller's thread)  checkout from breqd in bounded windows; runs → jobs
    encoder thread             read the source (holes and zero chunks become ZERO ranges),
                               compress when it pays, checksum → frames
    sender thread              sequence numbers, the bandwidth limit, send; a FLUSH every
                               quarter window and at the end
    acknowledgements           DURABLE(seq): a run whose frames are all durable is committed
                               in breqd (invariant 3); a failed frame aborts its run

Reading, compressing and sending overlap; the queues between the threads are short, so
memory is bounded by the frame size times the queue depths, whatever the device size.
What is checked out and not yet committed is at most ``window`` bytes: that is also the
most a resumed sync sends again after an interruption.

A pass ships and commits; what a frame holds is bmig.sender.encoder's. It never opens
a connection or changes the lineage (bmig.sender.converge does).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

from bmig.chunkmath import round_up
from bmig.constants import MiB
from bmig.errors import BmigError, SenderClaimed, UnreachableError
from bmig.limits import MAX_DATA, MAX_RANGES_PER_FRAME
from bmig.sender.buffers import BufferPool
from bmig.sender.encoder import HOLE_WEIGHT, Encoder, Frame, Run
from bmig.sender.lockedtracker import LockedTracker
from bmig.sender.pacing import CompressionPacer, CpuWaits, RateLimit
from bmig.sender.source import Source
from bmig.wire import codec
from bmig.wire.client import SourceInfo

log = logging.getLogger("bmigrate")

QUEUE_DEPTH = 4          # frames between encoder and sender
CHECKOUT_STEP = 256 * MiB
ACK_TIMEOUT = 300.0      # seconds without a DURABLE before the target is given up on
STOP_GRACE = 10.0        # ... once stopping: what is in flight gets this long


@dataclass
class PassSettings:
    window: int = 256 * MiB          # checked out and not yet committed
    frame_size: int = MAX_DATA       # raw bytes per DATA frame
    level: int | None = codec.DEFAULT_LEVEL   # zstd level; None: never compress
    compress_all: bool = False       # every frame, not as much as pays in time
    direct: bool = False             # O_DIRECT reads of the source
    checksum: bool = False           # compare per-chunk hashes and send what differs
    skip_holes: bool = True          # SEEK_DATA/SEEK_HOLE on the source
    settled: bool = False            # leave chunks a writer holds (the catch-up service)


@dataclass
class PassResult:
    number: int
    bytes_checked_out: int = 0
    bytes_read: int = 0
    bytes_sent: int = 0              # payload bytes on the wire
    bytes_raw_sent: int = 0          # what those payloads decode to
    bytes_zero: int = 0              # shipped as zero ranges
    bytes_same: int = 0              # found equal by --checksum
    bytes_committed: int = 0
    bytes_done: int = 0              # of the pass's budget: sent, zeroed or found equal
    frames: int = 0
    failed_frames: int = 0
    seconds: float = 0.0
    error: BmigError | None = None
    target: dict = field(default_factory=dict)

    def rate(self) -> float:
        """Bytes of the device brought up to date per second."""
        return self.bytes_committed / self.seconds if self.seconds > 0 else 0.0

    def data_rate(self) -> float:
        """Data bytes (not holes or zeros, which cost nearly nothing) per second: what
        the time to ship what is left is estimated with."""
        data = self.bytes_committed - self.bytes_zero - self.bytes_same
        return data / self.seconds if self.seconds > 0 and data > 0 else 0.0


class Pass:
    """Ships what is dirty in breqd when the pass starts (and what is checked out on the
    way, up to that amount: a pass ends even under endless writes)."""

    def __init__(self, number: int, tracker: LockedTracker, source: Source, target,
                 info: SourceInfo, settings: PassSettings, limit: RateLimit,
                 progress: Callable[[PassResult], None] | None = None,
                 stop: threading.Event | None = None,
                 pacer: CompressionPacer | None = None):
        self.result = PassResult(number)
        self._tracker = tracker
        self._source = source
        self._target = target
        self._info = info
        self._s = settings
        self._limit = limit
        self._progress = progress
        self._stop = stop or threading.Event()
        self._jobs: queue.Queue = queue.Queue(maxsize=QUEUE_DEPTH)
        self._frames: queue.Queue = queue.Queue(maxsize=QUEUE_DEPTH)
        self._lock = threading.Condition()
        self._pending: dict[int, Frame] = {}        # sent, not yet durable
        self._inflight = 0                          # bytes checked out, not committed
        self._open: set[Run] = set()                # pieces not yet committed or aborted
        self._fatal: BmigError | None = None
        self._claimed: SenderClaimed | None = None   # a cutover wants the device: stop
        self._failure: BmigError | None = None       # the first frame the target refused
        self._incomplete = False                     # frames dropped: not all was sent
        self._cut_short = False                      # planning stopped before the end
        self._pacer = pacer or CompressionPacer()
        self._encoder = Encoder(source, target, info.chunk_size, settings,
                                BufferPool(settings.frame_size, 2 * QUEUE_DEPTH + 3),
                                self._pacer, self.result)
        self._flushed = 0                           # seq of the last FLUSH sent
        self._planner_waiting = False               # for room in the window
        self._last_ack = time.monotonic()
        target.set_acks(self)

    # -- the pass ----------------------------------------------------------------------

    def run(self, budget: int) -> PassResult:
        """Ship up to ``budget`` bytes of dirty chunks (all that is dirty, usually)."""
        started = time.monotonic()
        self._target.begin_pass()
        self._pacer.begin_pass()
        encoder = threading.Thread(target=self._guard(self._encode), name="encoder",
                                   daemon=True)
        sender = threading.Thread(target=self._guard(self._send), name="sender", daemon=True)
        encoder.start()
        sender.start()
        try:
            self._plan(budget)
        except BmigError as exc:
            self._set_fatal(exc)
        finally:
            self._jobs.put(None)
        encoder.join()
        sender.join()
        self._wait_settled()
        self.result.seconds = time.monotonic() - started
        # A stop that comes once everything planned is durable does not make the pass
        # incomplete: only one that cut the planning short or dropped frames does.
        complete = (self._fatal is None and not self.result.failed_frames
                    and not self._incomplete and not self._cut_short)
        if self._fatal is None:
            try:
                self.result.target = self._target.end_pass(complete,
                                                           complete and self._consistent())
            except BmigError as exc:
                self._fatal = exc
        self._abort_unsettled()
        self.result.error = self._fatal or self._failure or self._claimed
        return self.result

    def _consistent(self) -> bool:
        """After a complete pass: is nothing dirty, held or in flight but what bmig-nbd
        replicates (mirrored)? Then the target is a copy of one moment of the source, or
        follows it write by write, and the receiver may say so (its record's state)."""
        stats = self._tracker.stats(self._info.name)
        return (int(stats["dirty_bytes"]) <= int(stats.get("mirrored_bytes", 0))
                and not int(stats["inflight_bytes"]))

    def _guard(self, body: Callable[[], None]) -> Callable[[], None]:
        def run() -> None:
            try:
                body()
            except BmigError as exc:
                self._set_fatal(exc)
            except Exception as exc:     # a bug: stop the pass, say what happened
                log.exception("%s failed", threading.current_thread().name)
                self._set_fatal(BmigError(f"internal error: {exc}"))
        return run

    def _plan(self, budget: int) -> None:
        device = self._info.name
        planned = 0
        while planned < budget:
            if self._stopped():
                self._cut_short = True
                return
            with self._lock:
                waiting = time.monotonic()
                while self._inflight >= self._s.window and not self._stopped():
                    self._planner_waiting = True
                    self._give_up_if_silent(waiting)
                    self._lock.wait(0.5)
                self._planner_waiting = False
                room = self._s.window - self._inflight
            if self._stopped():
                self._cut_short = True
                return
            try:
                runs = self._tracker.checkout(device,
                                              min(room, CHECKOUT_STEP, budget - planned),
                                              self._s.settled)
            except SenderClaimed as exc:
                # A cutover claims the device: stop as on SIGTERM (what is in flight gets
                # its answer and is committed, what is not goes back to dirty), then
                # let the caller give the device up.
                self._claimed = exc
                self._cut_short = True
                return
            if not runs:
                return
            for offset, length in runs:
                self.result.bytes_checked_out += length
                planned += length
                for run in self._pieces(offset, length):
                    with self._lock:
                        self._inflight += run.weight
                        self._open.add(run)
                    self._jobs.put((run, run.offset, run.length, True))

    def _pieces(self, offset: int, length: int) -> list[Run]:
        """Cut a checked-out range into pieces of whole chunks: the chunks that are
        wholly holes in the source become one hole piece each stretch, the rest pieces
        of a frame's worth. A chunk is only ever committed whole, by one piece."""
        cs = self._info.chunk_size
        step = max(self._s.frame_size, cs)
        end = offset + length
        holes: list[tuple[int, int]] = []
        if self._s.skip_holes and not self._s.checksum:
            pos = offset
            for n, is_hole in self._source.holes(offset, length):
                if is_hole:
                    a = round_up(pos, cs)
                    b = (pos + n) // cs * cs if pos + n < end else pos + n
                    if b > a:
                        holes.append((a, b))
                pos += n
        pieces: list[Run] = []
        pos = offset
        for a, b in holes + [(end, end)]:
            for start in range(pos, a, step):
                pieces.append(Run(start, min(step, a - start)))
            if b > a:
                pieces.append(Run(a, b - a, hole=True))
            pos = b
        return pieces

    def _stopped(self) -> bool:
        return self._stop.is_set() or self._fatal is not None or self._claimed is not None

    # -- encoder -----------------------------------------------------------------------

    def _encode(self) -> None:
        """Jobs to frames. After a failure it keeps taking jobs (and drops them), so the
        planner never waits on a full queue."""
        cpu = CpuWaits()                     # this thread's, so made here
        try:
            while True:
                job = self._jobs.get()
                if job is None:
                    return
                run, offset, length, last = job
                if self._stopped():          # never sent: back to dirty, at once
                    self._incomplete = True
                    with self._lock:
                        run.failed = run.planned = True
                        ready = self._ready(run)
                    if ready:
                        self._settle(run)
                    continue
                try:
                    began = time.monotonic()
                    for frame in self._encoder.frames(run, offset, length):
                        with self._lock:
                            run.frames += 1
                        if frame.kind == "data":     # the others cost next to nothing
                            self._pacer.encoded(frame.length, time.monotonic() - began,
                                                frame.zstd_seconds, len(frame.payload),
                                                cpu.update())
                        self._frames.put(frame)
                        began = time.monotonic()      # waiting for room is not work
                except BmigError as exc:
                    self._set_fatal(exc)
                    continue
                except Exception as exc:    # a bug: stop the pass, keep draining the jobs
                    log.exception("encoder failed")
                    self._set_fatal(BmigError(f"internal error in the encoder: {exc}"))
                    continue
                if last:
                    with self._lock:
                        run.planned = True
                        ready = self._ready(run)
                    if ready:             # every frame was durable already
                        self._settle(run)
        finally:
            self._frames.put(None)

    # -- sender ------------------------------------------------------------------------

    def _send(self) -> None:
        cpu = CpuWaits()                          # this thread's, so made here
        flush_every = max(self._s.window // 4, self._s.frame_size)
        since_flush = 0           # device bytes sent since the last FLUSH
        seq = 0
        while True:
            frame = self._take(seq)
            if frame is None:
                break
            if self._stopped():
                self._drop(frame)
                continue
            seq += 1
            frame.seq = seq
            with self._lock:
                self._pending[seq] = frame
            try:
                self._send_frame(frame, cpu)
                since_flush += frame.length if frame.kind == "data" else \
                    min(frame.length, HOLE_WEIGHT)
                if since_flush >= flush_every:
                    self._flush(seq)
                    since_flush = 0
            except BmigError as exc:    # the target is gone: drain, so nobody waits on us
                self._set_fatal(exc)
            finally:
                self._encoder.free(frame)
            self.result.frames += 1
            if self._progress is not None:
                self._progress(self.result)
        if seq > self._flushed and self._fatal is None:
            self._flush(seq)                       # what was sent gets its answer

    def _take(self, seq: int) -> Frame | None:
        """The next frame. While none comes and the planner waits for room in the
        window, ask for what was sent to be made durable: the commits that make the room
        must not wait on frames that cannot come before it."""
        while True:
            try:
                return self._frames.get(timeout=0.05)
            except queue.Empty:
                if seq > self._flushed and self._planner_waiting and self._fatal is None:
                    self._flush(seq)

    def _flush(self, seq: int) -> None:
        try:
            self._target.request_durable(seq)
        except BmigError as exc:
            self._set_fatal(exc)
        self._flushed = seq

    def _send_frame(self, frame: Frame, cpu: CpuWaits) -> None:
        """Put one frame on the wire; the pacer hears what a data frame took."""
        if frame.kind == "data":
            wire = len(frame.payload)
            began = time.monotonic()
            self._limit.consume(wire, self._stop)
            self._target.send_data(frame.seq, frame.offset, frame.codec, frame.payload,
                                   frame.length, frame.digest)
            self._pacer.sent(wire, time.monotonic() - began, cpu.update())
            self.result.bytes_sent += wire
            self.result.bytes_raw_sent += frame.length
        elif frame.kind == "zero":
            self._target.send_zero(frame.seq, frame.offset, frame.length)
            self.result.bytes_zero += frame.length
        self.result.bytes_done += frame.length

    def _drop(self, frame: Frame) -> None:
        """A frame not sent (stopping): its run goes back to dirty."""
        self._encoder.free(frame)
        self._incomplete = True
        with self._lock:
            frame.run.failed = True
            frame.run.frames -= 1
            ready = self._ready(frame.run)
        if ready:
            self._settle(frame.run)

    # -- acknowledgements (any thread) ---------------------------------------------------

    def durable(self, seq: int) -> None:
        settled: list[Run] = []
        with self._lock:
            self._last_ack = time.monotonic()
            for s in [s for s in self._pending if s <= seq]:
                frame = self._pending.pop(s)
                frame.run.frames -= 1
                if self._ready(frame.run):
                    settled.append(frame.run)
        self._settle(*settled)

    def failed(self, seq: int, error: BmigError) -> None:
        log.warning("%s", error.message)
        with self._lock:
            frame = self._pending.pop(seq, None)
            if frame is None:
                return
            self.result.failed_frames += 1
            self._failure = self._failure or error
            frame.run.failed = True
            frame.run.frames -= 1
            ready = self._ready(frame.run)
        if ready:
            self._settle(frame.run)

    def fatal(self, error: BmigError) -> None:
        self._set_fatal(error)

    def _set_fatal(self, error: BmigError) -> None:
        with self._lock:
            if self._fatal is None:
                self._fatal = error
            self._lock.notify_all()

    def _ready(self, run: Run) -> bool:
        return run.planned and run.frames == 0 and not run.done

    def _settle(self, *runs: Run) -> None:
        """Commit pieces whose frames are all durable, abort those where one failed:
        in as few messages to breqd as it takes."""
        with self._lock:
            runs = tuple(r for r in runs if not r.done)
            for run in runs:
                run.done = True
        if not runs:
            return
        device = self._info.name
        good = [(r.offset, r.length) for r in runs if not r.failed]
        bad = [(r.offset, r.length) for r in runs if r.failed]
        try:
            for i in range(0, len(good), MAX_RANGES_PER_FRAME):
                self._tracker.commit(device, good[i:i + MAX_RANGES_PER_FRAME])
            for i in range(0, len(bad), MAX_RANGES_PER_FRAME):
                self._tracker.abort(device, bad[i:i + MAX_RANGES_PER_FRAME])
            self.result.bytes_committed += sum(n for _, n in good)
        except BmigError as exc:
            self._set_fatal(exc)
        with self._lock:
            for run in runs:
                self._inflight -= run.weight
                self._open.discard(run)
            self._lock.notify_all()

    def _wait_settled(self) -> None:
        """Until every run is committed or aborted; a target that stops answering for
        ACK_TIMEOUT seconds (STOP_GRACE once stopping) is given up on (its chunks stay
        dirty)."""
        with self._lock:
            waiting = time.monotonic()
            while self._fatal is None and self._open:
                self._give_up_if_silent(waiting)
                self._lock.wait(0.5)

    def _give_up_if_silent(self, waiting_since: float) -> None:
        """Called with the lock held while waiting for acknowledgements."""
        limit = STOP_GRACE if self._stop.is_set() or self._claimed else ACK_TIMEOUT
        if time.monotonic() - max(waiting_since, self._last_ack) > limit \
                and self._fatal is None:
            self._fatal = UnreachableError(f"{self._target.description} stopped "
                                           f"acknowledging for {limit:.0f} s")

    def _abort_unsettled(self) -> None:
        """After a failure: what is still checked out goes back to dirty now (breqd would
        also do it when the connection closes)."""
        with self._lock:
            left = list(self._open)
            self._open.clear()
            for r in left:
                r.done = True
        ranges = [(r.offset, r.length) for r in left]
        for i in range(0, len(ranges), MAX_RANGES_PER_FRAME):
            try:
                self._tracker.abort(self._info.name, ranges[i:i + MAX_RANGES_PER_FRAME])
            except BmigError:
                return
