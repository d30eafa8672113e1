"""TLS-PSK for bmig-nbd: the PSK file and the TLS layer that uses it.

The PSK file has the format nbdkit's --tls-psk and GnuTLS's psktool use: one
``identity:hexkey`` line per client. Clients such as ``nbdinfo --tls-psk-file`` (libnbd)
and qemu's ``tls-creds-psk`` read the same file.

Python's ssl module (before 3.13) has no PSK API, so this layer runs OpenSSL through
pyOpenSSL, with the PSK callback of the bindings that ``cryptography`` provides for it.
OpenSSL does all of TLS; what lives here is the glue between a memory-BIO connection and
asyncio: a transport that the NBD connection protocol reads and writes as it would read
and write asyncio's own TLS transport. Nothing of it runs before NBD_OPT_STARTTLS, and
only PSK connections pass through it.

It may not know NBD: it is a TLS transport, and the connection uses it as it uses
asyncio's.
"""

from __future__ import annotations

import asyncio
import logging
import re
import stat
from typing import Any

from bmig.config import read_small_file
from bmig.errors import ConfigError
from bmig.limits import MAX_PSK_FILE
from bmig.limits import MAX_PSK_IDENTITY as MAX_IDENTITY
from bmig.limits import MAX_PSK_KEY_BYTES as MAX_KEY_BYTES
from bmig.nbd.connection import TlsHandshakeError

log = logging.getLogger("bmig-nbd")

MIN_KEY_BYTES = 16
READ_CHUNK = 16 * 1024          # plaintext taken from OpenSSL per call (one record)
WRITE_CHUNK = 256 * 1024        # ciphertext moved to the socket per call
# TLS 1.2 suites when the client offers no TLS 1.3; forward-secret ones first.
TLS12_PSK_CIPHERS = (b"ECDHE-PSK-CHACHA20-POLY1305:DHE-PSK-AES256-GCM-SHA384:"
                     b"DHE-PSK-AES128-GCM-SHA256:DHE-PSK-CHACHA20-POLY1305:"
                     b"PSK-AES256-GCM-SHA384:PSK-AES128-GCM-SHA256:PSK-CHACHA20-POLY1305")
_HEX = re.compile(rb"(?:[0-9a-fA-F]{2})+")


def load_psk_file(path: str) -> dict[bytes, bytes]:
    """Identities and keys from a PSK file that only its owner can read."""
    data, st = read_small_file(path, MAX_PSK_FILE, "PSK file")
    if st.st_mode & 0o077:
        raise ConfigError(f"PSK file {path} can be read by others (mode "
                          f"{stat.S_IMODE(st.st_mode):04o}); chmod 600 {path}")
    keys: dict[bytes, bytes] = {}
    for number, line in enumerate(data.splitlines(), 1):
        line = line.strip()
        if not line:
            continue
        identity, colon, hexkey = line.partition(b":")
        where = f"PSK file {path} line {number}"
        if not colon or not identity or not _HEX.fullmatch(hexkey):
            raise ConfigError(f"{where}: expected IDENTITY:HEXKEY (as psktool writes)")
        if len(identity) > MAX_IDENTITY or any(c < 0x21 or c == 0x7f for c in identity):
            raise ConfigError(f"{where}: the identity must be printable, without spaces, and "
                              f"at most {MAX_IDENTITY} bytes")
        key = bytes.fromhex(hexkey.decode())
        if not MIN_KEY_BYTES <= len(key) <= MAX_KEY_BYTES:
            raise ConfigError(f"{where}: the key has {len(key)} bytes; use {MIN_KEY_BYTES} to "
                              f"{MAX_KEY_BYTES} (psktool makes 32)")
        if identity in keys:
            raise ConfigError(f"{where}: identity {identity.decode(errors='replace')!r} "
                              "is given twice")
        keys[identity] = key
    if not keys:
        raise ConfigError(f"PSK file {path} holds no key; make one with: "
                          f"psktool -u NAME -p {path}")
    return keys


