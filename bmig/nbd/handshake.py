"""Fixed newstyle negotiation: the option loop up to the start of transmission.

Lengths from the client are checked before anything is allocated; the number of options
is capped; an option the server does not know gets NBD_REP_ERR_UNSUP and the loop goes on.
Nothing is opened here: the caller gets the chosen export and opens it afterwards.

With TLS configured, NBD_OPT_STARTTLS upgrades the connection in place; with TLS
required, every option but STARTTLS and ABORT is answered NBD_REP_ERR_TLS_REQD until then
(NBD_OPT_EXPORT_NAME, which cannot be answered with an error, closes the connection).
What was negotiated before the upgrade is forgotten, as the protocol asks.

It may not open an export or touch the layers, and knows no socket: it reads and writes
through the stream it is given, and answers from the exports' ``ExportInfo``.
"""

from __future__ import annotations

import logging
import struct
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, Mapping

from bmig.errors import ProtocolError
from bmig.nbd import protocol as p

log = logging.getLogger("bmig-nbd")

_U16 = struct.Struct(">H")
_U32 = struct.Struct(">I")


@dataclass(frozen=True)
class ExportInfo:
    """What the handshake needs to know about an export."""

    name: str
    size: int
    flags: int                      # transmission flags, FLAG_HAS_FLAGS included
    description: str = ""
    contexts: tuple[str, ...] = (p.META_BASE_ALLOCATION,)


@dataclass
class Negotiated:
    """The outcome of a successful handshake."""

    export: ExportInfo
    structured: bool = False
    contexts: dict[int, str] = field(default_factory=dict)   # context id -> name


class _Invalid(Exception):
    """An option payload that is malformed: answered with NBD_REP_ERR_INVALID."""


