"""The NBD client in transmission phase: ``NbdClient``.

Requests: reads, writes, flushes, trims, zeroes and block status, blocking or pipelined
(many requests in flight on one connection, replies matched by cookie in whatever order
they arrive; bmig.nbdclient.replies reads them). Used as a workload generator and as a
replication target's writer. One client belongs to one thread. ``NbdClient.connect``
opens the socket (bmig.nbdclient.connection) and negotiates (bmig.nbdclient.handshake)
first.

Every length the server sends is checked before anything is allocated for it, and every
request is checked before it is sent, the way libnbd's strict mode does it: it must fit the
export and its block size constraints and use only what the server advertised. Setting
``strict = False`` turns those checks off so that a test can send what a careful client
never would; what the wire format itself needs (64-bit offsets, 32-bit lengths) stays.

A broken connection (lost, timed out, or a server that broke the protocol) is closed at
once and every later call raises the error that broke it.
"""

from __future__ import annotations

import itertools
import ssl
from typing import Any, Iterator, Sequence

from bmig.errors import BmigError, UnreachableError
from bmig.nbd import protocol as p
from bmig.nbdclient import handshake
from bmig.nbdclient.connection import NbdSocket
from bmig.nbdclient.errors import NbdError, describe
from bmig.limits import NBD_CHUNK_HEADROOM as _CHUNK_HEADROOM
from bmig.nbdclient.replies import Replies, Request
from bmig.nbdclient.uri import NbdAddress, check_name, parse_uri

# -- limits of this client --------------------------------------------------------------------

MAX_IN_FLIGHT = 256                     # requests on the wire at once; submit waits beyond
_MAX_U32 = 0xFFFFFFFF
_MAX_U64 = 0xFFFFFFFFFFFFFFFF
_MAX_NO_PAYLOAD = 1 << 31               # trim and block status pieces: 32 bits, any alignment

_WRITE_LIKE = (p.Cmd.WRITE, p.Cmd.TRIM, p.Cmd.WRITE_ZEROES)


