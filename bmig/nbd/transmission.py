"""Transmission phase: read a request, validate it, run it through the layers, reply.

Requests on one connection run concurrently (NBD allows replies in any order); each reply
is written in one piece, so replies never interleave. Payload bytes held at once are
capped per connection. Errors are errnos until the reply is built; ``nbd_error`` is the
one place that turns them into the NBD error set, after logging the real cause.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import struct
from dataclasses import dataclass

from bmig.errors import ProtocolError
from bmig.nbd import protocol as p
from bmig.nbd.handshake import Negotiated
from bmig.nbd.layers.base import Capabilities, Layer
from bmig.nbd.layers.track import TrackingFailed

log = logging.getLogger("bmig-nbd")
requests_log = logging.getLogger("bmig-nbd.requests")   # one debug line per accepted request

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
_DESCRIPTOR = struct.Struct(">II")
_DISCARD_STEP = 1024 * 1024


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
    if isinstance(exc, OSError):
        error = _ERRNO_TO_NBD.get(exc.errno or 0, p.Err.EIO)
        log.error("%s: %s", what, exc)
        return error
    log.exception("%s: unexpected failure", what)
    return p.Err.EIO


@dataclass(frozen=True)
class Request:
    flags: int
    cmd: int
    cookie: int
    offset: int
    length: int

    def describe(self) -> str:
        return f"{p.name(p.Cmd, self.cmd)} {self.offset}+{self.length} flags={self.flags:#x}"


class Transmission:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 layer: Layer, negotiated: Negotiated, peer: str):
        self._r = reader
        self._w = writer
        self._layer = layer
        self._caps: Capabilities = layer.capabilities()
        self._size = layer.size
        self._neg = negotiated
        self._peer = peer
        self._tasks: set[asyncio.Task] = set()
        self._held = 0
        self._room = asyncio.Condition()

    async def run(self) -> None:
        """Serve requests until NBD_CMD_DISC, end of stream or broken framing."""
        try:
            while True:
                try:
                    header = await self._r.readexactly(p.REQUEST.size)
                except asyncio.IncompleteReadError as exc:
                    if exc.partial:
                        log.warning("%s: connection closed inside a request header",
                                    self._peer)
                    return
                magic, flags, cmd, cookie, offset, length = p.REQUEST.unpack(header)
                if magic != p.REQUEST_MAGIC:
                    raise ProtocolError(f"{self._peer}: bad request magic {magic:#x}")
                request = Request(flags, cmd, cookie, offset, length)
                if cmd == p.Cmd.DISC:
                    log.debug("%s: NBD_CMD_DISC", self._peer)
                    return
                await self._accept(request)
        finally:
            await self.drain()

    async def drain(self) -> None:
        """Wait for every request in flight to finish and be answered."""
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _accept(self, request: Request) -> None:
        payload_length = request.length if request.cmd == p.Cmd.WRITE else 0
        try:
            self._validate(request)
        except RequestFailed as exc:
            if payload_length:
                await self._discard(payload_length)
            await self._reply_error(request, nbd_error(exc, f"{self._peer}: "
                                                             f"{request.describe()}"))
            return
        holds = payload_length or (request.length if request.cmd == p.Cmd.READ else 0)
        await self._reserve(holds)
        data = None
        if payload_length:
            data = bytearray(payload_length)
            view = memoryview(data)
            got = 0
            while got < payload_length:     # readexactly would copy; fill in place
                chunk = await self._r.read(payload_length - got)
                if not chunk:
                    await self._release(holds)
                    raise asyncio.IncompleteReadError(bytes(view[:got]), payload_length)
                view[got:got + len(chunk)] = chunk
                got += len(chunk)
        if requests_log.isEnabledFor(logging.DEBUG):
            requests_log.debug("%s: %s", self._peer, request.describe())
        task = asyncio.get_running_loop().create_task(self._run(request, data, holds))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

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
        if r.flags & p.CMD_FLAG_DF and not self._neg.structured:
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

    async def _discard(self, length: int) -> None:
        """Read and drop a refused payload, bounded; past the bound we cannot resync."""
        if length > p.MAX_DISCARD:
            raise ProtocolError(f"{self._peer}: refused payload of {length} bytes is too "
                                "large to skip; closing")
        while length:
            chunk = await self._r.read(min(length, _DISCARD_STEP))
            if not chunk:
                raise asyncio.IncompleteReadError(b"", length)
            length -= len(chunk)

    async def _reserve(self, n: int) -> None:
        async with self._room:
            await self._room.wait_for(lambda: self._held == 0
                                      or self._held + n <= p.MAX_INFLIGHT_BYTES)
            self._held += n

    async def _release(self, n: int) -> None:
        async with self._room:
            self._held -= n
            self._room.notify_all()

    async def _run(self, r: Request, data: bytearray | None, holds: int) -> None:
        try:
            try:
                await self._execute(r, data)
            except Exception as exc:     # every failure becomes an NBD error reply
                await self._reply_error(r, nbd_error(exc, f"{self._peer}: {r.describe()}"))
        except (ConnectionError, asyncio.IncompleteReadError):
            log.debug("%s: client gone before the reply", self._peer)
        finally:
            await self._release(holds)

    async def _execute(self, r: Request, data: bytearray | None) -> None:
        fua = bool(r.flags & p.CMD_FLAG_FUA)
        cmd = r.cmd
        if cmd == p.Cmd.READ:
            buf = bytearray(r.length)
            await self._layer.read(memoryview(buf), r.offset)
            await self._reply_read(r, buf)
            return
        if cmd == p.Cmd.WRITE:
            assert data is not None
            await self._layer.write(memoryview(data), r.offset, fua)
        elif cmd == p.Cmd.FLUSH:
            await self._layer.flush()
        elif cmd == p.Cmd.TRIM:
            await self._layer.trim(r.offset, r.length, fua)
        elif cmd == p.Cmd.WRITE_ZEROES:
            await self._layer.zero(r.offset, r.length, fua,
                                   may_trim=not r.flags & p.CMD_FLAG_NO_HOLE,
                                   fast=bool(r.flags & p.CMD_FLAG_FAST_ZERO))
        elif cmd == p.Cmd.BLOCK_STATUS:
            await self._reply_block_status(r)
            return
        else:
            raise RequestFailed(p.Err.EINVAL, "no handler")   # _validate lets none through
        await self._reply_ok(r)

    # -- replies ---------------------------------------------------------------------

    def _send(self, *parts: bytes | bytearray | memoryview) -> None:
        """Write one reply in one piece (no await inside, so replies never interleave)."""
        self._w.writelines(parts)

    async def _reply_ok(self, r: Request) -> None:
        if self._neg.structured:
            self._send(p.STRUCTURED_REPLY.pack(p.STRUCTURED_REPLY_MAGIC, p.REPLY_FLAG_DONE,
                                               p.ReplyType.NONE, r.cookie, 0))
        else:
            self._send(p.SIMPLE_REPLY.pack(p.SIMPLE_REPLY_MAGIC, 0, r.cookie))
        await self._w.drain()

    async def _reply_read(self, r: Request, buf: bytearray) -> None:
        if self._neg.structured:
            self._send(p.STRUCTURED_REPLY.pack(p.STRUCTURED_REPLY_MAGIC, p.REPLY_FLAG_DONE,
                                               p.ReplyType.OFFSET_DATA, r.cookie,
                                               8 + len(buf)),
                       r.offset.to_bytes(8, "big"), buf)
        else:
            self._send(p.SIMPLE_REPLY.pack(p.SIMPLE_REPLY_MAGIC, 0, r.cookie), buf)
        await self._w.drain()

    async def _reply_error(self, r: Request, error: p.Err) -> None:
        if self._neg.structured:
            message = p.name(p.Err, error).encode()
            body = struct.pack(">IH", error, len(message)) + message
            self._send(p.STRUCTURED_REPLY.pack(p.STRUCTURED_REPLY_MAGIC, p.REPLY_FLAG_DONE,
                                               p.ReplyType.ERROR, r.cookie, len(body)), body)
        else:
            self._send(p.SIMPLE_REPLY.pack(p.SIMPLE_REPLY_MAGIC, error, r.cookie))
        await self._w.drain()

    async def _reply_block_status(self, r: Request) -> None:
        contexts = list(self._neg.contexts.items())
        for i, (context_id, context) in enumerate(contexts):
            runs = self._extents(context, r)
            body = b"".join([context_id.to_bytes(4, "big")]
                            + [_DESCRIPTOR.pack(n, flags) for n, flags in runs])
            last = i == len(contexts) - 1
            self._send(p.STRUCTURED_REPLY.pack(p.STRUCTURED_REPLY_MAGIC,
                                               p.REPLY_FLAG_DONE if last else 0,
                                               p.ReplyType.BLOCK_STATUS, r.cookie, len(body)),
                       body)
        await self._w.drain()

    def _extents(self, context: str, r: Request) -> list[tuple[int, int]]:
        if context != p.META_BASE_ALLOCATION:
            raise RequestFailed(p.Err.EINVAL, f"no extents for {context}")
        hole = p.STATE_HOLE | p.STATE_ZERO
        runs = [(n, hole if is_hole else 0)
                for n, is_hole in self._layer.extents(r.offset, r.length)][:p.MAX_EXTENTS]
        if r.flags & p.CMD_FLAG_REQ_ONE:
            runs = runs[:1]
        return runs or [(r.length, 0)]