class PskContext:
    """The server side of TLS-PSK: an OpenSSL context whose only credentials are the keys.

    No certificate is loaded, so a client that does not know a key gets no session: an
    unknown identity or a wrong key ends the TLS handshake. Sessions are not resumed,
    so a session always starts from a key in the file as it was loaded.
    """

    def __init__(self, path: str):
        try:
            from OpenSSL import SSL
            from OpenSSL._util import ffi, lib
        except ImportError:
            raise ConfigError("--tls-psk needs pyOpenSSL (pip install pyOpenSSL)") from None
        if not getattr(lib, "Cryptography_HAS_PSK", False) or \
                not hasattr(lib, "SSL_CTX_set_psk_server_callback"):
            raise ConfigError("--tls-psk: this OpenSSL build has no TLS-PSK")
        self.path = path
        self._keys = load_psk_file(path)
        self._ssl = SSL
        self._ffi = ffi
        context = SSL.Context(SSL.TLS_SERVER_METHOD)
        context.set_min_proto_version(SSL.TLS1_2_VERSION)
        context.set_cipher_list(TLS12_PSK_CIPHERS)
        context.set_options(SSL.OP_NO_RENEGOTIATION | SSL.OP_NO_TICKET |
                            SSL.OP_NO_COMPRESSION)
        context.set_session_cache_mode(SSL.SESS_CACHE_OFF)
        # The callback object must live as long as the context: keep it here.
        self._callback = ffi.callback(
            "unsigned int (*)(SSL *, const char *, unsigned char *, unsigned int)",
            self._find_key, error=0)
        # pyOpenSSL has no PSK method; cryptography binds OpenSSL's for this use.
        lib.SSL_CTX_set_psk_server_callback(context._context, self._callback)
        self._context = context
        # (identity, known) as the callback saw them in the current handshake step
        self.last_identity: tuple[bytes, bool] | None = None

    def _find_key(self, _ssl: Any, identity: Any, psk: Any, max_len: int) -> int:
        """OpenSSL's question: the key of this identity, or 0 to refuse it."""
        name = self._ffi.string(identity, MAX_IDENTITY + 1) if identity else b""
        key = self._keys.get(name)
        self.last_identity = (name, key is not None)
        if key is None or len(key) > max_len:
            return 0
        self._ffi.memmove(psk, key, len(key))
        return len(key)

    def identities(self) -> int:
        return len(self._keys)

    async def start_tls(self, raw: asyncio.Transport,
                        app: asyncio.BufferedProtocol) -> "PskTransport":
        """Take over ``raw`` (no bytes may be buffered in ``app``), run the handshake and
        return the transport ``app`` then reads and writes through."""
        conn = self._ssl.Connection(self._context, None)
        conn.set_accept_state()
        transport = PskTransport(self, raw, app, conn)
        raw.set_protocol(transport.wire)
        await transport.handshake_done
        return transport

    def handshake_step(self, conn: Any) -> None:
        """One call of SSL_do_handshake (WantReadError until it is done). The identity
        the client named during it, if it named one, is then in ``last_identity``: the
        loop runs one handshake step at a time, so no other connection's is there."""
        self.last_identity = None
        conn.do_handshake()


class _Wire(asyncio.Protocol):
    """The protocol of the socket under the TLS layer: ciphertext in, events up."""

    def __init__(self, owner: "PskTransport"):
        self._owner = owner

    def data_received(self, data: bytes) -> None:
        self._owner.ciphertext_received(data)

    def eof_received(self) -> bool:
        self._owner.wire_eof()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._owner.wire_lost(exc)

    def pause_writing(self) -> None:
        self._owner.app.pause_writing()

    def resume_writing(self) -> None:
        self._owner.app.resume_writing()