class Handshake:
    def __init__(self, reader, writer, exports: Mapping[str, ExportInfo], peer: str = "?",
                 tls: object | None = None, tls_required: bool = False,
                 start_tls: Callable[[Any], Awaitable[str]] | None = None):
        """``reader`` has ``readexactly``; ``writer`` has ``write`` and ``drain``
        (asyncio streams, or a bmig.nbd.connection.Connection). ``tls`` is what
        ``start_tls`` upgrades with (an ssl.SSLContext or a bmig.nbd.psk.PskContext);
        ``start_tls`` returns who the client proved to be."""
        self._r = reader
        self._w = writer
        self._exports = exports
        self._peer = peer
        self._tls = tls
        self._tls_required = tls_required and tls is not None
        self._start_tls = start_tls
        self.tls_active = False
        self._no_zeroes = False
        self._structured = False
        self._meta_export: str | None = None
        self._meta: dict[int, str] = {}

    async def run(self) -> Negotiated | None:
        """Negotiate; None if the client aborted or the handshake failed cleanly."""
        self._w.write(p.SERVER_GREETING.pack(p.NBDMAGIC, p.IHAVEOPT,
                                             p.FLAG_FIXED_NEWSTYLE | p.FLAG_NO_ZEROES))
        (cflags,) = p.CLIENT_FLAGS.unpack(await self._r.readexactly(p.CLIENT_FLAGS.size))
        if cflags & ~p.KNOWN_CLIENT_FLAGS or not cflags & p.FLAG_C_FIXED_NEWSTYLE:
            raise ProtocolError(f"{self._peer}: unsupported client flags {cflags:#x}")
        self._no_zeroes = bool(cflags & p.FLAG_C_NO_ZEROES)
        for _ in range(p.MAX_OPTIONS):
            magic, opt, length = p.OPTION_HEADER.unpack(
                await self._r.readexactly(p.OPTION_HEADER.size))
            if magic != p.IHAVEOPT:
                raise ProtocolError(f"{self._peer}: bad option magic {magic:#x}")
            if length > p.MAX_OPTION_LENGTH:
                raise ProtocolError(f"{self._peer}: {p.name(p.Opt, opt)} of {length} bytes "
                                    f"is over the {p.MAX_OPTION_LENGTH} byte cap")
            data = await self._r.readexactly(length)
            log.debug("%s: %s (%d bytes)", self._peer, p.name(p.Opt, opt), length)
            try:
                done = await self._option(opt, data)
            except _Invalid as exc:
                await self._reply(opt, p.Rep.ERR_INVALID, str(exc).encode())
                continue
            if done is not None:
                return done if isinstance(done, Negotiated) else None
        raise ProtocolError(f"{self._peer}: more than {p.MAX_OPTIONS} options")

    async def _option(self, opt: int, data: bytes) -> Negotiated | bool | None:
        """Handle one option; a Negotiated ends the loop, False ends it without one."""
        if opt == p.Opt.STARTTLS and self._tls is not None:
            return await self._starttls(data)
        if self._tls_required and not self.tls_active and opt != p.Opt.ABORT:
            if opt == p.Opt.EXPORT_NAME:
                raise ProtocolError(f"{self._peer}: NBD_OPT_EXPORT_NAME without TLS, which "
                                    "this server requires; closing")
            await self._reply(opt, p.Rep.ERR_TLS_REQD, b"TLS is required: use NBD_OPT_STARTTLS")
            return None
        if opt == p.Opt.EXPORT_NAME:
            export = self._exports.get(self._resolve(data.decode("utf-8", "replace")))
            if export is None:
                raise ProtocolError(f"{self._peer}: no export named {data[:64]!r}")
            self._w.write(p.EXPORT_NAME_REPLY.pack(export.size, export.flags))
            if not self._no_zeroes:
                self._w.write(bytes(p.EXPORT_NAME_PADDING))
            await self._w.drain()
            return Negotiated(export, self._structured, {})
        if opt == p.Opt.ABORT:
            await self._reply(opt, p.Rep.ACK)
            return False
        if opt == p.Opt.LIST:
            if data:
                raise _Invalid("NBD_OPT_LIST takes no data")
            for export in self._exports.values():
                name = export.name.encode()
                await self._reply(opt, p.Rep.SERVER, _U32.pack(len(name)) + name)
            await self._reply(opt, p.Rep.ACK)
            return None
        if opt in (p.Opt.INFO, p.Opt.GO):
            return await self._info(opt, data)
        if opt == p.Opt.STRUCTURED_REPLY:
            if data:
                raise _Invalid("NBD_OPT_STRUCTURED_REPLY takes no data")
            self._structured = True
            await self._reply(opt, p.Rep.ACK)
            return None
        if opt in (p.Opt.SET_META_CONTEXT, p.Opt.LIST_META_CONTEXT):
            await self._meta_context(opt, data)
            return None
        await self._reply(opt, p.Rep.ERR_UNSUP, f"{p.name(p.Opt, opt)} unsupported".encode())
        return None

    async def _starttls(self, data: bytes) -> None:
        if data:
            raise _Invalid("NBD_OPT_STARTTLS takes no data")
        if self.tls_active:
            raise _Invalid("TLS is already active")
        assert self._tls is not None and self._start_tls is not None
        await self._reply(p.Opt.STARTTLS, p.Rep.ACK)
        who = await self._start_tls(self._tls)
        self.tls_active = True
        self._structured = False          # forget what was negotiated in the clear
        self._meta_export, self._meta = None, {}
        log.debug("%s: TLS active%s", self._peer, f" ({who})" if who else "")
        return None

    def _resolve(self, name: str) -> str:
        """The empty name is the default export, the first one configured."""
        if name == "" and self._exports:
            return next(iter(self._exports))
        return name

    async def _info(self, opt: int, data: bytes) -> Negotiated | None:
        name, rest = _take_string(data)
        if len(rest) < 2:
            raise _Invalid("truncated information request count")
        (count,) = _U16.unpack_from(rest)
        if len(rest) != 2 + 2 * count:
            raise _Invalid("information request count does not match the length")
        wanted = {_U16.unpack_from(rest, 2 + 2 * i)[0] for i in range(count)}
        export = self._exports.get(self._resolve(name))
        if export is None:
            await self._reply(opt, p.Rep.ERR_UNKNOWN, f"no export named {name!r}".encode())
            return None
        await self._reply(opt, p.Rep.INFO,
                          struct.pack(">HQH", p.Info.EXPORT, export.size, export.flags))
        await self._reply(opt, p.Rep.INFO,
                          p.INFO_TYPE.pack(p.Info.BLOCK_SIZE) + p.BLOCK_SIZES.pack(
                              p.MIN_BLOCK_SIZE, p.PREFERRED_BLOCK_SIZE, p.MAX_PAYLOAD))
        if p.Info.NAME in wanted:
            await self._reply(opt, p.Rep.INFO, _U16.pack(p.Info.NAME) + export.name.encode())
        if p.Info.DESCRIPTION in wanted and export.description:
            await self._reply(opt, p.Rep.INFO,
                              _U16.pack(p.Info.DESCRIPTION) + export.description.encode())
        await self._reply(opt, p.Rep.ACK)
        if opt != p.Opt.GO:
            return None
        contexts = self._meta if self._meta_export == export.name else {}
        return Negotiated(export, self._structured, dict(contexts))

    async def _meta_context(self, opt: int, data: bytes) -> None:
        setting = opt == p.Opt.SET_META_CONTEXT
        if setting and not self._structured:
            raise _Invalid("NBD_OPT_SET_META_CONTEXT needs NBD_OPT_STRUCTURED_REPLY first")
        name, rest = _take_string(data)
        if len(rest) < 4:
            raise _Invalid("truncated query count")
        (count,) = _U32.unpack_from(rest)
        rest = rest[4:]
        queries = []
        for _ in range(count):
            query, rest = _take_string(rest)
            queries.append(query)
        if rest:
            raise _Invalid("trailing bytes after the queries")
        export = self._exports.get(self._resolve(name))
        if export is None:
            await self._reply(opt, p.Rep.ERR_UNKNOWN, f"no export named {name!r}".encode())
            return
        chosen = [c for c in export.contexts if _matches(c, queries, listing=not setting)]
        if setting:
            self._meta_export = export.name
            self._meta = {i + 1: c for i, c in enumerate(chosen)}
            pairs = self._meta.items()
        else:
            pairs = ((0, c) for c in chosen)
        for context_id, context in pairs:
            await self._reply(opt, p.Rep.META_CONTEXT, _U32.pack(context_id) + context.encode())
        await self._reply(opt, p.Rep.ACK)

    async def _reply(self, opt: int, rep: int, payload: bytes = b"") -> None:
        if rep >= 1 << 31:
            log.debug("%s: %s -> %s", self._peer, p.name(p.Opt, opt), p.name(p.Rep, rep))
        self._w.write(p.OPTION_REPLY.pack(p.REPLY_MAGIC_OPT, opt, rep, len(payload)) + payload)
        await self._w.drain()


def _take_string(data: bytes) -> tuple[str, bytes]:
    """Split a u32-length-prefixed string off ``data``, checking the length first."""
    if len(data) < 4:
        raise _Invalid("truncated string length")
    (length,) = _U32.unpack_from(data)
    if length > p.MAX_NAME_LENGTH or length > len(data) - 4:
        raise _Invalid("string length out of bounds")
    return data[4:4 + length].decode("utf-8", "replace"), data[4 + length:]


def _matches(context: str, queries: list[str], listing: bool) -> bool:
    """Exact match; when listing, no query or a namespace query ("base:") lists all."""
    if listing and not queries:
        return True
    return any(q == context or (listing and q.endswith(":") and context.startswith(q))
               for q in queries)
