"""The sender's end of the replication protocol: ``WireTarget``, breceive at the other
end of a Stream.

Its user hands it frames with sequence numbers and asks for durability now and then;
it reports back through ``Acks``: ``durable(seq)`` (every frame up to seq is on stable
storage, except those reported failed), ``failed(seq, error)`` (nothing of that frame
was written) and ``fatal(error)`` (the target is gone; nothing more will be made
durable). A pass (bmig.sender.passes) commits chunks in breqd only on ``durable``
(invariant 3); a replica (bmig.nbd.replica) also hears ``received`` and ``written``.

A reader thread reads what the receiver sends. A replica over a plain socket hands that
to its event loop instead (``read_on``): the loop watches the socket and reads without
waiting; whoever closes the connection first makes sure the loop no longer watches it, so
that the loop never watches a descriptor closed and perhaps reused.

The handshake is bmig.wire.handshake's; the connection itself (TCP, TLS, SSH) is
bmig.wire.connect's. This module knows messages, threads and that one event loop, not
sockets or URLs.
"""

from __future__ import annotations

import logging
import os
import queue
import sys
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from bmig.chunkmath import chunk_count
from bmig.errors import BmigError, ProtocolError, UnreachableError
from bmig.framing import ConnectionClosed
from bmig.limits import MAX_HASHES, MAX_RESYNC_RANGES
from bmig.lineage import hex_id
from bmig.wire import handshake
from bmig.wire.channel import Channel
from bmig.wire.options import ConnectOptions
from bmig.wire.protocol import (Message, T, decode_json, error_from, pack_data,
                                pack_seq, pack_zero, type_of, unpack_hashes, unpack_seq)
from bmig.wire.transports import Stream
from bmig.wire.urls import TargetUrl

if TYPE_CHECKING:        # a sync never loads asyncio (bmigrate's start-up time)
    import asyncio

log = logging.getLogger("bmigrate")

REPLY_TIMEOUT = 300.0      # a control reply (OPENED, PASS_DONE, HASHES) may wait for a sync
REASON_WAIT = 10.0         # for the reader to read why the receiver closed the connection
BYE_WAIT = 10.0            # for the receiver to end the session after BYE (its final sync)


@dataclass(frozen=True)
class SourceInfo:
    """What OPEN says of the source: its lineage, size and chunk size."""

    name: str
    device_id: int
    generation: int
    size: int
    chunk_size: int
    previous: tuple[str, ...] = ()     # older generations of this lineage, newest first


class Acks(Protocol):
    def durable(self, seq: int) -> None: ...
    def failed(self, seq: int, error: BmigError) -> None: ...
    def fatal(self, error: BmigError) -> None: ...

    # Replication (bmig.nbd.replica) also hears of frames received and written; a pass
    # does not ask for these, so its Acks need not have them.


