"""Transmission phase: read a request, validate it, run it through the layers, reply.

Requests are parsed straight out of the connection's receive buffer. A request the layers
can finish at once (a read, a write to chunks already held in breqd) is executed and
answered in the same event-loop turn, and the replies of one turn leave in one write.
A write that waits only for an answer from outside (a replicated write to chunks already
held) is started at once with no task either (``write_later``) and answered from the
callback the layers call when that answer comes, with the replies of that turn.
Anything else that must wait (a mark in breqd, a flush, a trim) runs as a task and is answered
when done, the replies of the tasks that end in one turn in one write: NBD allows replies
in any order, and each reply is written in one piece, so replies never interleave.
Payload bytes held by waiting requests are capped per connection; past the cap the
connection stops reading until some are done.

Errors are errnos until the reply is built; ``nbd_error`` is the one place that turns
them into the NBD error set, after logging the real cause.

It sees an export only through the layer contract (bmig.nbd.layers.base): it may not know
what a layer does with a request (breqd, replication), only the errors it raises.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import struct
from typing import NamedTuple

from bmig.errors import ProtocolError
from bmig.limits import INLINE_PAYLOAD
from bmig.nbd import protocol as p
from bmig.nbd.connection import Connection
from bmig.nbd.handshake import Negotiated
from bmig.nbd.layers.base import Capabilities, ExportFailed, Layer
from bmig.nbd.layers.track import TrackingFailed

log = logging.getLogger("bmig-nbd")
requests_log = logging.getLogger("bmig-nbd.requests")   # one debug line per request

_ERRNO_TO_NBD = {
    errno.EPERM: p.Err.EPERM, errno.EROFS: p.Err.EPERM, errno.EACCES: p.Err.EPERM,
    errno.EIO: p.Err.EIO,
    errno.ENOMEM: p.Err.ENOMEM,
    errno.EINVAL: p.Err.EINVAL,
    errno.ENOSPC: p.Err.ENOSPC, errno.EDQUOT: p.Err.ENOSPC, errno.EFBIG: p.Err.ENOSPC,
    errno.EOVERFLOW: p.Err.EOVERFLOW,
    errno.ENOTSUP: p.Err.ENOTSUP, errno.EOPNOTSUPP: p.Err.ENOTSUP,
    errno.ESHUTDOWN: p.Err.ESHUTDOWN,
}
_WRITE_LIKE = (p.Cmd.WRITE, p.Cmd.TRIM, p.Cmd.WRITE_ZEROES)
_OFFSET = struct.Struct(">Q")
_HEADER = p.REQUEST.size
_MAGIC = p.REQUEST_MAGIC
_WRITE = int(p.Cmd.WRITE)
_READ = int(p.Cmd.READ)
_DISC = int(p.Cmd.DISC)
_FUA = p.CMD_FLAG_FUA
_NOT_WRITE_FLAGS = ~p.ALLOWED_CMD_FLAGS[p.Cmd.WRITE]


class RequestFailed(Exception):
    """A request refused or failed with an NBD error; ``str`` is the operator's message."""

    def __init__(self, error: p.Err, message: str):
        super().__init__(message)
        self.error = error


def nbd_error(exc: BaseException, what: str) -> p.Err:
    """The NBD error for ``exc``; the cause is logged here since the code loses detail."""
    if isinstance(exc, RequestFailed):
        log.debug("%s: %s -> %s", what, exc, p.name(p.Err, exc.error))
        return exc.error
    if isinstance(exc, TrackingFailed):
        log.error("%s: %s", what, exc)
        return p.Err.EIO
    if isinstance(exc, ExportFailed):    # said once at error level when it happened
        log.debug("%s: %s", what, exc)
        return p.Err.EIO
    if isinstance(exc, OSError):
        error = _ERRNO_TO_NBD.get(exc.errno or 0, p.Err.EIO)
        log.error("%s: %s", what, exc)
        return error
    log.error("%s: unexpected failure", what, exc_info=exc)
    return p.Err.EIO


class Request(NamedTuple):
    flags: int
    cmd: int
    cookie: int
    offset: int
    length: int

    def describe(self) -> str:
        return f"{p.name(p.Cmd, self.cmd)} {self.offset}+{self.length} flags={self.flags:#x}"


