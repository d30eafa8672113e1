"""The NBD client's handshake: fixed newstyle negotiation up to transmission.

    greeting          fixed newstyle required (oldstyle refused); NO_ZEROES if offered
    STARTTLS          for nbds:// addresses, before anything else
    STRUCTURED_REPLY  asked for unless the caller does not want it
    SET_META_CONTEXT  the contexts asked for (block status), with structured replies only
    GO                with block sizes; EXPORT_NAME only when the server does not know GO

Every length the server sends is checked before anything is read for it (option replies
are capped at MAX_OPTION_LENGTH). ``negotiate`` returns what was agreed; on any failure
the caller sends ``abort`` and closes. Requests and replies are
bmig.nbdclient.transmission's.
"""

from __future__ import annotations

import ssl
import struct
from dataclasses import dataclass, field

from bmig.errors import BmigError, ConfigError
from bmig.nbd import protocol as p
from bmig.limits import MAX_NBD_CONTEXTS as MAX_CONTEXTS
from bmig.nbdclient.connection import NbdSocket
from bmig.nbdclient.errors import NbdExportError, ServerClosed, printable

U16 = struct.Struct(">H")
U32 = struct.Struct(">I")


@dataclass
class Negotiated:
    """What the server offered and the client took."""

    size: int = 0
    flags: int = 0                      # transmission flags
    structured: bool = False
    contexts: dict[str, int] = field(default_factory=dict)   # meta context name -> id
    min_block_size: int = p.MIN_BLOCK_SIZE
    preferred_block_size: int = p.PREFERRED_BLOCK_SIZE
    max_block_size: int = p.MAX_PAYLOAD
    no_zeroes: bool = False             # NBD_FLAG_NO_ZEROES: no padding after EXPORT_NAME


def negotiate(conn: NbdSocket, contexts: tuple[str, ...], tls_context: ssl.SSLContext | None,
              structured: bool) -> Negotiated:
    """From the greeting to the start of transmission."""
    return _Negotiation(conn).run(contexts, tls_context, structured)


def abort(conn: NbdSocket) -> None:
    """A soft disconnect if the connection still works (proto.md asks for one), then
    close."""
    if conn.broken is None:
        try:
            conn.send(p.OPTION_HEADER.pack(p.IHAVEOPT, p.Opt.ABORT, 0), b"")
        except BmigError:
            pass
    conn.close()


def power_of_two(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


class _Negotiation:
    def __init__(self, conn: NbdSocket):
        self.conn = conn
        self.address = conn.address
        self.export = conn.address.export
        self.result = Negotiated()

    def run(self, contexts: tuple[str, ...], tls_context: ssl.SSLContext | None,
            structured: bool) -> Negotiated:
        self._greeting()
        if self.address.tls:
            self._start_tls(tls_context)
        if structured:
            self.result.structured = self._negotiate_structured()
        if self.result.structured and contexts:
            self.result.contexts = self._set_meta_contexts(contexts)
        if not self._go():
            self._export_name()
        return self.result

    def _protocol(self, message: str) -> BmigError:
        return self.conn.protocol(message)

    def _recv(self, n: int) -> bytes:
        return self.conn.recv(n)

    def _send(self, head: bytes, payload: bytes | None = None) -> None:
        self.conn.send(head, payload)

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
        self.result.no_zeroes = bool(flags & p.FLAG_NO_ZEROES)
        no_zeroes = p.FLAG_C_NO_ZEROES if self.result.no_zeroes else 0
        client_flags = p.FLAG_C_FIXED_NEWSTYLE | no_zeroes
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
        text = printable(data)
        return NbdExportError(f"{message} ({text})" if text else message, rep)

    def _start_tls(self, context: ssl.SSLContext | None) -> None:
        self._option(p.Opt.STARTTLS)
        rep, data = self._option_reply(p.Opt.STARTTLS)
        if rep != p.Rep.ACK:
            raise self._refused(p.Opt.STARTTLS, rep, data)
        self.conn.start_tls(context)

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
        data = b"".join([U32.pack(len(export)), export, U32.pack(len(queries)),
                         *(U32.pack(len(q)) + q for q in queries)])
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
            if len(data) <= U32.size or len(contexts) >= MAX_CONTEXTS:
                raise self._protocol("bad or too many NBD_REP_META_CONTEXT replies")
            contexts[data[U32.size:].decode("utf-8", "replace")] = U32.unpack_from(data)[0]

    def _go(self) -> bool:
        """NBD_OPT_GO asking for block sizes; False if the server does not know it."""
        name = self.export.encode()
        requests = [p.Info.BLOCK_SIZE]
        self._option(p.Opt.GO, b"".join([U32.pack(len(name)), name, U16.pack(len(requests)),
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
            self.result.size, self.result.flags = p.EXPORT_NAME_REPLY.unpack(body)
            return True
        if kind == p.Info.BLOCK_SIZE:
            if len(body) != p.BLOCK_SIZES.size:
                raise self._protocol(f"NBD_INFO_BLOCK_SIZE of {len(data)} bytes (must be 14)")
            self._set_block_sizes(*p.BLOCK_SIZES.unpack(body))
        return False

    def _set_block_sizes(self, minimum: int, preferred: int, maximum: int) -> None:
        if not (power_of_two(minimum) and minimum <= 65536 and power_of_two(preferred)
                and preferred >= minimum and maximum >= minimum
                and (maximum % minimum == 0 or maximum == p.BLOCK_SIZE_NONE)):
            raise self._protocol(f"invalid block sizes: minimum {minimum}, preferred "
                                 f"{preferred}, maximum {maximum}")
        self.result.min_block_size, self.result.preferred_block_size = minimum, preferred
        self.result.max_block_size = maximum

    def _export_name(self) -> None:
        self._option(p.Opt.EXPORT_NAME, self.export.encode())
        try:
            self.result.size, self.result.flags = p.EXPORT_NAME_REPLY.unpack(
                self._recv(p.EXPORT_NAME_REPLY.size))
        except ServerClosed:
            raise NbdExportError(f"{self.address} closed the connection on NBD_OPT_EXPORT_NAME: "
                                 f"no export named {self.export!r}, or it requires TLS") from None
        if not self.result.no_zeroes:
            self._recv(p.EXPORT_NAME_PADDING)