class PskTransport(asyncio.Transport):
    """Plaintext transport over a socket transport, through a memory-BIO OpenSSL
    connection. Reads go straight into the protocol's buffer (``get_buffer``);
    ``pause_reading`` stops both the delivery of decrypted bytes and the socket."""

    def __init__(self, context: PskContext, raw: asyncio.Transport,
                 app: asyncio.BufferedProtocol, conn: Any):
        super().__init__()
        self._context = context
        self._ssl = context._ssl
        self._raw = raw
        self.app = app
        self._conn = conn
        self.wire = _Wire(self)
        self._loop = asyncio.get_running_loop()
        self.handshake_done: asyncio.Future = self._loop.create_future()
        self.identity: bytes | None = None
        self._known = False
        self._paused = False
        self._closing = False
        self._eof = False
        self.handshake_done.add_done_callback(self._handshake_ended)

    # -- the socket side -------------------------------------------------------------

    def _handshake_ended(self, future: asyncio.Future) -> None:
        if future.cancelled():          # the handshake deadline passed: drop the client
            self._closing = True
            self._raw.abort()

    def ciphertext_received(self, data: bytes) -> None:
        if self._closing:
            return
        try:
            self._conn.bio_write(data)
        except self._ssl.Error as exc:
            self._fail(exc)
            return
        if self.handshake_done.done():
            self._deliver()
        else:
            self._handshake()

    def wire_eof(self) -> None:
        if not self.handshake_done.done():
            self.handshake_done.set_exception(
                TlsHandshakeError("the client closed the connection during the handshake"))
            return
        self._deliver()
        if not self._closing:
            self._tell_eof()

    def _tell_eof(self) -> None:
        """The client is done sending; as with asyncio's transports, unless the
        protocol asks to stay open, the connection closes."""
        if not self._eof:
            self._eof = True
            if not self.app.eof_received():
                self.close()

    def wire_lost(self, exc: Exception | None) -> None:
        self._closing = True
        if not self.handshake_done.done():
            self.handshake_done.set_exception(
                TlsHandshakeError("the connection was lost during the handshake"))
            return
        self.app.connection_lost(exc)

    def _handshake(self) -> None:
        try:
            self._context.handshake_step(self._conn)
        except self._ssl.WantReadError:
            self._note_identity()
            self._flush()
            return
        except self._ssl.Error as exc:
            self._note_identity()
            self._flush()               # the alert tells the client why
            self.handshake_done.set_exception(TlsHandshakeError(self._failure(exc)))
            self._closing = True
            self._raw.close()
            return
        self._note_identity()
        self._flush()
        self.handshake_done.set_result(None)
        # Bytes that came with the last handshake flight. Scheduled after the waiter's
        # wake-up, so the protocol has switched to this transport before they arrive.
        self._loop.call_soon(self._deliver)

    def _note_identity(self) -> None:
        if self._context.last_identity is not None:
            self.identity, self._known = self._context.last_identity

    def _failure(self, exc: BaseException) -> str:
        if self.identity is None:
            return f"TLS-PSK handshake failed, no PSK identity offered: {_reason(exc)}"
        name = self.identity.decode(errors="replace")
        if not self._known:
            return f"TLS-PSK handshake refused: unknown PSK identity {name!r}"
        return (f"TLS-PSK handshake failed for PSK identity {name!r} (a wrong key?): "
                f"{_reason(exc)}")

    def _deliver(self) -> None:
        """Decrypted bytes to the protocol, as long as it reads."""
        while not self._paused and not self._closing:
            buf = self.app.get_buffer(READ_CHUNK)
            if not len(buf):
                break
            try:
                n = self._conn.recv_into(buf, READ_CHUNK)
            except self._ssl.WantReadError:
                break
            except self._ssl.ZeroReturnError:      # close_notify
                self._tell_eof()
                break
            except self._ssl.Error as exc:
                self._fail(exc)
                return
            self.app.buffer_updated(n)
        self._flush()

    def _flush(self) -> None:
        """Ciphertext OpenSSL produced, to the socket."""
        while True:
            try:
                data = self._conn.bio_read(WRITE_CHUNK)
            except self._ssl.WantReadError:
                return
            except self._ssl.Error:
                return
            if not data:
                return
            if not self._raw.is_closing():
                self._raw.write(data)

    def _fail(self, exc: BaseException) -> None:
        log.debug("TLS-PSK connection ended: %s", _reason(exc))
        self._flush()
        self._closing = True
        self._raw.close()

    # -- the transport the protocol sees ---------------------------------------------

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self._closing:
            return
        try:
            self._conn.sendall(data)
        except self._ssl.Error as exc:
            self._fail(exc)
            return
        self._flush()

    def writelines(self, list_of_data) -> None:
        for data in list_of_data:
            self.write(data)

    def can_write_eof(self) -> bool:
        return False

    def close(self) -> None:
        if self._closing:
            return
        self._closing = True
        try:
            self._conn.shutdown()           # close_notify
        except self._ssl.Error:
            pass
        self._flush()
        self._raw.close()

    def abort(self) -> None:
        self._closing = True
        self._raw.abort()

    def is_closing(self) -> bool:
        return self._closing or self._raw.is_closing()

    def pause_reading(self) -> None:
        self._paused = True
        self._raw.pause_reading()

    def resume_reading(self) -> None:
        if not self._paused:
            return
        self._paused = False
        self._raw.resume_reading()
        self._loop.call_soon(self._deliver)  # bytes OpenSSL decrypted before the pause

    def is_reading(self) -> bool:
        return not self._paused

    def get_write_buffer_size(self) -> int:
        return self._raw.get_write_buffer_size()

    def set_write_buffer_limits(self, high=None, low=None) -> None:
        self._raw.set_write_buffer_limits(high, low)

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        if name == "psk_identity":
            return self.identity
        if name == "cipher":            # as ssl.SSLObject.cipher() has it
            return (self._conn.get_cipher_name(), self._conn.get_protocol_version_name(),
                    self._conn.get_cipher_bits())
        return self._raw.get_extra_info(name, default)

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        assert isinstance(protocol, asyncio.BufferedProtocol)
        self.app = protocol

    def get_protocol(self) -> asyncio.BaseProtocol:
        return self.app


def _reason(exc: BaseException) -> str:
    """OpenSSL's reasons, without the library and function names around them."""
    args = getattr(exc, "args", ())
    if args and isinstance(args[0], list):
        reasons = [str(entry[-1]) for entry in args[0] if entry]
        if reasons:
            return "; ".join(reasons)
    return str(exc) or type(exc).__name__
