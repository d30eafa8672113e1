"""One client connection: the receive buffer, the handshake phase, then transmission.

The connection is an asyncio BufferedProtocol: the kernel copies what arrives straight
into a buffer of ours (``recv_into``), and a large write payload straight into the buffer
the write is made from, so a byte is copied once on its way from the socket to the source.
Many small requests that arrive together are parsed, executed and answered in the same
event-loop turn (see bmig.nbd.transmission).

During the handshake the connection looks like a stream (``readexactly``, ``write``,
``drain``) to bmig.nbd.handshake; ``start_tls`` upgrades it in place for NBD_OPT_STARTTLS.
Lock order, for the record: there are no locks; everything runs on the event loop.

It moves bytes (and TLS); it may not parse requests (bmig.nbd.transmission does) or
options (bmig.nbd.handshake), and it knows no export and no layer.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from typing import TYPE_CHECKING, Callable, cast

from bmig.errors import ProtocolError
from bmig.limits import RECV_BUFFER

if TYPE_CHECKING:
    from bmig.nbd.psk import PskContext
    from bmig.nbd.transmission import Transmission

log = logging.getLogger("bmig-nbd")

COMPACT_BELOW = 160 * 1024     # compact when less room than this is left at the end
TLS_HANDSHAKE_TIMEOUT = 30.0


class TlsHandshakeError(ConnectionError):
    """The client's TLS handshake failed: no or a wrong certificate, an unknown PSK
    identity or a wrong key, or no TLS at all."""


class Connection(asyncio.BufferedProtocol):
    def __init__(self, on_made: Callable[["Connection"], None] | None = None) -> None:
        self._on_made = on_made
        self.peer = "?"
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray(RECV_BUFFER)
        self.view = memoryview(self.buf)
        self.start = 0                   # unread bytes are buf[start:end]
        self.end = 0
        self.transmission: Transmission | None = None
        self._sink: memoryview | None = None     # a payload received in place
        self._sink_got = 0
        self._want = 0
        self._waiter: asyncio.Future | None = None
        self._eof = False
        self._writable = asyncio.Event()
        self._writable.set()
        self.reading_paused = False            # read by the transmission loop; set here only
        self._pause_reasons: set[str] = set()
        self.closed: asyncio.Future = asyncio.get_running_loop().create_future()

    # -- asyncio protocol ------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A stream transport, though uvloop's do not derive from asyncio.Transport.
        self.transport = cast(asyncio.Transport, transport)
        name = transport.get_extra_info("peername")
        if isinstance(name, tuple):
            self.peer = f"{name[0]}:{name[1]}"
        else:
            self.peer = f"unix:{transport.get_extra_info('sockname') or '?'}"
        if self._on_made is not None:
            self._on_made(self)

    def get_buffer(self, sizehint: int) -> memoryview:
        if self._sink is not None:
            return self._sink[self._sink_got:]
        if len(self.buf) - self.end < COMPACT_BELOW:
            self.compact()
        return self.view[self.end:]

    def buffer_updated(self, nbytes: int) -> None:
        if self._sink is not None:
            self._sink_got += nbytes
            if self._sink_got == len(self._sink):
                self._sink = None
                assert self.transmission is not None
                self.transmission.payload_received()
            return
        self.end += nbytes
        if self.transmission is not None:
            self.transmission.process()
        elif self._waiter is not None and self.end - self.start >= self._want:
            if not self._waiter.done():
                self._waiter.set_result(None)

    def eof_received(self) -> bool:
        self._eof = True
        self._wake_waiter()
        if self.transmission is not None:
            self.transmission.process()
            self.transmission.end_of_stream()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._eof = True
        self._wake_waiter()
        self._writable.set()
        if not self.closed.done():
            self.closed.set_result(None)

    def pause_writing(self) -> None:
        """The client does not read its replies: stop reading its requests."""
        self._writable.clear()
        self.pause_reading("replies")

    def resume_writing(self) -> None:
        self._writable.set()
        self.resume_reading("replies")

    # -- reading ---------------------------------------------------------------------

    def compact(self) -> None:
        """Move the unread bytes to the front of the buffer."""
        n = self.end - self.start
        if self.start:
            self.buf[:n] = self.view[self.start:self.end]
            self.start, self.end = 0, n

    def receive_into(self, target: memoryview) -> bool:
        """Receive the next ``len(target)`` bytes straight into ``target`` (a payload).
        True if they were all buffered already; otherwise the transmission's
        ``payload_received`` is called once later reads have filled it."""
        have = min(self.end - self.start, len(target))
        target[:have] = self.view[self.start:self.start + have]
        self.start += have
        if have == len(target):
            return True
        self._sink, self._sink_got = target, have
        return False

    def pause_reading(self, reason: str) -> None:
        self._pause_reasons.add(reason)
        if not self.reading_paused and self.transport is not None \
                and not self.transport.is_closing():
            self.reading_paused = True
            self.transport.pause_reading()

    def resume_reading(self, reason: str) -> None:
        self._pause_reasons.discard(reason)
        if self.reading_paused and not self._pause_reasons:
            self.reading_paused = False
            if self.transport is not None and not self.transport.is_closing():
                self.transport.resume_reading()
            if self.transmission is not None:    # bytes that arrived before the pause
                asyncio.get_running_loop().call_soon(self.transmission.process)

    async def readexactly(self, n: int) -> bytes:
        """The handshake's read: exactly ``n`` bytes, IncompleteReadError at the end."""
        while self.end - self.start < n:
            if self._eof:
                partial = bytes(self.view[self.start:self.end])
                self.start = self.end
                raise asyncio.IncompleteReadError(partial, n)
            if n > len(self.buf):
                raise ProtocolError(f"{self.peer}: read of {n} bytes exceeds the buffer")
            if len(self.buf) - self.start < n:
                self.compact()
            self._want = n
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        data = bytes(self.view[self.start:self.start + n])
        self.start += n
        return data

    def pending(self) -> int:
        return self.end - self.start

    def _wake_waiter(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    # -- writing ---------------------------------------------------------------------

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    async def drain(self) -> None:
        if self.transport is None or self.transport.is_closing():
            raise ConnectionResetError("connection closed")
        await self._writable.wait()

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    @property
    def is_closing(self) -> bool:
        return self.transport is None or self.transport.is_closing()

    async def start_tls(self, context: ssl.SSLContext | PskContext) -> str:
        """Upgrade to TLS in place (NBD_OPT_STARTTLS, after its ACK was sent): asyncio's
        TLS for certificates, bmig.nbd.psk's for a PSK. Returns who the client proved
        to be ("" when TLS did not authenticate it)."""
        if self.pending():
            raise ProtocolError(f"{self.peer}: data sent after NBD_OPT_STARTTLS before "
                                "the TLS handshake")
        await self.drain()
        assert self.transport is not None
        if isinstance(context, ssl.SSLContext):
            loop = asyncio.get_running_loop()
            try:
                transport = await loop.start_tls(self.transport, self, context,
                                                 server_side=True,
                                                 ssl_handshake_timeout=TLS_HANDSHAKE_TIMEOUT)
            except ssl.SSLError as exc:
                raise TlsHandshakeError(f"TLS handshake failed: {exc.reason or exc}") from None
            if transport is None:
                raise ConnectionResetError("TLS handshake did not complete")
            self.transport = transport
            who = _certificate_subject(transport.get_extra_info("peercert"))
        else:
            transport = await context.start_tls(self.transport, self)
            self.transport = transport
            identity = transport.get_extra_info("psk_identity") or b""
            who = f"PSK identity {identity.decode(errors='replace')!r}"
        cipher = transport.get_extra_info("cipher")
        return ", ".join(filter(None, (f"{cipher[1]} {cipher[0]}" if cipher else "", who)))


_SHORT_NAMES = {"commonName": "CN", "organizationName": "O", "organizationalUnitName": "OU",
                "countryName": "C", "localityName": "L", "stateOrProvinceName": "ST"}


def _certificate_subject(cert: dict | None) -> str:
    """The client certificate's subject as one string ("" without one)."""
    if not cert:
        return ""
    parts = [f"{_SHORT_NAMES.get(key, key)}={value}"
             for rdn in cert.get("subject", ()) for key, value in rdn]
    return "client certificate " + ",".join(parts)