class Transmission:
    def __init__(self, conn: Connection, layer: Layer, negotiated: Negotiated, peer: str):
        self._conn = conn
        self._layer = layer
        self._caps: Capabilities = layer.capabilities()
        self._size = layer.size
        self._neg = negotiated
        self._structured = negotiated.structured
        self._peer = peer
        self._tasks: set[asyncio.Task] = set()
        self._later = 0                     # writes started by write_later, unanswered
        self._later_idle: asyncio.Future | None = None   # drain's wait for them
        self._held = 0                      # payload bytes of requests still running
        self._discard = 0                   # payload bytes of a refused write to drop
        self._pending: tuple[Request, bytearray] | None = None   # payload being received
        self._out = bytearray()             # replies of this turn
        self._out_scheduled = False         # _send_out_soon's call is pending
        self._done = False                  # NBD_CMD_DISC, end of stream or broken framing
        self.finished: asyncio.Future = asyncio.get_running_loop().create_future()
        self._trace = requests_log.isEnabledFor(logging.DEBUG)

    # -- reading requests --------------------------------------------------------------

    def process(self) -> None:
        """Parse and start every complete request in the receive buffer."""
        conn = self._conn
        if self._done or self._pending is not None or conn.reading_paused:
            return
        try:
            self._parse(conn)
        except ProtocolError as exc:
            log.warning("%s", exc.message)
            self._finish(abort=True)
        finally:
            self._send_out()

    def _parse(self, conn: Connection) -> None:
        buf, view = conn.buf, conn.view
        unpack = p.REQUEST.unpack_from
        while True:
            start, end = conn.start, conn.end
            if self._discard:
                n = min(self._discard, end - start)
                conn.start += n
                self._discard -= n
                if self._discard:
                    return
                continue
            if end - start < _HEADER:
                return
            magic, flags, cmd, cookie, offset, length = unpack(buf, start)
            if magic != _MAGIC:
                raise ProtocolError(f"{self._peer}: bad request magic {magic:#x}; closing")
            if cmd == _WRITE:
                if length <= INLINE_PAYLOAD:
                    if end - start < _HEADER + length:
                        return                      # the rest of the payload is coming
                    conn.start = start + _HEADER + length
                    self._write(Request(flags, cmd, cookie, offset, length),
                                view[start + _HEADER:start + _HEADER + length], False)
                    continue
                conn.start = start + _HEADER
                request = Request(flags, cmd, cookie, offset, length)
                if not self._refuse(request, length):
                    self._receive_payload(request)
                if self._pending is not None or self._done:
                    return
                continue
            conn.start = start + _HEADER
            if cmd == _DISC:
                log.debug("%s: NBD_CMD_DISC", self._peer)
                self._finish()
                return
            request = Request(flags, cmd, cookie, offset, length)
            if self._trace:
                requests_log.debug("%s: %s", self._peer, request.describe())
            if not self._refuse(request, 0):
                self._dispatch(request)
            if conn.reading_paused:
                return

    def _refuse(self, r: Request, payload: int) -> bool:
        """Validate; a refused request is answered here (its payload dropped)."""
        try:
            self._validate(r)
        except RequestFailed as exc:
            if payload:
                if payload > p.MAX_DISCARD:
                    raise ProtocolError(f"{self._peer}: refused payload of {payload} bytes "
                                        "is too large to skip; closing") from None
                self._discard = payload
            self._reply_error(r, nbd_error(exc, f"{self._peer}: {r.describe()}"))
            return True
        return False

    def _receive_payload(self, r: Request) -> None:
        """A large write: its payload goes from the socket straight into its buffer."""
        data = bytearray(r.length)
        self._hold(r.length)
        self._pending = (r, data)
        if self._conn.receive_into(memoryview(data)):
            self._payload_complete()

    def payload_received(self) -> None:
        """The connection filled the payload buffer (from a later read)."""
        self._payload_complete()
        self.process()

    def _payload_complete(self) -> None:
        assert self._pending is not None
        r, data = self._pending
        self._pending = None
        self._release(r.length)
        self._write(r, memoryview(data), True)

    def end_of_stream(self) -> None:
        if self._pending is not None:
            log.warning("%s: connection closed inside a write payload", self._peer)
        elif self._conn.pending():
            log.warning("%s: connection closed inside a request", self._peer)
        self._finish()

    # -- validation ------------------------------------------------------------------

    def _validate(self, r: Request) -> None:
        """Refuse before any work: the layers only ever see valid requests."""
        try:
            cmd = p.Cmd(r.cmd)
        except ValueError:
            raise RequestFailed(p.Err.EINVAL, "unknown command") from None
        allowed = p.ALLOWED_CMD_FLAGS.get(cmd)
        if allowed is None:
            raise RequestFailed(p.Err.EINVAL, "unsupported command")
        if r.flags & ~allowed:
            raise RequestFailed(p.Err.EINVAL, "flag not allowed for this command")
        if r.flags & p.CMD_FLAG_DF and not self._structured:
            raise RequestFailed(p.Err.EINVAL, "NBD_CMD_FLAG_DF needs structured replies")
        if r.flags & p.CMD_FLAG_FAST_ZERO and not self._caps.fast_zero:
            raise RequestFailed(p.Err.EINVAL, "fast zero was not advertised")
        if cmd == p.Cmd.FLUSH:
            if r.offset or r.length:
                raise RequestFailed(p.Err.EINVAL, "NBD_CMD_FLUSH with offset or length")
            return
        if cmd in _WRITE_LIKE and not self._caps.writable:
            raise RequestFailed(p.Err.EPERM, "the export is read-only")
        if r.length == 0:
            raise RequestFailed(p.Err.EINVAL, "zero length")
        if r.offset + r.length > self._size:
            error = p.Err.ENOSPC if cmd in (p.Cmd.WRITE, p.Cmd.WRITE_ZEROES) else p.Err.EINVAL
            raise RequestFailed(error, f"past the end of the {self._size} byte export")
        if cmd in (p.Cmd.READ, p.Cmd.WRITE) and r.length > p.MAX_PAYLOAD:
            raise RequestFailed(p.Err.EINVAL if cmd == p.Cmd.WRITE else p.Err.EOVERFLOW,
                                f"over the {p.MAX_PAYLOAD} byte maximum")
        if cmd == p.Cmd.BLOCK_STATUS and not self._neg.contexts:
            raise RequestFailed(p.Err.EINVAL, "no meta context was negotiated")

    # -- execution -------------------------------------------------------------------

    def _write(self, r: Request, data: memoryview, owned: bool) -> None:
        if self._trace:
            requests_log.debug("%s: %s", self._peer, r.describe())
        # What _validate checks of a WRITE, written out for the common case; anything
        # else goes through it for its error.
        if not (self._caps.writable and not r.flags & _NOT_WRITE_FLAGS
                and 0 < r.length <= p.MAX_PAYLOAD and r.offset + r.length <= self._size) \
                and self._refuse(r, 0):
            return
        try:
            if self._layer.write_now(data, r.offset, bool(r.flags & _FUA)):
                self._reply_ok(r)
                return
        except Exception as exc:    # every failure becomes an NBD error reply
            self._reply_error(r, nbd_error(exc, f"{self._peer}: {r.describe()}"))
            return
        length = len(data)
        self._hold(length)
        self._later += 1
        started = False
        try:
            started = self._layer.write_later(
                data, r.offset, bool(r.flags & _FUA),
                lambda result, error: self._answered(r, length, error))
        except Exception as exc:
            self._reply_error(r, nbd_error(exc, f"{self._peer}: {r.describe()}"))
            self._later_done(length)
            return
        if started:
            return
        self._later_done(length)
        payload = data if owned else memoryview(bytearray(data))  # the buffer moves on
        self._start(r, payload, len(payload))

    def _answered(self, r: Request, held: int, error: BaseException | None) -> None:
        """A write started by ``write_later`` is over: its reply leaves with the turn."""
        if error is None:
            self._reply_ok(r)
        else:
            self._reply_error(r, nbd_error(error, f"{self._peer}: {r.describe()}"))
        self._send_out_soon()
        self._later_done(held)

    def _later_done(self, held: int) -> None:
        self._later -= 1
        self._release(held)
        if not self._later:
            waiter, self._later_idle = self._later_idle, None
            if waiter is not None and not waiter.done():
                waiter.set_result(None)
            if self._done and not self._tasks:
                self._settle()

    def _dispatch(self, r: Request) -> None:
        if r.cmd == _READ:
            self._read(r)
            return
        if r.cmd == p.Cmd.BLOCK_STATUS and all(
                c == p.META_BASE_ALLOCATION for c in self._neg.contexts.values()):
            try:
                self._reply_block_status(r, [self._allocation(r)])
            except Exception as exc:
                self._reply_error(r, nbd_error(exc, f"{self._peer}: {r.describe()}"))
            return
        self._start(r, None, 0)

    def _read(self, r: Request) -> None:
        head = 8 + p.STRUCTURED_REPLY.size if self._structured else p.SIMPLE_REPLY.size
        reply = bytearray(head + r.length)
        try:
            done = self._layer.read_now(memoryview(reply)[head:], r.offset)
        except Exception as exc:
            self._reply_error(r, nbd_error(exc, f"{self._peer}: {r.describe()}"))
            return
        if not done:
            self._start(r, None, r.length)
            return
        self._fill_read_header(reply, r)
        self._emit(reply)

    def _start(self, r: Request, data: memoryview | None, holds: int) -> None:
        self._hold(holds)
        task = asyncio.get_running_loop().create_task(self._run(r, data, holds))
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task) -> None:
        self._tasks.discard(task)
        if self._done and not self._tasks and not self._later:
            self._settle()

    async def _run(self, r: Request, data: memoryview | None, holds: int) -> None:
        try:
            await self._execute(r, data)
        except Exception as exc:     # every failure becomes an NBD error reply
            self._reply_error(r, nbd_error(exc, f"{self._peer}: {r.describe()}"))
        finally:
            self._send_out_soon()
            self._release(holds)

    async def _execute(self, r: Request, data: memoryview | None) -> None:
        fua = bool(r.flags & _FUA)
        layer = self._layer
        cmd = r.cmd
        if cmd == _READ:
            head = 8 + p.STRUCTURED_REPLY.size if self._structured else p.SIMPLE_REPLY.size
            reply = bytearray(head + r.length)
            await layer.read(memoryview(reply)[head:], r.offset)
            self._fill_read_header(reply, r)
            self._emit(reply)
            return
        if cmd == _WRITE:
            assert data is not None
            await layer.write(data, r.offset, fua)
        elif cmd == p.Cmd.FLUSH:
            await layer.flush()
        elif cmd == p.Cmd.TRIM:
            await layer.trim(r.offset, r.length, fua)
        elif cmd == p.Cmd.WRITE_ZEROES:
            await layer.zero(r.offset, r.length, fua,
                             may_trim=not r.flags & p.CMD_FLAG_NO_HOLE,
                             fast=bool(r.flags & p.CMD_FLAG_FAST_ZERO))
        elif cmd == p.Cmd.BLOCK_STATUS:
            parts = []
            for context in self._neg.contexts.values():
                if context == p.META_BASE_ALLOCATION:
                    parts.append(self._allocation(r))
                else:
                    parts.append(self._limit(r, await layer.context_extents(
                        context, r.offset, r.length)))
            self._reply_block_status(r, parts)
            return
        else:
            raise RequestFailed(p.Err.EINVAL, "no handler")   # _validate lets none through
        self._reply_ok(r)

    # -- flow control ----------------------------------------------------------------

    def _hold(self, n: int) -> None:
        self._held += n
        if self._held > p.MAX_INFLIGHT_BYTES:
            self._conn.pause_reading("payload")

    def _release(self, n: int) -> None:
        self._held -= n
        if self._held <= p.MAX_INFLIGHT_BYTES:
            self._conn.resume_reading("payload")

    def _finish(self, abort: bool = False) -> None:
        """No more requests will be read: answer what runs, then end the connection."""
        if self._done:
            return
        self._done = True
        if abort:
            self._conn.abort()
        if not self._tasks and not self._later:
            self._settle()

    def _settle(self) -> None:
        self._send_out()
        if not self.finished.done():
            self.finished.set_result(None)

    async def drain(self) -> None:
        """Wait for every request in flight to finish and be answered."""
        while self._tasks or self._later:
            if self._tasks:
                await asyncio.gather(*list(self._tasks), return_exceptions=True)
                continue
            if self._later_idle is None:
                self._later_idle = asyncio.get_running_loop().create_future()
            await self._later_idle

    # -- replies ---------------------------------------------------------------------

    def _emit(self, data: bytes | bytearray) -> None:
        """Queue one whole reply; large ones go out at once, small ones with the turn."""
        if len(data) >= 64 * 1024:
            self._send_out()
            self._conn.write(data)
        else:
            self._out += data

    def _send_out(self) -> None:
        if self._out:
            self._conn.write(self._out)
            self._out = bytearray()

    def _send_out_soon(self) -> None:
        """A task's reply leaves at the end of this loop turn, with the replies of every
        other task answered in it (replicated writes end together, on one ack batch):
        one write to the socket, not one per request."""
        if not self._out_scheduled:
            self._out_scheduled = True
            asyncio.get_running_loop().call_soon(self._send_out_scheduled)

    def _send_out_scheduled(self) -> None:
        self._out_scheduled = False
        self._send_out()

    def _fill_read_header(self, reply: bytearray, r: Request) -> None:
        if self._structured:
            p.STRUCTURED_REPLY.pack_into(reply, 0, p.STRUCTURED_REPLY_MAGIC, p.REPLY_FLAG_DONE,
                                         p.ReplyType.OFFSET_DATA, r.cookie, 8 + r.length)
            _OFFSET.pack_into(reply, p.STRUCTURED_REPLY.size, r.offset)
        else:
            p.SIMPLE_REPLY.pack_into(reply, 0, p.SIMPLE_REPLY_MAGIC, 0, r.cookie)

    def _reply_ok(self, r: Request) -> None:
        if self._structured:
            self._emit(p.STRUCTURED_REPLY.pack(p.STRUCTURED_REPLY_MAGIC, p.REPLY_FLAG_DONE,
                                               p.ReplyType.NONE, r.cookie, 0))
        else:
            self._emit(p.SIMPLE_REPLY.pack(p.SIMPLE_REPLY_MAGIC, 0, r.cookie))

    def _reply_error(self, r: Request, error: p.Err) -> None:
        if self._structured:
            message = p.name(p.Err, error).encode()
            body = p.ERROR_CHUNK.pack(error, len(message)) + message
            self._emit(p.STRUCTURED_REPLY.pack(p.STRUCTURED_REPLY_MAGIC, p.REPLY_FLAG_DONE,
                                               p.ReplyType.ERROR, r.cookie, len(body)) + body)
        else:
            self._emit(p.SIMPLE_REPLY.pack(p.SIMPLE_REPLY_MAGIC, error, r.cookie))

    def _reply_block_status(self, r: Request, parts: list[list[tuple[int, int]]]) -> None:
        contexts = list(self._neg.contexts)
        reply = bytearray()
        for i, (context_id, runs) in enumerate(zip(contexts, parts)):
            body = context_id.to_bytes(4, "big") + b"".join(
                p.EXTENT.pack(n, flags) for n, flags in runs)
            last = i == len(contexts) - 1
            reply += p.STRUCTURED_REPLY.pack(p.STRUCTURED_REPLY_MAGIC,
                                             p.REPLY_FLAG_DONE if last else 0,
                                             p.ReplyType.BLOCK_STATUS, r.cookie, len(body))
            reply += body
        self._emit(reply)

    def _allocation(self, r: Request) -> list[tuple[int, int]]:
        hole = p.STATE_HOLE | p.STATE_ZERO
        return self._limit(r, [(n, hole if is_hole else 0)
                               for n, is_hole in self._layer.extents(r.offset, r.length)])

    @staticmethod
    def _limit(r: Request, runs: list[tuple[int, int]]) -> list[tuple[int, int]]:
        runs = runs[:p.MAX_EXTENTS]
        if r.flags & p.CMD_FLAG_REQ_ONE:
            runs = runs[:1]
        return runs or [(r.length, 0)]