class NbdClient:
    """One NBD connection. Build it with connect(); close it, or use it as a context
    manager (which waits for outstanding requests first when the block ends normally).

    The answer to every submitted cookie is kept until wait() or wait_all() collects it."""

    def __init__(self, conn: NbdSocket, agreed: handshake.Negotiated):
        self.address = conn.address
        self._conn = conn
        self.strict = True
        self.max_in_flight = MAX_IN_FLIGHT
        self.export = conn.address.export
        self.size = agreed.size
        self.flags = agreed.flags
        self.structured = agreed.structured
        self.contexts: dict[str, int] = agreed.contexts
        self.min_block_size = agreed.min_block_size
        self.preferred_block_size = agreed.preferred_block_size
        self.max_block_size = agreed.max_block_size
        self._no_zeroes = agreed.no_zeroes
        self._closed = False
        self._cookies = itertools.count(1)
        # Reads and writes are cut at the maximum block size, and at our payload cap when
        # the server has no limit; a reply chunk may carry one such piece.
        self._max_request = min(self.max_block_size, p.MAX_PAYLOAD)
        self._replies = Replies(conn, self.structured, self.contexts,
                                self._max_request + _CHUNK_HEADROOM)
        self._pending = self._replies.pending      # by cookie: sent, reply not read yet
        conn.on_broken = self._pending.clear       # nothing in flight is answered now
        conn.in_flight = lambda: len(self._pending)

    @classmethod
    def connect(cls, uri_or_address: str | NbdAddress, *, timeout: float | None = 30.0,
                meta_contexts: Sequence[str] = (), tls_context: ssl.SSLContext | None = None,
                structured: bool = True) -> "NbdClient":
        """Connect and negotiate; the client is in transmission phase when it returns."""
        address = (uri_or_address if isinstance(uri_or_address, NbdAddress)
                   else parse_uri(uri_or_address))
        contexts = (meta_contexts,) if isinstance(meta_contexts, str) else tuple(meta_contexts)
        for name in contexts:
            check_name("meta context", name)
        conn = NbdSocket.open(address, timeout)
        try:
            agreed = handshake.negotiate(conn, contexts, tls_context, structured)
        except BaseException:
            handshake.abort(conn)
            raise
        return cls(conn, agreed)

    # -- what the server offers ----------------------------------------------------------

    def _flag(self, bit: int) -> bool:
        return bool(self.flags & bit)

    @property
    def read_only(self) -> bool:
        return self._flag(p.FLAG_READ_ONLY)

    @property
    def can_flush(self) -> bool:
        return self._flag(p.FLAG_SEND_FLUSH)

    @property
    def can_fua(self) -> bool:
        return self._flag(p.FLAG_SEND_FUA)

    @property
    def can_trim(self) -> bool:
        return self._flag(p.FLAG_SEND_TRIM)

    @property
    def can_zero(self) -> bool:
        return self._flag(p.FLAG_SEND_WRITE_ZEROES)

    @property
    def can_fast_zero(self) -> bool:
        return self._flag(p.FLAG_SEND_FAST_ZERO)

    @property
    def can_multi_conn(self) -> bool:
        return self._flag(p.FLAG_CAN_MULTI_CONN)

    @property
    def timeout(self) -> float | None:
        """Seconds any one socket operation may take (None: no limit)."""
        return self._conn.timeout

    @timeout.setter
    def timeout(self, seconds: float | None) -> None:
        self._conn.timeout = seconds

    @property
    def in_flight(self) -> int:
        """Requests sent whose reply has not been read yet."""
        return len(self._pending)

    @property
    def outstanding(self) -> int:
        """Requests submitted and not yet waited for (in flight, or answered and kept)."""
        return len(self._pending) + len(self._replies.results)

    def __repr__(self) -> str:
        return f"<NbdClient {self.address} size={self.size} flags={self.flags:#x}>"

    # -- blocking I/O -----------------------------------------------------------------------

    def pread(self, length: int, offset: int) -> bytes:
        if length < 0:
            raise self._refuse(p.Err.EINVAL, p.Cmd.READ, offset, length, "negative length")
        buf = bytearray(length)
        self.pread_into(buf, offset)
        return bytes(buf)

    def pread_into(self, buf: memoryview | bytearray, offset: int) -> None:
        """Fill ``buf`` from ``offset``; reads above the maximum block size are split.
        A read does not wait for writes still in flight: wait_all() first if it must."""
        view = _byte_view(buf)
        if view.readonly:
            raise TypeError("pread_into needs a writable buffer")
        if not len(view):
            return
        self._check(p.Cmd.READ, offset, len(view), 0, split=True)
        cookies = []
        try:
            for start, n in _pieces(offset, len(view), self._max_request):
                rel = start - offset
                cookies.append(self._submit(Request(p.Cmd.READ, 0, start, n,
                                                     buf=view[rel:rel + n])))
            self._wait_many(cookies)
        except NbdError:
            raise
        except BaseException as exc:
            if any(c in self._pending for c in cookies):  # their data would land in buf later
                self._conn.fail(exc)
            raise

    def pwrite(self, data: Any, offset: int, fua: bool = False) -> None:
        """Write ``data`` (any contiguous buffer) at ``offset``; big writes are split and the
        pieces pipelined."""
        view = _byte_view(data)
        if not len(view):
            return
        flags = p.CMD_FLAG_FUA if fua else 0
        self._check(p.Cmd.WRITE, offset, len(view), flags, split=True)
        cookies = [self._submit(Request(p.Cmd.WRITE, flags, start, n),
                                view[start - offset:start - offset + n])
                   for start, n in _pieces(offset, len(view), self._max_request)]
        self._wait_many(cookies)

    def flush(self) -> None:
        """Make every write answered so far durable. A flush covers only writes whose reply
        the server sent before it, so the replies of writes in flight are read first."""
        self._check(p.Cmd.FLUSH, 0, 0, 0)
        self._drain()
        self.wait(self.submit_flush())

    def trim(self, offset: int, length: int, fua: bool = False) -> None:
        self._ranged(p.Cmd.TRIM, offset, length, p.CMD_FLAG_FUA if fua else 0, _MAX_NO_PAYLOAD)

    def zero(self, offset: int, length: int, fua: bool = False, no_hole: bool = False,
             fast: bool = False) -> None:
        flags = ((p.CMD_FLAG_FUA if fua else 0) | (p.CMD_FLAG_NO_HOLE if no_hole else 0)
                 | (p.CMD_FLAG_FAST_ZERO if fast else 0))
        piece = min(self.max_block_size, _MAX_NO_PAYLOAD)
        self._ranged(p.Cmd.WRITE_ZEROES, offset, length, flags, piece)

    def block_status(self, offset: int, length: int,
                     context: str = p.META_BASE_ALLOCATION) -> list[tuple[int, int]]:
        """(length, flags) extents of ``context`` covering [offset, offset + length), asking
        again where a reply stops short; adjacent extents with equal flags are merged."""
        if self.strict and context not in self.contexts:
            raise self._refuse(p.Err.EINVAL, p.Cmd.BLOCK_STATUS, offset, length,
                               f"meta context {context!r} was not negotiated "
                               f"(pass meta_contexts=[{context!r}] to connect)")
        if length == 0:
            return []
        self._check(p.Cmd.BLOCK_STATUS, offset, length, 0, split=True)
        extents: list[tuple[int, int]] = []
        pos, end = offset, offset + length
        while pos < end:
            req = Request(p.Cmd.BLOCK_STATUS, 0, pos, min(end - pos, _MAX_NO_PAYLOAD),
                           context_id=self.contexts.get(context))
            self.wait(self._submit(req))
            for n, flags in req.extents or ():
                n = min(n, end - pos)
                if extents and extents[-1][1] == flags:
                    extents[-1] = (extents[-1][0] + n, flags)
                else:
                    extents.append((n, flags))
                pos += n
                if pos >= end:
                    break
        return extents

    # -- pipelined I/O ------------------------------------------------------------------------

    def submit_write(self, data: Any, offset: int, fua: bool = False) -> int:
        """Send one write and return its cookie; the buffer may be reused on return."""
        view = _byte_view(data)
        flags = p.CMD_FLAG_FUA if fua else 0
        self._check(p.Cmd.WRITE, offset, len(view), flags)
        return self._submit(Request(p.Cmd.WRITE, flags, offset, len(view)), view)

    def submit_zero(self, offset: int, length: int, fua: bool = False, no_hole: bool = False,
                    fast: bool = False) -> int:
        flags = ((p.CMD_FLAG_FUA if fua else 0) | (p.CMD_FLAG_NO_HOLE if no_hole else 0)
                 | (p.CMD_FLAG_FAST_ZERO if fast else 0))
        self._check(p.Cmd.WRITE_ZEROES, offset, length, flags)
        return self._submit(Request(p.Cmd.WRITE_ZEROES, flags, offset, length))

    def submit_trim(self, offset: int, length: int, fua: bool = False) -> int:
        flags = p.CMD_FLAG_FUA if fua else 0
        self._check(p.Cmd.TRIM, offset, length, flags)
        return self._submit(Request(p.Cmd.TRIM, flags, offset, length))

    def submit_flush(self) -> int:
        """A flush covers only writes already answered; see flush()."""
        self._check(p.Cmd.FLUSH, 0, 0, 0)
        return self._submit(Request(p.Cmd.FLUSH, 0, 0, 0))

    def wait(self, cookie: int) -> None:
        """Until the request of ``cookie`` is answered; raises NbdError if it failed."""
        results = self._replies.results
        while cookie not in results:
            self._check_usable()
            if cookie not in self._pending:
                raise ValueError(f"NBD cookie {cookie} is not outstanding")
            self._replies.read_one()
        error = results.pop(cookie)
        if error is not None:
            raise error

    def wait_all(self) -> None:
        """Until every request is answered; raises the first failure (by submission)."""
        self._drain()
        results = self._replies.take_results()
        failed = sorted(c for c, e in results.items() if e is not None)
        if failed:
            first = results[failed[0]]
            assert first is not None
            if len(failed) == 1:
                raise first
            raise NbdError(first.error, f"{first.message} (and {len(failed) - 1} more "
                           "requests failed)", from_server=first.from_server)

    # -- closing ------------------------------------------------------------------------------

    def close(self) -> None:
        """NBD_CMD_DISC (the server finishes what is in flight), then close. Idempotent."""
        if self._closed:
            return
        self._closed = True
        if self._conn.broken is None:
            try:
                self._conn.send(p.REQUEST.pack(p.REQUEST_MAGIC, 0, p.Cmd.DISC,
                                               next(self._cookies), 0, 0))
            except BmigError:
                pass
        self._conn.close()
        self._pending.clear()

    def __enter__(self) -> "NbdClient":
        return self

    def __exit__(self, exc_type: Any, *rest: Any) -> None:
        try:
            if exc_type is None and self._conn.broken is None and not self._closed:
                self.wait_all()
        finally:
            self.close()

    # -- requests -------------------------------------------------------------------------------

    def _check(self, cmd: p.Cmd, offset: int, length: int, flags: int,
               split: bool = False) -> None:
        """Refuse, before sending, what the wire cannot carry and (strict) what the server
        did not offer. ``split``: the caller cuts the range into pieces that fit."""
        if (offset < 0 or length < 0 or offset + length > _MAX_U64 + 1
                or (not split and length > _MAX_U32)):
            raise self._refuse(p.Err.EINVAL, cmd, offset, length,
                               "offset and length must fit 64 and 32 bits")
        if not self.strict:
            return
        if cmd in _WRITE_LIKE and self.read_only:
            raise self._refuse(p.Err.EPERM, cmd, offset, length, "the export is read-only")
        missing = {p.Cmd.FLUSH: (self.can_flush, "flush"), p.Cmd.TRIM: (self.can_trim, "trim"),
                   p.Cmd.WRITE_ZEROES: (self.can_zero, "write zeroes")}.get(cmd)
        if missing and not missing[0]:
            raise self._refuse(p.Err.ENOTSUP, cmd, offset, length,
                               f"the server does not support {missing[1]}")
        if flags & p.CMD_FLAG_FAST_ZERO and not self.can_fast_zero:
            raise self._refuse(p.Err.ENOTSUP, cmd, offset, length,
                               "the server does not support fast zero")
        if flags & p.CMD_FLAG_FUA and not self.can_fua:
            raise self._refuse(p.Err.EINVAL, cmd, offset, length,
                               "the server does not support FUA")
        if cmd == p.Cmd.FLUSH:
            return
        self._check_range(cmd, offset, length, flags, split)

    def _check_range(self, cmd: p.Cmd, offset: int, length: int, flags: int,
                     split: bool) -> None:
        if length == 0:
            raise self._refuse(p.Err.EINVAL, cmd, offset, length, "zero-length request")
        if offset + length > self.size:
            raise self._refuse(p.Err.EINVAL, cmd, offset, length,
                               f"beyond the end of the export ({self.size} bytes)")
        if offset % self.min_block_size or length % self.min_block_size:
            raise self._refuse(p.Err.EINVAL, cmd, offset, length, "not aligned to the "
                               f"minimum block size of {self.min_block_size}")
        if split:
            return
        if cmd in (p.Cmd.READ, p.Cmd.WRITE):
            limit = self._max_request
        elif cmd == p.Cmd.WRITE_ZEROES and not flags & p.CMD_FLAG_FAST_ZERO:
            limit = self.max_block_size
        else:
            return
        if length > limit:
            raise self._refuse(p.Err.EINVAL, cmd, offset, length,
                               f"longer than the maximum block size of {limit}")

    def _refuse(self, error: int, cmd: p.Cmd, offset: int, length: int,
                why: str) -> NbdError:
        return NbdError(error, f"{describe(cmd, offset, length)} on {self.address} not sent: "
                        f"{why}", from_server=False)

    def _ranged(self, cmd: p.Cmd, offset: int, length: int, flags: int, piece: int) -> None:
        """A trim or zero of any length, cut into requests of at most ``piece`` bytes."""
        if length == 0:
            return
        self._check(cmd, offset, length, flags, split=True)
        self._wait_many([self._submit(Request(cmd, flags, start, n))
                         for start, n in _pieces(offset, length, piece)])

    def _submit(self, req: Request, payload: memoryview | None = None) -> int:
        self._check_usable()
        while len(self._pending) >= self.max_in_flight:
            self._replies.read_one()
        cookie = next(self._cookies)
        self._pending[cookie] = req
        self._conn.send(p.REQUEST.pack(p.REQUEST_MAGIC, req.flags, req.cmd, cookie, req.offset,
                                  req.length), payload)
        return cookie

    def _wait_many(self, cookies: list[int]) -> None:
        """Wait for each; then raise the first failure (a split request fails as a whole)."""
        first: NbdError | None = None
        for cookie in cookies:
            try:
                self.wait(cookie)
            except NbdError as exc:
                first = first or exc
        if first is not None:
            raise first

    def _drain(self) -> None:
        while self._pending:
            self._check_usable()
            self._replies.read_one()

    def _check_usable(self) -> None:
        if self._conn.broken is not None:
            broken = self._conn.broken
            raise type(broken)(f"{broken.message} (the connection is closed)")
        if self._closed:
            raise UnreachableError(f"the connection to {self.address} is closed")


# -- helpers ------------------------------------------------------------------------------------


def _pieces(offset: int, length: int, piece: int) -> Iterator[tuple[int, int]]:
    for start in range(offset, offset + length, piece):
        yield start, min(piece, offset + length - start)


def _byte_view(data: Any) -> memoryview:
    view = memoryview(data)
    return view if view.format == "B" and view.ndim == 1 else view.cast("B")
