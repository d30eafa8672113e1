"""Reading the NBD client's replies: simple replies and structured reply chunks,
each checked before anything is read or allocated for it, and accounted to its request.

``Replies`` owns the table of requests in flight (by cookie) and of answers not yet
collected; bmig.nbdclient.transmission puts requests in and takes answers out. Any
failure while reading leaves the stream mid-message, so it breaks the connection
(bmig.nbdclient.connection).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from bmig.errors import BmigError
from bmig.nbd import protocol as p
from bmig.limits import MAX_NBD_ERROR_CHUNK as _MAX_ERROR_CHUNK
from bmig.nbdclient.connection import NbdSocket
from bmig.nbdclient.errors import NbdError, describe, errno_name, printable

_U32 = struct.Struct(">I")
_U64 = struct.Struct(">Q")
_ZEROES = memoryview(bytes(1 << 20))


@dataclass(slots=True)
class Request:
    """One request on the wire, and what its reply chunks have said so far."""

    cmd: p.Cmd
    flags: int
    offset: int
    length: int
    buf: memoryview | None = None            # NBD_CMD_READ: where the data goes
    context_id: int | None = None            # NBD_CMD_BLOCK_STATUS: the context we want
    extents: list[tuple[int, int]] | None = None
    covered: int = 0                         # NBD_CMD_READ: bytes of data and holes received
    error: int = 0
    message: str = ""


class Replies:
    """Requests in flight and answers not yet collected, and the reading of replies."""

    def __init__(self, conn: NbdSocket, structured: bool, contexts: dict[str, int],
                 chunk_cap: int):
        self.conn = conn
        self.address = conn.address
        self.structured = structured
        self.contexts = contexts
        self.chunk_cap = chunk_cap         # the longest reply chunk taken
        self.pending: dict[int, Request] = {}
        self.results: dict[int, NbdError | None] = {}
        self._head = memoryview(bytearray(p.STRUCTURED_REPLY.size))

    def take_results(self) -> dict[int, NbdError | None]:
        """Every answer not yet collected, collected now."""
        results, self.results = self.results, {}
        return results

    def _protocol(self, message: str) -> BmigError:
        return self.conn.protocol(message)

    def read_one(self) -> None:
        """Read one simple reply or one structured chunk and account it to its request.
        Any failure here leaves the stream mid-message, so it ends the connection."""
        try:
            head = self._head
            self.conn.recv_into(head[:p.SIMPLE_REPLY.size])
            (magic,) = _U32.unpack_from(head)
            if magic == p.SIMPLE_REPLY_MAGIC:
                _, error, cookie = p.SIMPLE_REPLY.unpack_from(head)
                self._on_simple(cookie, error)
            elif magic == p.STRUCTURED_REPLY_MAGIC and self.structured:
                self.conn.recv_into(head[p.SIMPLE_REPLY.size:])
                _, flags, kind, cookie, length = p.STRUCTURED_REPLY.unpack_from(head)
                self._on_chunk(cookie, flags, kind, length)
            elif magic == p.STRUCTURED_REPLY_MAGIC:
                raise self._protocol("structured reply chunk, but structured replies were "
                                     "not negotiated")
            else:
                raise self._protocol(f"bad reply magic {magic:#010x}")
        except BaseException as exc:
            if self.conn.broken is None:
                self.conn.fail(exc)
            raise

    def _request_for(self, cookie: int) -> Request:
        req = self.pending.get(cookie)
        if req is None:
            raise self._protocol(f"reply for cookie {cookie}, which has no request in flight")
        return req

    def _on_simple(self, cookie: int, error: int) -> None:
        req = self._request_for(cookie)
        if req.cmd == p.Cmd.READ:
            if self.structured:
                raise self._protocol("simple reply to NBD_CMD_READ although structured "
                                     "replies were negotiated")
            if not error:
                assert req.buf is not None
                self.conn.recv_into(req.buf)
                req.covered = req.length
        req.error = error
        self._finish(cookie, req)

    def _on_chunk(self, cookie: int, flags: int, kind: int, length: int) -> None:
        req = self._request_for(cookie)
        if length > self.chunk_cap:
            raise self._protocol(f"reply chunk of {length} bytes exceeds the limit of "
                                 f"{self.chunk_cap}")
        if kind == p.ReplyType.NONE:
            if length or not flags & p.REPLY_FLAG_DONE:
                raise self._protocol("NBD_REPLY_TYPE_NONE with a payload or without DONE")
        elif kind == p.ReplyType.OFFSET_DATA:
            self._on_data(req, length)
        elif kind == p.ReplyType.OFFSET_HOLE:
            self._on_hole(req, length)
        elif kind == p.ReplyType.BLOCK_STATUS:
            self._on_extents(req, length)
        elif kind & p.REPLY_TYPE_ERR_BIT:
            self._on_error(req, kind, length)
        else:
            raise self._protocol(f"unknown reply chunk type {p.name(p.ReplyType, kind)}")
        if flags & p.REPLY_FLAG_DONE:
            self._finish(cookie, req)

    def _content_target(self, req: Request, kind: str, offset: int, n: int) -> memoryview:
        if req.cmd != p.Cmd.READ:
            raise self._protocol(f"{kind} chunk in reply to {p.name(p.Cmd, req.cmd)}")
        start = offset - req.offset
        if start < 0 or start + n > req.length:
            raise self._protocol(f"{kind} chunk at offset {offset} of {n} bytes lies outside "
                                 f"the read of {req.length} bytes at offset {req.offset}")
        req.covered += n
        assert req.buf is not None
        return req.buf[start:start + n]

    def _on_data(self, req: Request, length: int) -> None:
        if length <= _U64.size:
            raise self._protocol(f"NBD_REPLY_TYPE_OFFSET_DATA of {length} bytes")
        (offset,) = _U64.unpack(self.conn.recv(_U64.size))
        self.conn.recv_into(self._content_target(req, "OFFSET_DATA", offset,
                                                  length - _U64.size))

    def _on_hole(self, req: Request, length: int) -> None:
        if length != p.OFFSET_HOLE.size:
            raise self._protocol(f"NBD_REPLY_TYPE_OFFSET_HOLE of {length} bytes (must be 12)")
        offset, size = p.OFFSET_HOLE.unpack(self.conn.recv(p.OFFSET_HOLE.size))
        if size == 0:
            raise self._protocol("NBD_REPLY_TYPE_OFFSET_HOLE of size 0")
        target = self._content_target(req, "OFFSET_HOLE", offset, size)
        for start in range(0, size, len(_ZEROES)):
            n = min(len(_ZEROES), size - start)
            target[start:start + n] = _ZEROES[:n]

    def _on_extents(self, req: Request, length: int) -> None:
        if req.cmd != p.Cmd.BLOCK_STATUS:
            raise self._protocol(f"BLOCK_STATUS chunk in reply to {p.name(p.Cmd, req.cmd)}")
        if length < _U32.size + p.EXTENT.size or (length - _U32.size) % p.EXTENT.size:
            raise self._protocol(f"NBD_REPLY_TYPE_BLOCK_STATUS of {length} bytes")
        data = self.conn.recv(length)
        (context_id,) = _U32.unpack_from(data)
        if req.context_id is not None and context_id != req.context_id:
            if context_id not in self.contexts.values():
                raise self._protocol(f"block status for unknown meta context id {context_id}")
            return  # another negotiated context: not asked for
        if req.extents is not None:
            raise self._protocol(f"two block status chunks for meta context id {context_id}")
        extents = list(p.EXTENT.iter_unpack(memoryview(data)[_U32.size:]))
        if any(n == 0 for n, _ in extents):
            raise self._protocol("block status extent of length 0")
        req.extents = extents

    def _on_error(self, req: Request, kind: int, length: int) -> None:
        if length < p.ERROR_CHUNK.size or length > _MAX_ERROR_CHUNK:
            raise self._protocol(f"error chunk of {length} bytes")
        data = self.conn.recv(length)
        error, size = p.ERROR_CHUNK.unpack_from(data)
        tail = _U64.size if kind == p.ReplyType.ERROR_OFFSET else 0
        if size > length - p.ERROR_CHUNK.size - tail or error == 0:
            raise self._protocol(f"malformed error chunk (error {error}, message of {size} "
                                 f"bytes in {length})")
        message = printable(data[p.ERROR_CHUNK.size:p.ERROR_CHUNK.size + size])
        if kind == p.ReplyType.ERROR_OFFSET:
            (offset,) = _U64.unpack_from(data, p.ERROR_CHUNK.size + size)
            if req.length and not req.offset <= offset < req.offset + req.length:
                raise self._protocol(f"error offset {offset} lies outside the request")
            message = f"at offset {offset}: {message}" if message else f"at offset {offset}"
        if not req.error:
            req.error, req.message = error, message

    def _finish(self, cookie: int, req: Request) -> None:
        del self.pending[cookie]
        if req.error:
            self.results[cookie] = NbdError(req.error, self._failure(req))
            return
        if req.cmd == p.Cmd.READ and req.covered != req.length:
            raise self._protocol(f"read of {req.length} bytes at offset {req.offset} answered "
                                 f"with {req.covered} bytes of data and holes")
        if req.cmd == p.Cmd.BLOCK_STATUS and req.extents is None:
            raise self._protocol("block status answered without extents for the context")
        self.results[cookie] = None

    def _failure(self, req: Request) -> str:
        text = (f"{describe(req.cmd, req.offset, req.length)} failed on {self.address}: "
                f"{errno_name(req.error)}")
        if req.error not in p.Err.__members__.values():
            text += f" (unknown error {req.error})"
        return f"{text}: {req.message}" if req.message else text
