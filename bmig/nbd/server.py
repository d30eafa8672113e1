"""Listeners, per-connection life cycle and a clean stop.

Each export is a chain of layers opened once and shared by all its connections (one fd,
so one fdatasync covers every connection: NBD_FLAG_CAN_MULTI_CONN holds). On SIGTERM the
listeners close, requests in flight finish and are answered, every export is flushed and
the breqd connection is closed.

It runs what it is given: it may not build layers, choose exports, TLS or listeners, or
decide what is writable (bmig.nbd.service does), nor read requests (bmig.nbd.transmission
does).
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import ssl
import stat
from dataclasses import dataclass
from typing import TYPE_CHECKING, Awaitable, Callable

from bmig import systemd
from bmig.errors import ConfigError, ProtocolError
from bmig.nbd import protocol as p
from bmig.nbd.connection import Connection, TlsHandshakeError
from bmig.nbd.handshake import ExportInfo, Handshake
from bmig.nbd.layers.base import Layer
from bmig.nbd.transmission import Transmission

if TYPE_CHECKING:
    from bmig.nbd.psk import PskContext

log = logging.getLogger("bmig-nbd")

HANDSHAKE_TIMEOUT = 30.0
BACKLOG = 1024


@dataclass
class Export:
    name: str
    layer: Layer
    description: str = ""

    def info(self) -> ExportInfo:
        caps = self.layer.capabilities()
        flags = p.FLAG_HAS_FLAGS | p.FLAG_SEND_FLUSH | p.FLAG_SEND_FUA
        if not caps.writable:
            flags |= p.FLAG_READ_ONLY
        if caps.trim:
            flags |= p.FLAG_SEND_TRIM
        if caps.zero:
            flags |= p.FLAG_SEND_WRITE_ZEROES
        if caps.fast_zero:
            flags |= p.FLAG_SEND_FAST_ZERO
        if caps.multi_conn:
            flags |= p.FLAG_CAN_MULTI_CONN
        contexts = (p.META_BASE_ALLOCATION,) + self.layer.contexts()
        return ExportInfo(self.name, self.layer.size, flags, self.description, contexts)


DEFAULT_UNIX_MODE = 0o600


@dataclass(frozen=True)
class Listen:
    unix: str | None = None
    tcp: tuple[str, int] | None = None
    sock: object | None = None      # a listening socket handed over by systemd
    unix_mode: int = DEFAULT_UNIX_MODE


@dataclass(frozen=True)
class Tls:
    context: ssl.SSLContext | PskContext
    required: bool = True
    clients: str = ""               # how clients are authenticated, for the log

    def describe(self) -> str:
        how = "required" if self.required else "offered"
        return f"TLS {how}" + (f", {self.clients}" if self.clients else "")


class Server:
    def __init__(self, exports: list[Export], listen: list[Listen], max_connections: int = 64,
                 on_close: Callable[[], Awaitable[None]] | None = None,
                 tls: Tls | None = None):
        self._exports = {e.name: e for e in exports}
        self._infos = {e.name: e.info() for e in exports}
        self._listen = listen
        self._max = max_connections
        self._on_close = on_close
        self._tls = tls
        self._servers: list[asyncio.AbstractServer] = []
        self._connections: set[Connection] = set()
        self._lives: set[asyncio.Task] = set()
        self._transmissions: set[Transmission] = set()
        self._stopping = asyncio.Event()

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stopping.set)
        await self.start()
        names = ", ".join(self._exports)
        log.info("serving %s on %s%s", names, ", ".join(_describe(w) for w in self._listen),
                 f" ({self._tls.describe()})" if self._tls else "")
        systemd.notify("READY=1", f"STATUS=serving {names}")
        await self._stopping.wait()
        await self.stop()

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        for where in self._listen:
            if where.sock is not None:
                if getattr(where.sock, "family", None) == socket.AF_UNIX:
                    server = await loop.create_unix_server(self._new_connection,
                                                           sock=where.sock, backlog=BACKLOG)
                else:
                    server = await loop.create_server(self._new_connection, sock=where.sock,
                                                      backlog=BACKLOG)
            elif where.unix:
                server = await loop.create_unix_server(
                    self._new_connection, sock=unix_listener(where.unix, where.unix_mode),
                    backlog=BACKLOG)
            else:
                assert where.tcp is not None
                server = await loop.create_server(self._new_connection, *where.tcp,
                                                  backlog=BACKLOG, reuse_address=True)
            self._servers.append(server)

    def request_stop(self) -> None:
        self._stopping.set()

    async def stop(self) -> None:
        systemd.notify("STOPPING=1")
        log.info("stopping: finishing requests in flight")
        for server in self._servers:
            server.close()
        for t in list(self._transmissions):
            await t.drain()
        for conn in list(self._connections):
            conn.close()
        await asyncio.gather(*self._lives, return_exceptions=True)
        for export in self._exports.values():
            try:
                await export.layer.flush()
            except OSError as exc:
                log.error("%s: final flush failed: %s", export.name, exc)
            await export.layer.close()
        if self._on_close is not None:
            await self._on_close()
        for where in self._listen:
            if where.unix and os.path.exists(where.unix):
                os.unlink(where.unix)

    def _new_connection(self) -> Connection:
        return Connection(on_made=self._connection_made)

    def _connection_made(self, conn: Connection) -> None:
        if len(self._connections) >= self._max or self._stopping.is_set():
            log.warning("%s: refused, %d connections already", conn.peer, self._max)
            conn.abort()
            return
        self._connections.add(conn)
        task = asyncio.get_running_loop().create_task(self._serve(conn))
        self._lives.add(task)
        task.add_done_callback(self._lives.discard)

    async def _serve(self, conn: Connection) -> None:
        peer = conn.peer
        try:
            tls = self._tls
            handshake = Handshake(conn, conn, self._infos, peer,
                                  tls=tls.context if tls else None,
                                  tls_required=bool(tls and tls.required),
                                  start_tls=conn.start_tls)
            negotiated = await asyncio.wait_for(handshake.run(), HANDSHAKE_TIMEOUT)
            if negotiated is None or self._stopping.is_set():
                return
            name = negotiated.export.name
            log.debug("%s: transmission on %s", peer, name)
            transmission = Transmission(conn, self._exports[name].layer, negotiated,
                                        f"{peer} {name}")
            self._transmissions.add(transmission)
            conn.transmission = transmission
            try:
                transmission.process()          # requests sent right after the handshake
                if conn.is_closing:
                    transmission.end_of_stream()
                await asyncio.wait([transmission.finished, conn.closed],
                                   return_when=asyncio.FIRST_COMPLETED)
                await transmission.drain()
            finally:
                self._transmissions.discard(transmission)
        except ProtocolError as exc:
            log.warning("%s", exc.message)
        except TlsHandshakeError as exc:
            log.warning("%s: %s", peer, exc)
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.TimeoutError,
                ssl.SSLError) as exc:
            log.debug("%s: connection ended: %s", peer, exc or type(exc).__name__)
        except asyncio.CancelledError:
            pass
        finally:
            self._connections.discard(conn)
            conn.close()


def unix_listener(path: str, mode: int) -> socket.socket:
    """A Unix socket bound at ``path`` with exactly ``mode``, whatever the umask: the
    umask is narrowed around bind() so that the socket never exists with wider
    permissions, not even for a moment. A stale socket at ``path`` is replaced; any
    other kind of file is left alone and refused."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        pass
    else:
        if not stat.S_ISSOCK(st.st_mode):
            raise ConfigError(f"{path} exists and is not a socket; remove it or choose "
                              "another --unix path")
        os.unlink(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        old = os.umask(0o777 & ~mode)
        try:
            sock.bind(path)
        finally:
            os.umask(old)
        os.chmod(path, mode)     # where a default ACL of the directory overrode the umask
        sock.setblocking(False)
    except OSError as exc:
        sock.close()
        raise ConfigError(f"cannot listen on {path}: {exc.strerror}") from None
    return sock


def _describe(where: Listen) -> str:
    if where.sock is not None:
        return "a socket from systemd"
    return f"unix:{where.unix}" if where.unix else f"tcp:{where.tcp[0]}:{where.tcp[1]}"
