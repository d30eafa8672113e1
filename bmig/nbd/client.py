"""A small blocking NBD client.

Fixed newstyle handshake (STARTTLS, structured replies, meta contexts, NBD_OPT_GO with
block sizes, NBD_OPT_EXPORT_NAME only as the fallback), simple and structured replies, and
pipelining: many requests in flight on one connection, replies matched by cookie in
whatever order they arrive. Used as a workload generator and as a replication target's
writer. One client belongs to one thread.

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
import socket
import ssl
import struct
import urllib.parse
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

from bmig.errors import BmigError, ConfigError, ProtocolError, RequestError, UnreachableError
from bmig.limits import MAX_NBD_CONTEXTS as _MAX_CONTEXTS
from bmig.limits import MAX_NBD_ERROR_CHUNK as _MAX_ERROR_CHUNK
from bmig.limits import NBD_CHUNK_HEADROOM as _CHUNK_HEADROOM
from bmig.nbd import protocol as p

__all__ = [
    "DEFAULT_PORT", "MAX_IN_FLIGHT", "NbdAddress", "NbdClient", "NbdError", "NbdExportError",
    "errno_name", "parse_uri",
]

DEFAULT_PORT = p.DEFAULT_PORT
_U16 = struct.Struct(">H")
_U32 = struct.Struct(">I")
_U64 = struct.Struct(">Q")

# -- limits of this client --------------------------------------------------------------------

MAX_IN_FLIGHT = 256                     # requests on the wire at once; submit waits beyond
_MAX_U32 = 0xFFFFFFFF
_MAX_U64 = 0xFFFFFFFFFFFFFFFF
_MAX_NO_PAYLOAD = 1 << 31               # trim and block status pieces: 32 bits, any alignment
_READ_BUFFER = 64 * 1024                # small messages are read through this buffer...
_DIRECT_READ = 16 * 1024                # ...payloads this large go straight to their target
_ZEROES = memoryview(bytes(1 << 20))

_WRITE_LIKE = (p.Cmd.WRITE, p.Cmd.TRIM, p.Cmd.WRITE_ZEROES)


# -- errors -------------------------------------------------------------------------------------


def errno_name(error: int) -> str:
    """``EIO`` for NBD_EIO; proto.md: an unexpected value counts as NBD_EINVAL."""
    try:
        return p.Err(error).name
    except ValueError:
        return "EINVAL"


class NbdError(BmigError):
    """An NBD request failed on the server, or the client refused to send it."""

    wire_code = "nbd"

    def __init__(self, error: int, message: str, *, from_server: bool = True):
        super().__init__(message)
        self.error = int(error)
        self.errno_name = errno_name(error)
        self.from_server = from_server


class NbdExportError(RequestError):
    """The NBD server refused the export or an option the client needs."""

    wire_code = "nbd-refused"

    def __init__(self, message: str, reply: int = 0):
        super().__init__(message)
        self.reply = reply


class _Closed(UnreachableError):
    """The server closed the connection."""

    wire_code = "nbd-closed"


# -- addresses ------------------------------------------------------------------------------------

_SCHEMES = {  # scheme -> (tls, unix)
    "nbd": (False, False), "nbds": (True, False),
    "nbd+unix": (False, True), "nbds+unix": (True, True),
}


@dataclass(frozen=True)
class NbdAddress:
    """Where an export is: a Unix socket or a TCP host and port, its name, and TLS or not."""

    unix: str | None = None
    host: str | None = None
    port: int = DEFAULT_PORT
    export: str = ""
    tls: bool = False

    def __post_init__(self) -> None:
        if (self.unix is None) == (self.host is None):
            raise ConfigError("an NBD address needs either a Unix socket path or a host")
        if self.unix == "" or self.host == "":
            raise ConfigError("an NBD address needs a non-empty socket path or host")
        if not 0 < self.port < 65536:
            raise ConfigError(f"NBD port {self.port} is out of range (1-65535)")
        _check_name("export name", self.export)

    @property
    def uri(self) -> str:
        """The address as a URI that parse_uri reads back to the same address."""
        path = urllib.parse.quote(self.export, safe="")
        if self.unix is not None:
            scheme = "nbds+unix" if self.tls else "nbd+unix"
            return f"{scheme}:///{path}?socket={urllib.parse.quote(self.unix, safe='/')}"
        host = f"[{self.host}]" if ":" in (self.host or "") else self.host
        return f"{'nbds' if self.tls else 'nbd'}://{host}:{self.port}/{path}"

    def __str__(self) -> str:
        return self.uri


def _check_name(what: str, name: str) -> None:
    if not isinstance(name, str):
        raise ConfigError(f"NBD {what} must be a string, not {type(name).__name__}")
    if "\0" in name:
        raise ConfigError(f"NBD {what} {name!r} contains a NUL character")
    try:
        encoded = name.encode("utf-8")
    except UnicodeEncodeError:
        raise ConfigError(f"NBD {what} {name!r} is not valid Unicode") from None
    if len(encoded) > p.MAX_NAME_LENGTH:
        raise ConfigError(f"NBD {what} is longer than {p.MAX_NAME_LENGTH} bytes")


def parse_uri(uri: str) -> NbdAddress:
    """nbd://HOST[:PORT][/EXPORT], nbd+unix:///[EXPORT]?socket=PATH, and nbds:// and
    nbds+unix:// for TLS. The export name is the path without its leading '/',
    percent-decoded; an empty host means localhost, as in libnbd."""
    if not isinstance(uri, str):
        raise ConfigError(f"an NBD URI must be a string, not {type(uri).__name__}")
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in uri):
        raise ConfigError(f"NBD URI {uri!r} contains control characters")
    scheme, sep, rest = uri.partition(":")
    scheme = scheme.lower()
    if not sep or scheme not in _SCHEMES:
        raise ConfigError(f"{uri!r} is not an NBD URI: use nbd://HOST[:PORT]/EXPORT, "
                          "nbd+unix:///EXPORT?socket=PATH, or nbds:// / nbds+unix:// for TLS")
    if not rest.startswith("//"):
        raise ConfigError(f"NBD URI {uri!r} must start with {scheme}://")
    tls, unix = _SCHEMES[scheme]
    if "#" in uri:
        raise ConfigError(f"NBD URI {uri!r} must not have a #fragment (write # as %23)")
    try:
        parts = urllib.parse.urlsplit(uri)
        query = _query(parts.query)
        export = urllib.parse.unquote(parts.path[1:] if parts.path.startswith("/")
                                      else parts.path, errors="strict")
        port = parts.port
    except (ValueError, UnicodeDecodeError) as exc:
        raise ConfigError(f"invalid NBD URI {uri!r}: {exc}") from None
    if parts.username is not None or parts.password is not None:
        raise ConfigError(f"NBD URI {uri!r}: user names are not supported")
    if unix:
        return _unix_address(uri, parts, query, export, tls)
    if query:
        raise ConfigError(f"NBD URI {uri!r} takes no query; socket= belongs to nbd+unix://")
    if port == 0:
        raise ConfigError(f"NBD URI {uri!r}: port 0 is not a port")
    return NbdAddress(host=parts.hostname or "localhost", port=port or DEFAULT_PORT,
                      export=export, tls=tls)


def _query(query: str) -> list[tuple[str, str]]:
    """key=value pairs, percent-decoded; '+' stays '+' (libnbd reads socket paths so)."""
    pairs = []
    for item in query.split("&") if query else ():
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"query item {item!r} is not key=value")
        pairs.append((urllib.parse.unquote(key, errors="strict"),
                      urllib.parse.unquote(value, errors="strict")))
    return pairs


def _unix_address(uri: str, parts: urllib.parse.SplitResult, query: list[tuple[str, str]],
                  export: str, tls: bool) -> NbdAddress:
    if parts.netloc:
        raise ConfigError(f"NBD URI {uri!r} names a host; a Unix socket URI starts with "
                          f"{parts.scheme}:/// and gives ?socket=PATH")
    unknown = sorted({k for k, _ in query if k != "socket"})
    if unknown:
        raise ConfigError(f"NBD URI {uri!r}: unsupported query parameter {unknown[0]!r}")
    sockets = [v for k, v in query if k == "socket"]
    if len(sockets) != 1 or not sockets[0]:
        raise ConfigError(f"NBD URI {uri!r} needs exactly one ?socket=PATH")
    return NbdAddress(unix=sockets[0], export=export, tls=tls)


# -- the client ---------------------------------------------------------------------------------


@dataclass(slots=True)
class _Request:
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


class NbdClient:
    """One NBD connection. Build it with connect(); close it, or use it as a context
    manager (which waits for outstanding requests first when the block ends normally).

    The answer to every submitted cookie is kept until wait() or wait_all() collects it."""

    def __init__(self, sock: socket.socket, address: NbdAddress, timeout: float | None):
        self.address = address
        self._sock = sock
        self.timeout = timeout
        self.strict = True
        self.max_in_flight = MAX_IN_FLIGHT
        self.export = address.export
        self.size = 0
        self.flags = 0
        self.structured = False
        self.contexts: dict[str, int] = {}
        self.min_block_size = p.MIN_BLOCK_SIZE
        self.preferred_block_size = p.PREFERRED_BLOCK_SIZE
        self.max_block_size = p.MAX_PAYLOAD
        self._tls = False
        self._no_zeroes = False
        self._closed = False
        self._broken: BmigError | None = None
        self._cookies = itertools.count(1)
        self._pending: dict[int, _Request] = {}
        self._results: dict[int, NbdError | None] = {}
        self._head = memoryview(bytearray(p.STRUCTURED_REPLY.size))
        self._rview = memoryview(bytearray(_READ_BUFFER))
        self._rpos = self._rend = 0
        self._set_limits()

    @classmethod
    def connect(cls, uri_or_address: str | NbdAddress, *, timeout: float | None = 30.0,
                meta_contexts: Sequence[str] = (), tls_context: ssl.SSLContext | None = None,
                structured: bool = True) -> "NbdClient":
        """Connect and negotiate; the client is in transmission phase when it returns."""
        address = (uri_or_address if isinstance(uri_or_address, NbdAddress)
                   else parse_uri(uri_or_address))
        contexts = (meta_contexts,) if isinstance(meta_contexts, str) else tuple(meta_contexts)
        for name in contexts:
            _check_name("meta context", name)
        client = cls(_open(address, timeout), address, timeout)
        try:
            client._handshake(contexts, tls_context, structured)
        except BaseException:
            client._abort_handshake()
            raise
        return client

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
        return self._timeout

    @timeout.setter
    def timeout(self, seconds: float | None) -> None:
        self._timeout = seconds
        if not self._closed_socket():
            self._sock.settimeout(seconds)

    def _closed_socket(self) -> bool:
        return self._sock.fileno() == -1

    @property
    def in_flight(self) -> int:
        """Requests sent whose reply has not been read yet."""
        return len(self._pending)

    @property
    def outstanding(self) -> int:
        """Requests submitted and not yet waited for (in flight, or answered and kept)."""
        return len(self._pending) + len(self._results)

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
                cookies.append(self._submit(_Request(p.Cmd.READ, 0, start, n,
                                                     buf=view[rel:rel + n])))
            self._wait_many(cookies)
        except NbdError:
            raise
        except BaseException as exc:
            if any(c in self._pending for c in cookies):  # their data would land in buf later
                self._fail(exc)
            raise

    def pwrite(self, data: Any, offset: int, fua: bool = False) -> None:
        """Write ``data`` (any contiguous buffer) at ``offset``; big writes are split and the
        pieces pipelined."""
        view = _byte_view(data)
        if not len(view):
            return
        flags = p.CMD_FLAG_FUA if fua else 0
        self._check(p.Cmd.WRITE, offset, len(view), flags, split=True)
        cookies = [self._submit(_Request(p.Cmd.WRITE, flags, start, n),
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
            req = _Request(p.Cmd.BLOCK_STATUS, 0, pos, min(end - pos, _MAX_NO_PAYLOAD),
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
        return self._submit(_Request(p.Cmd.WRITE, flags, offset, len(view)), view)

    def submit_zero(self, offset: int, length: int, fua: bool = False, no_hole: bool = False,
                    fast: bool = False) -> int:
        flags = ((p.CMD_FLAG_FUA if fua else 0) | (p.CMD_FLAG_NO_HOLE if no_hole else 0)
                 | (p.CMD_FLAG_FAST_ZERO if fast else 0))
        self._check(p.Cmd.WRITE_ZEROES, offset, length, flags)
        return self._submit(_Request(p.Cmd.WRITE_ZEROES, flags, offset, length))

    def submit_trim(self, offset: int, length: int, fua: bool = False) -> int:
        flags = p.CMD_FLAG_FUA if fua else 0
        self._check(p.Cmd.TRIM, offset, length, flags)
        return self._submit(_Request(p.Cmd.TRIM, flags, offset, length))

    def submit_flush(self) -> int:
        """A flush covers only writes already answered; see flush()."""
        self._check(p.Cmd.FLUSH, 0, 0, 0)
        return self._submit(_Request(p.Cmd.FLUSH, 0, 0, 0))

    def wait(self, cookie: int) -> None:
        """Until the request of ``cookie`` is answered; raises NbdError if it failed."""
        while cookie not in self._results:
            self._check_usable()
            if cookie not in self._pending:
                raise ValueError(f"NBD cookie {cookie} is not outstanding")
            self._read_reply()
        error = self._results.pop(cookie)
        if error is not None:
            raise error

    def wait_all(self) -> None:
        """Until every request is answered; raises the first failure (by submission)."""
        self._drain()
        results, self._results = self._results, {}
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
        if self._broken is None:
            try:
                self._send(p.REQUEST.pack(p.REQUEST_MAGIC, 0, p.Cmd.DISC, next(self._cookies),
                                          0, 0))
            except BmigError:
                pass
        self._sock.close()
        self._pending.clear()

    def __enter__(self) -> "NbdClient":
        return self

    def __exit__(self, exc_type: Any, *rest: Any) -> None:
        try:
            if exc_type is None and self._broken is None and not self._closed:
                self.wait_all()
        finally:
            self.close()

    # -- handshake ----------------------------------------------------------------------------

    def _handshake(self, contexts: tuple[str, ...], tls_context: ssl.SSLContext | None,
                   structured: bool) -> None:
        self._greeting()
        if self.address.tls:
            self._start_tls(tls_context)
        if structured:
            self.structured = self._negotiate_structured()
        if self.structured and contexts:
            self.contexts = self._set_meta_contexts(contexts)
        if not self._go():
            self._export_name()
        self._set_limits()

    def _set_limits(self) -> None:
        """Reads and writes are cut at the maximum block size, and at our payload cap when
        the server has no limit; a reply chunk may carry one such piece."""
        self._max_request = min(self.max_block_size, p.MAX_PAYLOAD)
        self._chunk_cap = self._max_request + _CHUNK_HEADROOM

    def _greeting(self) -> None:
        magic, opt_magic, flags = p.SERVER_GREETING.unpack(self._recv(p.SERVER_GREETING.size))
        if magic != p.NBDMAGIC:
            raise self._protocol(f"not an NBD server (greeting magic {magic:#018x})")
        if opt_magic == p.CLISERV_MAGIC:
            raise self._protocol("the server speaks oldstyle negotiation, which bmig does "
                                 "not support")
        if opt_magic != p.IHAVEOPT:
            raise self._protocol(f"bad newstyle magic {opt_magic:#018x}")
        if not flags & p.FLAG_FIXED_NEWSTYLE:
            raise self._protocol("the server does not offer fixed newstyle negotiation")
        self._no_zeroes = bool(flags & p.FLAG_NO_ZEROES)
        client_flags = p.FLAG_C_FIXED_NEWSTYLE | (p.FLAG_C_NO_ZEROES if self._no_zeroes else 0)
        self._send(p.CLIENT_FLAGS.pack(client_flags))

    def _option(self, opt: p.Opt, data: bytes = b"") -> None:
        self._send(p.OPTION_HEADER.pack(p.IHAVEOPT, opt, len(data)), data)

    def _option_reply(self, opt: p.Opt) -> tuple[int, bytes]:
        magic, reply_opt, rep, length = p.OPTION_REPLY.unpack(self._recv(p.OPTION_REPLY.size))
        if magic != p.REPLY_MAGIC_OPT:
            raise self._protocol(f"bad option reply magic {magic:#018x}")
        if reply_opt != opt:
            raise self._protocol(f"reply to {p.name(p.Opt, reply_opt)} while waiting for "
                                 f"{p.name(p.Opt, opt)}")
        if length > p.MAX_OPTION_LENGTH:
            raise self._protocol(f"{p.name(p.Opt, opt)} reply of {length} bytes exceeds the "
                                 f"limit of {p.MAX_OPTION_LENGTH}")
        return rep, self._recv(length)

    def _refused(self, opt: p.Opt, rep: int, data: bytes) -> BmigError:
        if not rep & p.REP_ERR_BIT:
            return self._protocol(f"unexpected {p.name(p.Rep, rep)} in reply to "
                                  f"{p.name(p.Opt, opt)}")
        if rep == p.Rep.ERR_TLS_REQD:
            message = f"{self.address} requires TLS: use an nbds:// or nbds+unix:// URI"
        elif rep == p.Rep.ERR_UNKNOWN:
            message = f"{self.address} has no export named {self.export!r}"
        else:
            message = f"{self.address} refused {p.name(p.Opt, opt)}: {p.name(p.Rep, rep)}"
        text = _printable(data)
        return NbdExportError(f"{message} ({text})" if text else message, rep)

    def _start_tls(self, context: ssl.SSLContext | None) -> None:
        self._option(p.Opt.STARTTLS)
        rep, data = self._option_reply(p.Opt.STARTTLS)
        if rep != p.Rep.ACK:
            raise self._refused(p.Opt.STARTTLS, rep, data)
        if self._rpos != self._rend:
            raise self._protocol("data before the TLS handshake")
        context = context or ssl.create_default_context()
        hostname = self.address.host or ("localhost" if context.check_hostname else None)
        try:
            self._sock = context.wrap_socket(self._sock, server_hostname=hostname)
        except (OSError, ValueError) as exc:
            raise self._fail(UnreachableError(
                f"TLS handshake with {self.address} failed: {_reason(exc)}")) from None
        self._tls = True

    def _negotiate_structured(self) -> bool:
        self._option(p.Opt.STRUCTURED_REPLY)
        rep, data = self._option_reply(p.Opt.STRUCTURED_REPLY)
        if rep == p.Rep.ACK:
            return True
        if rep == p.Rep.ERR_UNSUP:
            return False
        raise self._refused(p.Opt.STRUCTURED_REPLY, rep, data)

    def _set_meta_contexts(self, names: tuple[str, ...]) -> dict[str, int]:
        export = self.export.encode()
        queries = [name.encode() for name in names]
        data = b"".join([_U32.pack(len(export)), export, _U32.pack(len(queries)),
                         *(_U32.pack(len(q)) + q for q in queries)])
        if len(data) > p.MAX_OPTION_LENGTH:
            raise ConfigError(f"too many or too long meta contexts ({len(data)} bytes)")
        self._option(p.Opt.SET_META_CONTEXT, data)
        contexts: dict[str, int] = {}
        while True:
            rep, data = self._option_reply(p.Opt.SET_META_CONTEXT)
            if rep == p.Rep.ACK:
                return contexts
            if rep == p.Rep.ERR_UNSUP:
                return {}
            if rep != p.Rep.META_CONTEXT:
                raise self._refused(p.Opt.SET_META_CONTEXT, rep, data)
            if len(data) <= _U32.size or len(contexts) >= _MAX_CONTEXTS:
                raise self._protocol("bad or too many NBD_REP_META_CONTEXT replies")
            contexts[data[_U32.size:].decode("utf-8", "replace")] = _U32.unpack_from(data)[0]

    def _go(self) -> bool:
        """NBD_OPT_GO asking for block sizes; False if the server does not know it."""
        name = self.export.encode()
        requests = [p.Info.BLOCK_SIZE]
        self._option(p.Opt.GO, b"".join([_U32.pack(len(name)), name, _U16.pack(len(requests)),
                                         *(p.INFO_TYPE.pack(r) for r in requests)]))
        have_export = False
        while True:
            rep, data = self._option_reply(p.Opt.GO)
            if rep == p.Rep.INFO:
                have_export |= self._info(data)
            elif rep == p.Rep.ACK:
                if not have_export:
                    raise self._protocol("NBD_OPT_GO succeeded without NBD_INFO_EXPORT")
                return True
            elif rep == p.Rep.ERR_UNSUP:
                return False
            else:
                raise self._refused(p.Opt.GO, rep, data)

    def _info(self, data: bytes) -> bool:
        """Take one NBD_REP_INFO; True if it was NBD_INFO_EXPORT. Others are ignored."""
        if len(data) < p.INFO_TYPE.size:
            raise self._protocol("NBD_REP_INFO without an information type")
        (kind,) = p.INFO_TYPE.unpack_from(data)
        body = data[p.INFO_TYPE.size:]
        if kind == p.Info.EXPORT:
            if len(body) != p.EXPORT_NAME_REPLY.size:
                raise self._protocol(f"NBD_INFO_EXPORT of {len(data)} bytes (must be 12)")
            self.size, self.flags = p.EXPORT_NAME_REPLY.unpack(body)
            return True
        if kind == p.Info.BLOCK_SIZE:
            if len(body) != p.BLOCK_SIZES.size:
                raise self._protocol(f"NBD_INFO_BLOCK_SIZE of {len(data)} bytes (must be 14)")
            self._set_block_sizes(*p.BLOCK_SIZES.unpack(body))
        return False

    def _set_block_sizes(self, minimum: int, preferred: int, maximum: int) -> None:
        if not (_power_of_two(minimum) and minimum <= 65536 and _power_of_two(preferred)
                and preferred >= minimum and maximum >= minimum
                and (maximum % minimum == 0 or maximum == p.BLOCK_SIZE_NONE)):
            raise self._protocol(f"invalid block sizes: minimum {minimum}, preferred "
                                 f"{preferred}, maximum {maximum}")
        self.min_block_size, self.preferred_block_size = minimum, preferred
        self.max_block_size = maximum

    def _export_name(self) -> None:
        self._option(p.Opt.EXPORT_NAME, self.export.encode())
        try:
            self.size, self.flags = p.EXPORT_NAME_REPLY.unpack(
                self._recv(p.EXPORT_NAME_REPLY.size))
        except _Closed:
            raise NbdExportError(f"{self.address} closed the connection on NBD_OPT_EXPORT_NAME: "
                                 f"no export named {self.export!r}, or it requires TLS") from None
        if not self._no_zeroes:
            self._recv(p.EXPORT_NAME_PADDING)

    def _abort_handshake(self) -> None:
        """A soft disconnect if the connection still works (proto.md asks for one)."""
        if self._broken is None:
            try:
                self._option(p.Opt.ABORT)
            except BmigError:
                pass
        self._closed = True
        self._sock.close()

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
        return NbdError(error, f"{_describe(cmd, offset, length)} on {self.address} not sent: "
                        f"{why}", from_server=False)

    def _ranged(self, cmd: p.Cmd, offset: int, length: int, flags: int, piece: int) -> None:
        """A trim or zero of any length, cut into requests of at most ``piece`` bytes."""
        if length == 0:
            return
        self._check(cmd, offset, length, flags, split=True)
        self._wait_many([self._submit(_Request(cmd, flags, start, n))
                         for start, n in _pieces(offset, length, piece)])

    def _submit(self, req: _Request, payload: memoryview | None = None) -> int:
        self._check_usable()
        while len(self._pending) >= self.max_in_flight:
            self._read_reply()
        cookie = next(self._cookies)
        self._pending[cookie] = req
        self._send(p.REQUEST.pack(p.REQUEST_MAGIC, req.flags, req.cmd, cookie, req.offset,
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
            self._read_reply()

    def _check_usable(self) -> None:
        if self._broken is not None:
            raise type(self._broken)(f"{self._broken.message} (the connection is closed)")
        if self._closed:
            raise UnreachableError(f"the connection to {self.address} is closed")

    # -- replies ------------------------------------------------------------------------------

    def _read_reply(self) -> None:
        """Read one simple reply or one structured chunk and account it to its request.
        Any failure here leaves the stream mid-message, so it ends the connection."""
        try:
            head = self._head
            self._recv_into(head[:p.SIMPLE_REPLY.size])
            (magic,) = _U32.unpack_from(head)
            if magic == p.SIMPLE_REPLY_MAGIC:
                _, error, cookie = p.SIMPLE_REPLY.unpack_from(head)
                self._on_simple(cookie, error)
            elif magic == p.STRUCTURED_REPLY_MAGIC and self.structured:
                self._recv_into(head[p.SIMPLE_REPLY.size:])
                _, flags, kind, cookie, length = p.STRUCTURED_REPLY.unpack_from(head)
                self._on_chunk(cookie, flags, kind, length)
            elif magic == p.STRUCTURED_REPLY_MAGIC:
                raise self._protocol("structured reply chunk, but structured replies were "
                                     "not negotiated")
            else:
                raise self._protocol(f"bad reply magic {magic:#010x}")
        except BaseException as exc:
            if self._broken is None:
                self._fail(exc)
            raise

    def _request_for(self, cookie: int) -> _Request:
        req = self._pending.get(cookie)
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
                self._recv_into(req.buf)
                req.covered = req.length
        req.error = error
        self._finish(cookie, req)

    def _on_chunk(self, cookie: int, flags: int, kind: int, length: int) -> None:
        req = self._request_for(cookie)
        if length > self._chunk_cap:
            raise self._protocol(f"reply chunk of {length} bytes exceeds the limit of "
                                 f"{self._chunk_cap}")
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

    def _content_target(self, req: _Request, kind: str, offset: int, n: int) -> memoryview:
        if req.cmd != p.Cmd.READ:
            raise self._protocol(f"{kind} chunk in reply to {p.name(p.Cmd, req.cmd)}")
        start = offset - req.offset
        if start < 0 or start + n > req.length:
            raise self._protocol(f"{kind} chunk at offset {offset} of {n} bytes lies outside "
                                 f"the read of {req.length} bytes at offset {req.offset}")
        req.covered += n
        assert req.buf is not None
        return req.buf[start:start + n]

    def _on_data(self, req: _Request, length: int) -> None:
        if length <= _U64.size:
            raise self._protocol(f"NBD_REPLY_TYPE_OFFSET_DATA of {length} bytes")
        (offset,) = _U64.unpack(self._recv(_U64.size))
        self._recv_into(self._content_target(req, "OFFSET_DATA", offset, length - _U64.size))

    def _on_hole(self, req: _Request, length: int) -> None:
        if length != p.OFFSET_HOLE.size:
            raise self._protocol(f"NBD_REPLY_TYPE_OFFSET_HOLE of {length} bytes (must be 12)")
        offset, size = p.OFFSET_HOLE.unpack(self._recv(p.OFFSET_HOLE.size))
        if size == 0:
            raise self._protocol("NBD_REPLY_TYPE_OFFSET_HOLE of size 0")
        target = self._content_target(req, "OFFSET_HOLE", offset, size)
        for start in range(0, size, len(_ZEROES)):
            n = min(len(_ZEROES), size - start)
            target[start:start + n] = _ZEROES[:n]

    def _on_extents(self, req: _Request, length: int) -> None:
        if req.cmd != p.Cmd.BLOCK_STATUS:
            raise self._protocol(f"BLOCK_STATUS chunk in reply to {p.name(p.Cmd, req.cmd)}")
        if length < _U32.size + p.EXTENT.size or (length - _U32.size) % p.EXTENT.size:
            raise self._protocol(f"NBD_REPLY_TYPE_BLOCK_STATUS of {length} bytes")
        data = self._recv(length)
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

    def _on_error(self, req: _Request, kind: int, length: int) -> None:
        if length < p.ERROR_CHUNK.size or length > _MAX_ERROR_CHUNK:
            raise self._protocol(f"error chunk of {length} bytes")
        data = self._recv(length)
        error, size = p.ERROR_CHUNK.unpack_from(data)
        tail = _U64.size if kind == p.ReplyType.ERROR_OFFSET else 0
        if size > length - p.ERROR_CHUNK.size - tail or error == 0:
            raise self._protocol(f"malformed error chunk (error {error}, message of {size} "
                                 f"bytes in {length})")
        message = _printable(data[p.ERROR_CHUNK.size:p.ERROR_CHUNK.size + size])
        if kind == p.ReplyType.ERROR_OFFSET:
            (offset,) = _U64.unpack_from(data, p.ERROR_CHUNK.size + size)
            if req.length and not req.offset <= offset < req.offset + req.length:
                raise self._protocol(f"error offset {offset} lies outside the request")
            message = f"at offset {offset}: {message}" if message else f"at offset {offset}"
        if not req.error:
            req.error, req.message = error, message

    def _finish(self, cookie: int, req: _Request) -> None:
        del self._pending[cookie]
        if req.error:
            self._results[cookie] = NbdError(req.error, self._failure(req))
            return
        if req.cmd == p.Cmd.READ and req.covered != req.length:
            raise self._protocol(f"read of {req.length} bytes at offset {req.offset} answered "
                                 f"with {req.covered} bytes of data and holes")
        if req.cmd == p.Cmd.BLOCK_STATUS and req.extents is None:
            raise self._protocol("block status answered without extents for the context")
        self._results[cookie] = None

    def _failure(self, req: _Request) -> str:
        text = (f"{_describe(req.cmd, req.offset, req.length)} failed on {self.address}: "
                f"{errno_name(req.error)}")
        if req.error not in p.Err.__members__.values():
            text += f" (unknown error {req.error})"
        return f"{text}: {req.message}" if req.message else text

    # -- the socket ---------------------------------------------------------------------------

    def _fail(self, exc: BaseException) -> BmigError:
        """Mark the connection broken by ``exc`` and close it; returns the error to raise."""
        if isinstance(exc, (UnreachableError, ProtocolError)):
            error: BmigError = exc
        else:
            error = UnreachableError(f"connection to {self.address} abandoned after "
                                     f"{type(exc).__name__}")
        if self._broken is None:
            self._broken = error
            self._pending.clear()
            self._sock.close()
        return error

    def _protocol(self, message: str) -> BmigError:
        return self._fail(ProtocolError(f"NBD server at {self.address} broke the protocol: "
                                        f"{message}"))

    def _lost(self, exc: OSError) -> BmigError:
        if isinstance(exc, socket.timeout):
            return self._fail(UnreachableError(
                f"the NBD server at {self.address} did not answer within "
                f"{_seconds(self._timeout)}"))
        return self._fail(UnreachableError(f"lost the NBD server at {self.address}: "
                                           f"{_reason(exc)}"))

    def _send(self, head: bytes, payload: Any = None) -> None:
        try:
            if payload is None or not len(payload):
                self._sock.sendall(head)
            elif self._tls:
                self._sock.sendall(head)
                self._sock.sendall(payload)
            else:
                self._sendmsg([memoryview(head), payload])
        except OSError as exc:
            raise self._lost(exc) from None

    def _sendmsg(self, views: list[memoryview]) -> None:
        """Header and payload in one system call, without joining them."""
        while views:
            sent = self._sock.sendmsg(views)
            while views and sent >= len(views[0]):
                sent -= len(views[0])
                views.pop(0)
            if views and sent:
                views[0] = views[0][sent:]

    def _recv_some(self, target: memoryview) -> int:
        try:
            n = self._sock.recv_into(target)
        except OSError as exc:
            raise self._lost(exc) from None
        if n == 0:
            raise self._fail(_Closed(f"the NBD server at {self.address} closed the connection"
                                     + (f" with {len(self._pending)} requests in flight"
                                        if self._pending else "")))
        return n

    def _recv_into(self, view: memoryview) -> None:
        """Fill ``view``: small reads through the buffer, large ones straight into it."""
        need, done = len(view), 0
        while done < need:
            if self._rpos < self._rend:
                n = min(self._rend - self._rpos, need - done)
                view[done:done + n] = self._rview[self._rpos:self._rpos + n]
                self._rpos += n
                done += n
            elif need - done >= _DIRECT_READ:
                done += self._recv_some(view[done:])
            else:
                self._rpos, self._rend = 0, self._recv_some(self._rview)

    def _recv(self, n: int) -> bytes:
        buf = bytearray(n)
        self._recv_into(memoryview(buf))
        return bytes(buf)


# -- helpers ------------------------------------------------------------------------------------


def _open(address: NbdAddress, timeout: float | None) -> socket.socket:
    try:
        if address.unix is not None:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.settimeout(timeout)
                sock.connect(address.unix)
            except BaseException:
                sock.close()
                raise
            return sock
        assert address.host is not None
        sock = socket.create_connection((address.host, address.port), timeout=timeout)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock
    except socket.gaierror as exc:
        raise UnreachableError(f"cannot resolve {address.host!r} for {address}: "
                               f"{_reason(exc)}") from None
    except socket.timeout:
        raise UnreachableError(f"cannot connect to {address}: no answer within "
                               f"{_seconds(timeout)}") from None
    except OSError as exc:
        raise UnreachableError(f"cannot connect to {address}: {_reason(exc)} (is the NBD "
                               "server running?)") from None


def _pieces(offset: int, length: int, piece: int) -> Iterator[tuple[int, int]]:
    for start in range(offset, offset + length, piece):
        yield start, min(piece, offset + length - start)


def _byte_view(data: Any) -> memoryview:
    view = memoryview(data)
    return view if view.format == "B" and view.ndim == 1 else view.cast("B")


def _describe(cmd: p.Cmd, offset: int, length: int) -> str:
    if cmd == p.Cmd.FLUSH:
        return p.name(p.Cmd, cmd)
    return f"{p.name(p.Cmd, cmd)} of {length} bytes at offset {offset}"


def _power_of_two(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def _printable(data: bytes, limit: int = 200) -> str:
    """A server's text on one line, without control characters."""
    text = data.decode("utf-8", "replace")
    text = "".join(c if c.isprintable() else " " for c in text).strip()
    return text if len(text) <= limit else text[:limit] + "..."


def _reason(exc: BaseException) -> str:
    return _printable(str(getattr(exc, "strerror", None) or exc or type(exc).__name__).encode())


def _seconds(timeout: float | None) -> str:
    return "forever" if timeout is None else f"{timeout:g} s"