class WireTarget:
    """breceive at the other end of a Stream: handshake, then a reader thread that sorts
    acknowledgements from replies (or an event loop, once ``read_on`` handed it over)."""

    compresses = True
    lineage = True

    def __init__(self, stream: Stream, url: TargetUrl, options: ConnectOptions,
                 receiver_verified: bool, hint: str = ""):
        self._unread(Channel(stream), str(url), url.export)
        agreed = handshake.sender(self.channel, options.secret, receiver_verified, hint)
        self.server = agreed.peer
        self.sealed = agreed.sealed
        self._reader = threading.Thread(target=self._read_loop, name="acks", daemon=True)
        self._reader.start()

    def _unread(self, channel: Channel, description: str, export: str) -> None:
        """The state of a target on ``channel`` that nothing has read from yet (the
        fuzz drivers start here too, and read by hand)."""
        self.description = description
        self.export = export
        self.channel = channel
        self._replies: queue.Queue[Message | memoryview | BmigError] = queue.Queue()
        self._acks: Acks | None = None
        self._reader: threading.Thread | None = None
        self._closed = False
        self.error: BmigError | None = None     # why the connection ended, once it has
        # Reading on an event loop (``read_on``): the loop, and whether it watches the
        # socket; ``_read_ended`` is set once reading stopped for good, in either way.
        self._loop: asyncio.AbstractEventLoop | None = None
        self._watched = False
        self._unwatched = False
        self._close_when_unwatched = False      # close could not wait: the loop closes
        self._let_go = False                    # the loop no longer watches the socket
        self._letting_go = threading.Lock()     # between those two
        self._read_ended = threading.Event()

    # -- control -----------------------------------------------------------------------

    def _send(self, message: Message) -> None:
        self._frame(message.encode())

    def _frame(self, head: bytes, payload: Any = None) -> None:
        """Send one frame. When the connection broke, the receiver's own reason (an ERROR
        it sent before closing, read by the reader thread) wins over the broken pipe."""
        self._frames([(head, payload)])

    def _frames(self, frames: list[tuple[bytes, Any]], rest: list | None = None) -> None:
        """Send frames in order, the small ones in one write (``Channel.send_many``);
        ``rest``: what ``try_send_batch`` left instead."""
        try:
            if rest is not None:
                self.channel.send_rest(rest)
            elif len(frames) == 1:
                self.channel.send(*frames[0])
            else:
                self.channel.send_many(frames)
        except UnreachableError:
            self._wait_for_reason()
            if self.error is not None and not isinstance(self.error, UnreachableError):
                raise self.error from None
            raise

    def _wait_for_reason(self) -> None:
        """A send failed: give the reader (the thread, or the loop) REASON_WAIT to read
        the ERROR the receiver may have sent before it closed."""
        reader = self._reader
        if reader is None or reader is threading.current_thread():
            return
        reader.join(timeout=REASON_WAIT)
        if self._loop is not None and not reader.is_alive() and not self._on_loop():
            self._read_ended.wait(REASON_WAIT)

    def _request(self, message: Message, expect: T) -> Message | memoryview:
        self._send(message)
        try:
            reply = self._replies.get(timeout=REPLY_TIMEOUT)
        except queue.Empty:
            raise UnreachableError(f"{self.description} did not answer {message.type.name} "
                                   f"in {REPLY_TIMEOUT:.0f} s") from None
        if isinstance(reply, BmigError):
            raise reply
        kind = type_of(reply) if isinstance(reply, memoryview) else reply.type
        if kind != expect:
            raise ProtocolError(f"{self.description}: expected {expect.name}, got {kind.name}")
        return reply

    def read_on(self, loop: asyncio.AbstractEventLoop) -> bool:
        """From the next frame the reader thread reads, the frames are read by
        ``loop`` instead, as the socket becomes readable: an acknowledgement then reaches
        its Acks with no thread to wake on the way (Acks are called on the loop). Only
        for a plain socket (tcp://); False, and the thread reads on, for others. Call
        before the request whose reply is the last frame the thread should read (a
        replica: before OPEN); once reading is on the loop, a request may not be made
        from the loop's own thread."""
        if not getattr(self.channel.stream, "nowait", False) \
                or not hasattr(self.channel.stream, "recv_nowait"):
            return False
        self._loop = loop
        return True

    def _handed_over(self) -> bool:
        """The reader thread, after a frame: whether the loop reads from now on."""
        loop = self._loop
        if loop is None:
            return False
        try:
            loop.call_soon_threadsafe(self._watch)
        except RuntimeError:                # the loop is closed: the thread reads on
            self._loop = None
            return False
        return True

    def _watch(self) -> None:
        """On the loop: take the frames the thread left in the buffer, then watch the
        socket."""
        assert self._loop is not None
        if self._unwatched:                  # closed before the loop got here
            self._read_ended.set()
            return
        fd = self.channel.stream.fileno()        # type: ignore[attr-defined]
        try:
            self._loop.add_reader(fd, self._readable)
            self._watched = True
            # libuv (uvloop) makes the descriptor non-blocking, for every user of it:
            # the sender thread's sends must still wait for room, so it is made
            # blocking again; the loop's own reads never wait (MSG_DONTWAIT).
            os.set_blocking(fd, True)
        except (OSError, ValueError) as exc:      # closed under us: nothing to read
            self._unwatch()
            self._reader_stops(UnreachableError(f"lost {self.description}: {exc}"))
            return
        self._readable(fill=False)       # what the thread's last receive brought

    def _readable(self, fill: bool = True) -> None:
        """On the loop: one receive (at most a buffer's worth, so that a peer that
        floods us cannot keep the loop here), then every frame it made whole."""
        why: BmigError
        try:
            if fill and not self.channel.fill_nowait():
                return
            while (body := self.channel.buffered()) is not None:
                self._dispatch(body)
            return
        except ConnectionClosed:
            why = UnreachableError(f"{self.description} closed the connection")
        except BmigError as exc:
            why = exc
        except Exception:                        # a bug: the replica fails, not the loop
            log.exception("%s: reading an acknowledgement failed", self.description)
            why = UnreachableError(f"lost {self.description}: an internal error")
        self._unwatch()
        self._reader_stops(why)

    def _unwatch(self) -> None:
        """On the loop: stop watching the socket (before it is closed: a loop must not
        watch a descriptor that may be reused), and close it if ``close`` could not
        wait for this."""
        self._unwatched = True
        if self._watched:
            self._watched = False
            assert self._loop is not None
            self._loop.remove_reader(self.channel.stream.fileno())  # type: ignore[attr-defined]
        self._read_ended.set()
        with self._letting_go:
            self._let_go = True
            close = self._close_when_unwatched
        if close:
            self.channel.close()

    def _on_loop(self) -> bool:
        asyncio = sys.modules.get("asyncio")
        if asyncio is None:
            return False
        try:
            return asyncio.get_running_loop() is self._loop
        except RuntimeError:
            return False

    def _stop_watching(self) -> bool:
        """Any thread: True once the loop does not watch the socket and will not (or
        the loop is closed, and watches nothing); False if the loop did not get to it
        in REASON_WAIT (busy, or stopped)."""
        loop = self._loop
        if loop is None:
            return True
        if self._on_loop():
            self._unwatch()
            return True
        done = threading.Event()

        def unwatch() -> None:
            self._unwatch()
            done.set()

        try:
            loop.call_soon_threadsafe(unwatch)
        except RuntimeError:                 # closed: it watches nothing any more
            return True
        return done.wait(REASON_WAIT)

    def set_acks(self, acks: Acks) -> None:
        """Who hears the acknowledgements from now on; told at once if the connection
        has already ended (between passes, say, behind a proxy that kept our side open)."""
        self._acks = acks
        if self.error is not None:
            acks.fatal(self.error)

    def open(self, source: SourceInfo, discard: bool, mode: str = "pass",
             extra: dict[str, Any] | None = None) -> str:
        """Choose the target; ``mode`` "replicate" opens a replication session,
        "inspect" a read-only one (verify). ``extra``: more OPEN fields (a replication
        session's protocol and window)."""
        reply = self._request(Message(T.OPEN, {
            "export": self.export, "device": source.name, "device_id": hex_id(source.device_id),
            "generation": hex_id(source.generation), "size": source.size,
            "chunk_size": source.chunk_size, "discard_target_data": discard,
            "mode": mode, "previous": list(source.previous), **(extra or {})}), T.OPENED)
        assert isinstance(reply, Message)
        self.opened = reply.fields.get("target", {})
        self.why = reply.str("why", "")      # why a target with a record is "new" now
        self.resync = reply.fields.get("resync")   # a rejoining copy's own changes
        return reply.str("relation")

    def begin_pass(self) -> None:
        self._send(Message(T.PASS_BEGIN, {}))

    def send_data(self, seq: int, offset: int, codec: int, payload: Any, raw_length: int,
                  digest: int, flags: int = 0) -> None:
        self._frame(pack_data(codec, flags, raw_length, seq, offset, digest), payload)

    def send_zero(self, seq: int, offset: int, length: int, flags: int = 0) -> None:
        self._frame(pack_zero(seq, offset, length, flags))

    def request_durable(self, seq: int) -> None:
        self._frame(pack_seq(T.FLUSH, seq))

    def send_batch(self, frames: list[tuple[bytes, Any]]) -> None:
        """Frames built by ``data_frame``, ``zero_frame`` and ``durable_frame``, sent in
        order in as few writes as the channel can (a replica's frames of one loop turn)."""
        self._frames(frames)

    def try_send_batch(self, frames: list[tuple[bytes, Any]]) -> list[memoryview] | None:
        """``send_batch`` without waiting (``Channel.try_send_many``): None when not
        tried, else what is left for ``send_rest``."""
        return self.channel.try_send_many(frames)

    def send_rest(self, parts: list[memoryview]) -> None:
        """What ``try_send_batch`` left, before any other frame."""
        self._frames([], rest=parts)

    @staticmethod
    def data_frame(seq: int, offset: int, codec: int, payload: Any, raw_length: int,
                   digest: int, flags: int = 0) -> tuple[bytes, Any]:
        return pack_data(codec, flags, raw_length, seq, offset, digest), payload

    @staticmethod
    def zero_frame(seq: int, offset: int, length: int, flags: int = 0) -> tuple[bytes, Any]:
        return pack_zero(seq, offset, length, flags), None

    @staticmethod
    def durable_frame(seq: int) -> tuple[bytes, Any]:
        return pack_seq(T.FLUSH, seq), None

    def end_pass(self, complete: bool, consistent: bool | None = None) -> dict:
        """``consistent``: nothing is dirty on the source now but what a replication
        session carries, so the target is a copy of one moment (or follows the source)."""
        fields: dict[str, Any] = {"complete": complete}
        if consistent is not None:
            fields["consistent"] = consistent
        reply = self._request(Message(T.PASS_END, fields), T.PASS_DONE)
        assert isinstance(reply, Message)
        return dict(reply.fields.get("target", {}))

    def hashes(self, offset: int, length: int, chunk: int) -> list[int]:
        out: list[int] = []
        step = MAX_HASHES * chunk
        for start in range(offset, offset + length, step):
            n = min(step, offset + length - start)
            reply = self._request(Message(T.HASHES_REQ, {"offset": start, "length": n,
                                                         "chunk_size": chunk}), T.HASHES)
            assert isinstance(reply, memoryview)
            got_offset, values = unpack_hashes(reply)
            if got_offset != start or len(values) != chunk_count(n, chunk):
                raise ProtocolError(f"{self.description} answered hashes for another range")
            out.extend(values)
        return out

    def promote(self, generation: int) -> dict:
        """Cutover: the target takes ``generation`` and becomes the primary."""
        reply = self._request(Message(T.PROMOTE, {"generation": hex_id(generation)}),
                              T.PROMOTED)
        assert isinstance(reply, Message)
        return dict(reply.fields.get("target", {}))

    def resync_count(self) -> int | None:
        """How many ranges the rejoining copy offers as its own changes (OPEN's
        "resync"), checked; None when it does not know them (every chunk is compared)."""
        offer = self.resync
        if offer is None:
            return None
        if not isinstance(offer, dict) or not isinstance(offer.get("all", True), bool):
            raise ProtocolError(f"{self.description}: a bad resync offer {_short(offer)}")
        if offer.get("all", True):
            return None
        count = offer.get("ranges")
        if isinstance(count, bool) or not isinstance(count, int) \
                or not 0 <= count <= MAX_RESYNC_RANGES:
            raise ProtocolError(f"{self.description}: a resync offer of {_short(count)} "
                                f"ranges (at most {MAX_RESYNC_RANGES})")
        return count

    def resync_ranges(self, count: int, size: int) -> list[tuple[int, int]]:
        """The ``count`` ranges of a rejoining copy's own changes (``resync_count``),
        fetched a page at a time, each checked against the device's ``size`` before it
        is kept; a peer that sends more than it offered, or pages that do not follow
        each other, is refused."""
        out: list[tuple[int, int]] = []
        start: int | None = 0 if count else None
        while start is not None:
            reply = self._request(Message(T.RESYNC_REQ, {"start": start}), T.RESYNC)
            assert isinstance(reply, Message)
            page = reply.list("ranges")
            if len(out) + len(page) > count:
                raise ProtocolError(f"{self.description}: more resync ranges than the "
                                    f"{count} offered")
            for item in page:
                if (not isinstance(item, list) or len(item) != 2
                        or not all(isinstance(v, int) and not isinstance(v, bool)
                                   and v >= 0 for v in item) or item[1] == 0
                        or item[0] + item[1] > size):
                    raise ProtocolError(f"{self.description}: a bad resync range "
                                        f"{_short(item)} (the device has {size} bytes)")
                out.append((item[0], item[1]))
            following = reply.fields.get("next")
            if following is not None and (isinstance(following, bool)
                                          or following != start + len(page) or not page):
                raise ProtocolError(f"{self.description}: a bad resync page "
                                    f"{_short(following)} after {start}")
            start = following
        if len(out) != count:
            raise ProtocolError(f"{self.description}: {len(out)} resync ranges, but "
                                f"{count} were offered")
        return out

    def status(self) -> dict:
        reply = self._request(Message(T.STATUS_REQ, {}), T.STATUS)
        assert isinstance(reply, Message)
        return dict(reply.fields)

    def abort(self) -> None:
        """End the connection at once, without a BYE: for a link that stopped answering
        (a send may be stuck on it; this wakes it). Any thread. Read on a loop, the
        socket is shut down, and closed by ``close``, once the loop no longer watches
        it."""
        if self._loop is not None:
            self.channel.stream.shutdown()       # type: ignore[attr-defined]
        else:
            self.channel.close()

    def close(self) -> None:
        """BYE, then wait (BYE_WAIT at most) for the receiver to end the session: it
        closes the connection only once the target is synced and its locks are free, so
        when a sync has returned no session of it is left on the receiver (``bmigrate
        promote`` there right after finds the copy free)."""
        if self._closed:
            return
        self._closed = True
        if self._loop is not None and self._on_loop():
            self._bye_from_the_loop()
        else:
            try:
                self._send(Message(T.BYE, {}))
            except BmigError:
                pass
            else:
                reader = self._reader
                if reader is not None and reader is not threading.current_thread():
                    reader.join(timeout=BYE_WAIT)      # it ends at the receiver's close
                if self._loop is not None and reader is not None and not reader.is_alive():
                    self._read_ended.wait(BYE_WAIT)
        if self._stop_watching():
            self.channel.close()
        else:                                      # the loop closes it once it lets go
            log.warning("%s: the event loop did not let go of the connection in %g s; "
                        "it closes the connection when it does", self.description,
                        REASON_WAIT)
            self.channel.stream.shutdown()         # type: ignore[attr-defined]
            with self._letting_go:
                self._close_when_unwatched = not self._let_go
            if not self._close_when_unwatched:     # it did, just now
                self.channel.close()
        if self._reader is not None:
            self._reader.join(timeout=10)

    def _bye_from_the_loop(self) -> None:
        """``close`` on the loop's own thread (a replica replaced by another), which may
        wait neither for the socket nor for itself: BYE only if the socket takes it at
        once, then the last frames read here, for BYE_WAIT in all."""
        bye = [(Message(T.BYE, {}).encode(), None)]
        if self.channel.try_send_many(bye) != []:     # not taken whole: no BYE, and
            return                                    # the receiver sees the close
        reader = self._reader
        if reader is not None and reader.is_alive():  # not handed over yet
            reader.join(timeout=BYE_WAIT)
            return
        self._unwatch()
        deadline = time.monotonic() + BYE_WAIT
        stream = self.channel.stream
        try:
            while True:
                while (body := self.channel.buffered()) is not None:
                    self._dispatch(body)
                left = deadline - time.monotonic()
                if left <= 0 or not stream.readable(left):   # type: ignore[attr-defined]
                    return
                self.channel.fill_nowait()
        except BmigError:
            pass

    # -- the reader thread ---------------------------------------------------------------

    def _read_loop(self) -> None:
        why: BmigError = UnreachableError(f"lost {self.description}")
        handed = False
        try:
            while True:
                self._dispatch(self.channel.read())
                if self._handed_over():
                    handed = True
                    return
        except ConnectionClosed:
            why = UnreachableError(f"{self.description} closed the connection")
        except BmigError as exc:
            why = exc
        finally:
            if not handed:
                self._reader_stops(why)

    def _dispatch(self, body: memoryview) -> None:
        kind = type_of(body)
        if kind == T.DURABLE:
            if self._acks is not None:
                self._acks.durable(unpack_seq(body))
        elif kind in (T.RECEIVED, T.WRITTEN):
            hook = getattr(self._acks, "received" if kind == T.RECEIVED else "written", None)
            if hook is not None:
                hook(unpack_seq(body))
        elif kind == T.HASHES:
            self._replies.put(memoryview(bytes(body)))   # outlives the buffer
        elif kind == T.ERROR:
            self._error(decode_json(body))
        else:
            self._replies.put(decode_json(body))

    def _reader_stops(self, why: BmigError) -> None:
        """Reading ended (the thread's, or the loop's): whoever waits hears why."""
        self._read_ended.set()
        if not self._closed:
            log.debug("%s: reader stops: %s", self.description, why.message)
            why = self.error = self.error or why
            if self._acks is not None:
                self._acks.fatal(why)
            self._replies.put(why)

    def _error(self, message: Message) -> None:
        error = error_from(message)
        seq = message.fields.get("seq")
        if isinstance(seq, int) and not message.fields.get("fatal") and self._acks is not None:
            self._acks.failed(seq, error)
        elif message.fields.get("fatal"):
            if self.error is None:
                self.error = error           # the reason, not the close that follows
            if self._acks is not None:
                self._acks.fatal(error)
            self._replies.put(error)
        else:
            self._replies.put(error)


def _short(value: Any) -> str:
    """A peer's value for an error line: repr, cut short."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
