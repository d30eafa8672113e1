"""Synchronous replication from bmig-nbd: each write also goes to breceive.

It carries writes and counts their seqs; it may not know chunks, holds or breqd: what a
durable seq settles is the tracking layer's business (bmig.nbd.layers.mirror).

The connection is a WireTarget (bmig.wire.client: the same transports, handshake and
lineage check as a sync), opened in "replicate" mode. The frames queued in one turn of
the event loop leave together, HAND_OVER_EVERY at a time: from the loop when the socket
takes them at once (``WireTarget.try_send_batch``), else through a sender thread
(``send_batch``, and ``send_rest`` for what the socket did not take). Over tcp:// the
loop itself reads the acknowledgements (``WireTarget.read_on``: no thread to wake between
breceive's answer and the writer's reply); over TLS and SSH the WireTarget's reader thread
does. An acknowledgement covers every frame before it that waits for the same kind (OPEN
asks breceive for one per batch). The threads hand their news to the loop through one
inbox, and only the first item of a batch wakes the loop (call_soon_threadsafe); what
the loop reads itself is taken at once, after what the threads told before it. What a
write waits for depends on the protocol:

    C   written on the target (WRITTEN), and with FUA durable there (DURABLE)
    B   received by the target (RECEIVED), with FUA durable
    A   queued for sending; the queue is bounded (the writer waits when it is full) and
        nothing is ever dropped; FUA still waits for DURABLE
    FLUSH, in every protocol: durable on the target (FLUSH → DURABLE)

A write is settled on the target only once a DURABLE covers it: ``durable_seq`` is that
watermark, and ``on_durable`` hears when it moves. Until then the chunks it wrote stay
dirty in breqd (the tracking layer releases them as synced only after that), so a target
that crashes and loses what it had not flushed never leaves a chunk marked clean that it
does not have. A FLUSH follows the last frame by FLUSH_DELAY at most, so writes settle
even when the application never flushes.

A write of one frame that may be queued at once (``takes_now``: in protocol A, room in
the queue and nobody waiting for it) can go by ``write_now``, with no task and no
future: the writer's callback is called from the acknowledgement's handler (or at once,
protocol A), with the seq or the error. Both kinds of waiters sit in one table and are
answered by the same acknowledgements, so the rules above hold for both.

Seqs are taken when a frame is queued, and frames leave in queue order: the wire order is
the seq order, so a DURABLE(seq) never covers a frame sent after the FLUSH it answers.

A target that stops answering (a partition: the link neither works nor breaks) is noticed
by ``ack_timeout``: when frames wait for a DURABLE that has not moved for that long, the
replica fails as for a lost connection. While no write comes, a FLUSH goes out every half
``ack_timeout`` as a ping, so an idle link that died is noticed too. In protocol A the
bytes a writer was answered for but the target has not written yet never exceed
QUEUE_BYTES (the room comes back on WRITTEN, not when the frame leaves): that is the most
a source that dies can have acknowledged and not handed over (``window``).

A frame breceive refuses (ERROR with its seq: no space, an I/O error, a bad frame) is not
on the target. The writer of a protocol A or B write has been answered already, so there
is nobody left to fail; instead the replica fails as a whole: every write waiting fails,
the durable watermark stops where it is (a later DURABLE never covers the refused seq,
invariant 11), and ``on_failed`` tells the layer above, which decides what that means
(bmig.nbd.layers.replicate: degrade or block). A lost connection does the same.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import queue
import threading
import time
from typing import Callable, TypeVar, Union

from bmig.constants import REPLICATION_PROTOCOLS
from bmig.errors import BmigError, ConfigError, UnreachableError
from bmig.limits import MAX_DATA, QUEUE_BYTES
from bmig.wire import codec
from bmig.wire.client import SourceInfo, WireTarget
from bmig.wire.connect import connect
from bmig.wire.options import ConnectOptions
from bmig.wire.protocol import FLAG_ACK_RECEIVED, FLAG_ACK_WRITTEN, FLAG_FUA
from bmig.wire.urls import parse_target_url

log = logging.getLogger("bmig-nbd")

FLUSH_DELAY = 0.05                    # seconds from an unflushed frame to its FLUSH
ACK_TIMEOUT = 10.0                    # seconds a DURABLE may keep us waiting (ping: half)
SENDER_WAIT = 30.0                    # seconds a close waits for the frames still queued
# Frames queued in one loop turn leave every HAND_OVER_EVERY frames, not only at its end:
# breceive starts on them while the loop goes on with the turn's other requests, and on
# two cores the two overlap (bench/cutover.py, protocol C at iodepth 32: ~15 % more
# writes per second than one write per turn; 4 or 8 cost more sends than they gain).
HAND_OVER_EVERY = 16
# What a writer waits for; _QUEUED: nothing past the queue (protocol A).
_DURABLE, _WRITTEN, _RECEIVED, _QUEUED = "durable", "written", "received", "queued"

# ``write_now``'s callback: (the frame's seq, None) once answered, or (seq, the error).
Answered = Callable[[int, "BmigError | None"], None]
Waiter = Union[asyncio.Future, Answered]
_T = TypeVar("_T")


class Replica:
    def __init__(self, target: WireTarget, protocol: str, loop: asyncio.AbstractEventLoop,
                 ack_timeout: float = ACK_TIMEOUT):
        if protocol not in REPLICATION_PROTOCOLS:
            raise ValueError(protocol)
        self.target = target
        self.protocol = protocol
        self.description = target.description
        self.ack_timeout = ack_timeout
        self._loop = loop
        self._seq = itertools.count(1)
        self._waiting: dict[int, tuple[str, Waiter]] = {}
        self._outbox: queue.Queue = queue.Queue()
        self._turn: list[tuple] = []      # frames queued in this loop turn, not yet handed over
        self._in_thread = 0               # batches handed to the sender thread, not yet sent
        self._inbox: list[tuple] = []     # what the threads told, for the loop to take
        self._inbox_lock = threading.Lock()
        self._queued = 0                  # bytes answered (A) or queued, not yet written there
        self._unwritten: dict[int, int] = {}   # protocol A: seq -> bytes not yet WRITTEN
        self._progress = time.monotonic()  # the last DURABLE that moved, or idle since
        self._room = asyncio.Condition()
        self._room_waiters = 0            # protocol A writers waiting for room
        self.error: BmigError | None = None
        self._closed = False
        self.durable_seq = 0                  # every frame up to it is durable there
        self.queued_seq = 0                   # the last frame queued for the sender
        self.on_durable: Callable[[int], None] | None = None   # the new watermark
        self.on_failed: Callable[[BmigError], None] | None = None  # the replica failed
        self._flush_timer: asyncio.TimerHandle | None = None
        self._watch_timer: asyncio.TimerHandle | None = None
        self._loop_thread: int | None = None   # the loop's thread, once it has run here
        target.set_acks(self)
        self._sender = threading.Thread(target=self._send_loop, name="replica-sender",
                                        daemon=True)
        self._sender.start()
        loop.call_soon_threadsafe(self._started)

    @property
    def window(self) -> int:
        """The most a writer can have been answered for that the target does not have."""
        return QUEUE_BYTES if self.protocol == "A" else 0

    @property
    def lag_bytes(self) -> int:
        """Bytes queued or answered and not yet written on the target (protocol A)."""
        return self._queued

    # -- the writer's side (event loop) -------------------------------------------------

    def _flags(self, fua: bool) -> tuple[int, str]:
        if fua:
            return FLAG_FUA, _DURABLE
        if self.protocol == "C":
            return FLAG_ACK_WRITTEN, _WRITTEN
        if self.protocol == "B":
            return FLAG_ACK_RECEIVED, _RECEIVED
        return FLAG_ACK_WRITTEN, _QUEUED      # WRITTEN gives the room back

    async def _submit(self, frame: Callable[[int], tuple], nbytes: int,
                      wait_for: str) -> int:
        """Queue the frame ``frame(seq)`` and wait for what ``wait_for`` says; its seq."""
        if self.error is not None:
            raise self.error
        if self.protocol == "A":
            self._room_waiters += 1
            try:
                async with self._room:
                    await self._room.wait_for(lambda: self._queued < QUEUE_BYTES
                                              or self.error is not None)
                    seq, future = self._enqueue(frame, nbytes, wait_for)
            finally:
                self._room_waiters -= 1
        else:
            seq, future = self._enqueue(frame, nbytes, wait_for)
        if future is not None:
            await future
        return seq

    def _enqueue(self, frame: Callable[[int], tuple], nbytes: int, wait_for: str,
                 answered: Answered | None = None) -> tuple[int, asyncio.Future | None]:
        """Take the next seq and queue the frame, with no wait in between: the seq order
        is the queue order, which is the wire order. ``answered``: the writer waits with
        this callback rather than a future (``write_now``)."""
        if self.error is not None:
            raise self.error
        seq = next(self._seq)
        item = frame(seq)
        future = None
        if wait_for != _QUEUED:
            if answered is None:
                future = self._loop.create_future()
                self._waiting[seq] = (wait_for, future)
            else:
                self._waiting[seq] = (wait_for, answered)
        if self.queued_seq <= self.durable_seq:
            self._progress = time.monotonic()     # something outstanding from now on
        self._queued += nbytes
        back_when_sent = nbytes
        if self.protocol == "A" and item[0] != "flush":
            self._unwritten[seq] = nbytes
            back_when_sent = 0       # its room comes back once the target wrote it
        self.queued_seq = seq
        if not self._turn:
            self._loop.call_soon(self._hand_over)
        self._turn.append((item, back_when_sent, seq))
        if len(self._turn) >= HAND_OVER_EVERY:
            self._hand_over()
        if item[0] != "flush":
            self._flush_later()
        return seq, future

    def _hand_over(self) -> None:
        """The frames of this loop turn leave together: one write to the socket, one
        wake-up of breceive. Sent from here when the socket takes them at once and the
        sender thread has nothing left to send (so the wire order stays the seq order);
        what it does not take, and every turn after it until the thread is done, goes
        to the sender thread."""
        turn, self._turn = self._turn, []
        if not turn:
            return
        if self.error is not None or self._closed:   # nothing more goes out
            self._sent([(seq, nbytes) for _, nbytes, seq in turn])
            return
        frames = [self._frame(item) for item, _, _ in turn]
        try_send = getattr(self.target, "try_send_batch", None)
        if not self._in_thread and try_send is not None:
            rest = try_send(frames)
            if rest is not None and not rest:
                self._sent([(seq, nbytes) for _, nbytes, seq in turn])
                return
            if rest is not None:
                self._in_thread += 1
                self._outbox.put(("rest", rest, turn))
                return
        self._in_thread += 1
        self._outbox.put(("frames", frames, turn))

    async def write(self, offset: int, data: memoryview | bytes, fua: bool) -> int:
        """Send; return (per the protocol) with the seq of the last frame, which is
        settled once ``durable_seq`` reaches it."""
        view = memoryview(data)
        seq = 0
        for start in range(0, len(view), MAX_DATA):
            piece = bytes(view[start:start + MAX_DATA])
            flags, wait_for = self._flags(fua and start + MAX_DATA >= len(view))
            at = offset + start
            seq = await self._submit(
                lambda s, at=at, piece=piece, flags=flags: ("data", s, at, piece, flags),
                len(piece), wait_for)
        return seq

    def takes_now(self, nbytes: int) -> bool:
        """A write of ``nbytes`` may go by ``write_now``: one frame, and (protocol A)
        room in the queue with no writer waiting for it, so none is overtaken."""
        if self.error is not None or self._closed or nbytes > MAX_DATA:
            return False
        return self.protocol != "A" or (self._queued < QUEUE_BYTES
                                        and not self._room_waiters)

    def write_now(self, offset: int, data: memoryview | bytes, fua: bool,
                  answered: Answered) -> int:
        """Queue a write that ``takes_now`` allowed, with no task and no future; its
        seq. ``answered(seq, error)`` is called once, when the write is as far as the
        protocol says (protocol A: at once, before this returns), or failed."""
        payload = bytes(data)
        flags, wait_for = self._flags(fua)
        seq, _ = self._enqueue(lambda s: ("data", s, offset, payload, flags),
                               len(payload), wait_for, answered)
        if wait_for == _QUEUED:
            self._wake(seq, answered, None)
        return seq

    async def zero(self, offset: int, length: int, fua: bool) -> int:
        flags, wait_for = self._flags(fua)
        return await self._submit(lambda s: ("zero", s, offset, length, flags), 64, wait_for)

    async def flush(self) -> None:
        await self._submit(lambda s: ("flush", s), 16, _DURABLE)

    def _flush_later(self) -> None:
        if self._flush_timer is None:
            self._flush_timer = self._loop.call_later(FLUSH_DELAY, self._timed_flush)

    def _timed_flush(self) -> None:
        self._flush_timer = None
        if self.error is None and not self._closed and self.queued_seq > self.durable_seq:
            self._enqueue(lambda s: ("flush", s), 16, _QUEUED)

    def _started(self) -> None:
        self._loop_thread = threading.get_ident()
        self._watch()

    def _watch(self) -> None:
        """Every quarter of ``ack_timeout``: fail when a DURABLE keeps us waiting too
        long; ping (a FLUSH) when idle for half of it."""
        self._watch_timer = None
        if self.error is not None or self._closed:
            return
        now = time.monotonic()
        if self.queued_seq > self.durable_seq:
            if now - self._progress > self.ack_timeout:
                self._fail_all(UnreachableError(
                    f"{self.description} acknowledged nothing for {self.ack_timeout:g} s"))
                self.target.abort()          # wakes a sender stuck on a full socket
                return
        elif now - self._progress > self.ack_timeout / 2:
            self._enqueue(lambda s: ("flush", s), 16, _QUEUED)
        self._watch_timer = self._loop.call_later(self.ack_timeout / 4, self._watch)

    # -- the sender thread --------------------------------------------------------------

    def _frame(self, item: tuple) -> tuple:
        target = self.target
        kind = item[0]
        if kind == "data":
            _, seq, offset, payload, flags = item
            return target.data_frame(seq, offset, codec.RAW, payload, len(payload),
                                     codec.checksum(payload), flags)
        if kind == "zero":
            _, seq, offset, length, flags = item
            return target.zero_frame(seq, offset, length, flags)
        return target.durable_frame(item[1])

    def _send_loop(self) -> None:
        broken = False
        while True:
            entry = self._outbox.get()
            if entry is None:
                return
            kind, frames, turn = entry
            if not broken:   # nothing goes out after a frame that could not
                try:
                    if kind == "rest":
                        self.target.send_rest(frames)
                    else:
                        self.target.send_batch(frames)
                except BmigError as exc:
                    broken = True
                    self.fatal(exc)
            self._post("sent", 1, [(seq, nbytes) for _, nbytes, seq in turn])

    def _sent(self, frames: list[tuple[int, int]], by_thread: bool = False) -> None:
        """These frames (seq, bytes to give back now) left, or never will; ``by_thread``:
        a batch of the sender thread's. A protocol A data frame gives nothing back here:
        its room comes back on WRITTEN, which may be taken before this (two threads)."""
        if by_thread:
            self._in_thread -= 1
        for _, nbytes in frames:
            self._queued -= nbytes

    def _written_there(self, up_to: int) -> None:
        """Protocol A: every frame up to ``up_to`` is written on the target: their room
        comes back."""
        freed = sum(_pop_up_to(self._unwritten, up_to).values())
        if freed:
            self._queued -= freed
            self._loop.create_task(self._notify_room())

    async def _notify_room(self) -> None:
        async with self._room:
            self._room.notify_all()

    # -- acknowledgements (the loop over tcp://, else the WireTarget's reader thread) -----

    def durable(self, seq: int) -> None:
        self._post("durable", seq)

    def written(self, seq: int) -> None:
        self._post(_WRITTEN, seq)

    def received(self, seq: int) -> None:
        self._post(_RECEIVED, seq)

    def failed(self, seq: int, error: BmigError) -> None:
        self._post("failed", seq, error)

    def fatal(self, error: BmigError) -> None:
        self._post("fatal", 0, error)

    def _post(self, kind: str, seq: int, extra=None) -> None:
        """News for the loop, taken in the order told. From a thread, only the first of
        a batch wakes the loop; what comes before it looks is taken with it. On the
        loop (acknowledgements read there: ``WireTarget.read_on``) it is taken at once,
        after what the threads told before it."""
        with self._inbox_lock:
            first = not self._inbox
            self._inbox.append((kind, seq, extra))
        if threading.get_ident() == self._loop_thread:
            self._take_inbox()
        elif first:
            self._loop.call_soon_threadsafe(self._take_inbox)

    def _take_inbox(self) -> None:
        with self._inbox_lock:
            news, self._inbox = self._inbox, []
        for kind, seq, extra in news:
            if kind == _WRITTEN or kind == _RECEIVED:
                self._acked(seq, kind)
            elif kind == "durable":
                self._durable(seq)
            elif kind == "sent":
                self._sent(extra, by_thread=bool(seq))
            elif kind == "failed":
                self._refused(seq, extra)
            else:
                self._fail_all(extra)

    def _wake(self, seq: int, waiter: Waiter, error: BmigError | None) -> None:
        """Answer one writer: its future, or its ``write_now`` callback (which may not
        break the handling of the acknowledgements that came with its own)."""
        if isinstance(waiter, asyncio.Future):
            if not waiter.done():
                if error is None:
                    waiter.set_result(None)
                else:
                    waiter.set_exception(error)
            return
        try:
            waiter(seq, error)
        except Exception:
            log.exception("replication to %s: answering the writer of seq %d failed",
                          self.description, seq)

    def _acked(self, seq: int, kind: str) -> None:
        """RECEIVED or WRITTEN(seq) covers every frame up to seq: breceive handles frames
        in order, answers a refused one with an ERROR before any later acknowledgement,
        and sends one acknowledgement of each kind per batch of frames (OPEN's
        ``acks: "cumulative"``; a receiver that ignores it acknowledges each frame, which
        reads the same). A writer waiting for another kind (a FUA's DURABLE) waits on."""
        if self.error is not None or self._closed:    # as for a DURABLE: nothing more
            return
        if self.protocol == "A" and kind == _WRITTEN:
            self._written_there(seq)
        answered = _pop_up_to(self._waiting, seq, lambda entry: entry[0] == kind)
        for s, (_, waiter) in answered.items():   # every one taken before any is answered
            self._wake(s, waiter, None)

    def _durable(self, seq: int) -> None:
        """DURABLE(seq) covers everything up to seq, whatever it waited for; after a
        refused or lost frame, nothing more (breceive answers frames in order, so a
        refusal arrives before any DURABLE that would have covered it)."""
        if self.error is not None or self._closed:
            return
        for s, (_, waiter) in _pop_up_to(self._waiting, seq).items():
            self._wake(s, waiter, None)
        if self._unwritten:
            self._written_there(seq)
        if seq > self.durable_seq:
            self._progress = time.monotonic()
            self.durable_seq = seq
            if self.on_durable is not None:
                self.on_durable(seq)

    def _refused(self, seq: int, error: BmigError) -> None:
        """breceive refused frame ``seq``: what it carried is not on the target. Its
        writer may have been answered already (protocols A and B), so the replica fails:
        the write's chunks must not be taken for mirrored by a later DURABLE."""
        self._fail_all(type(error)(f"{self.description} refused seq {seq}: "
                                   f"{error.message}"))

    def _fail_all(self, error: BmigError) -> None:
        first = self.error is None and not self._closed
        if first:
            log.error("replication to %s failed: %s", self.description, error.message)
            self.error = error
        waiting, self._waiting = self._waiting, {}
        for seq, (_, waiter) in waiting.items():
            self._wake(seq, waiter, self.error or error)
        self._loop.create_task(self._notify_room())
        if first and self.on_failed is not None:
            self.on_failed(error)

    # -- the end ------------------------------------------------------------------------

    def close(self) -> None:
        """Stop; writes still waiting fail (the caller has drained what it meant to).
        Blocking (it waits for the sender thread): called from a worker thread, it
        hands what touches the loop's state over to the loop."""
        self._closed = True
        if self.error is not None:       # nothing more is owed: do not wait on the link
            self.target.abort()
        self._outbox.put(None)
        self._sender.join(timeout=SENDER_WAIT)
        if self._sender.is_alive():      # stuck in a send to a receiver that reads nothing
            log.warning("replication to %s: %s still unsent after %g s; the connection "
                        "is dropped", self.description,
                        "frames" if self._in_thread else "a frame", SENDER_WAIT)
            self.target.abort()          # wakes the send; BYE would wait for it for ever
            self._sender.join(timeout=SENDER_WAIT)
        try:
            self.target.close()
        except BmigError:
            pass
        try:
            on_loop = asyncio.get_running_loop() is self._loop
        except RuntimeError:
            on_loop = False
        if on_loop:
            self._stopped()
        else:
            try:
                self._loop.call_soon_threadsafe(self._stopped)
            except RuntimeError:       # the loop is gone, and whoever waited with it
                pass

    def _stopped(self) -> None:
        for timer in (self._flush_timer, self._watch_timer):
            if timer is not None:
                timer.cancel()
        self._flush_timer = self._watch_timer = None
        self._fail_all(UnreachableError("replication stopped"))


def _pop_up_to(table: dict[int, _T], seq: int,
               which: Callable[[_T], bool] | None = None) -> dict[int, _T]:
    """Take the entries of ``table`` (keyed by seq, inserted in seq order) up to ``seq``;
    only those ``which`` accepts, when given."""
    taken: dict[int, _T] = {}
    for s, entry in table.items():
        if s > seq:
            break
        if which is None or which(entry):
            taken[s] = entry
    for s in taken:
        del table[s]
    return taken


def open_replica(url: str, options: ConnectOptions, source: SourceInfo, protocol: str,
                 loop: asyncio.AbstractEventLoop, ack_timeout: float = ACK_TIMEOUT) -> Replica:
    """Blocking: connect, authenticate, OPEN in replicate mode (run it in a thread). OPEN
    tells the receiver the protocol and the window, which it records: what a promotion
    of the copy without this source may have lost."""
    parsed = parse_target_url(url)
    if parsed.kind == "nbd":
        raise ConfigError("synchronous replication goes to breceive (tcp://, tls://, "
                          "ssh://), not to an NBD server")
    target = connect(parsed, options)
    target.read_on(loop)       # tcp://: acknowledgements read by the loop, from OPENED on
    try:
        relation = target.open(source, False, mode="replicate",
                               extra={"protocol": protocol, "acks": "cumulative",
                                      "window": QUEUE_BYTES if protocol == "A" else 0})
    except BaseException:
        target.close()
        raise
    log.info("replicating to %s (protocol %s, target %s)", target.description, protocol,
             relation)
    return Replica(target, protocol, loop, ack_timeout)
