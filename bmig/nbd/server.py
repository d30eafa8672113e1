"""Listeners, per-connection life cycle and a clean stop.

Each export is a chain of layers opened once and shared by all its connections (one fd,
so one fdatasync covers every connection: NBD_FLAG_CAN_MULTI_CONN holds). On SIGTERM the
listeners close, requests in flight finish and are answered, every export is flushed and
the breqd connection is closed.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from dataclasses import dataclass
from typing import Awaitable, Callable

from bmig import systemd
from bmig.errors import ProtocolError
from bmig.nbd import protocol as p
from bmig.nbd.handshake import ExportInfo, Handshake
from bmig.nbd.layers.base import Layer
from bmig.nbd.transmission import Transmission

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
        return ExportInfo(self.name, self.layer.size, flags, self.description)


@dataclass(frozen=True)
class Listen:
    unix: str | None = None
    tcp: tuple[str, int] | None = None


class Server:
    def __init__(self, exports: list[Export], listen: list[Listen], max_connections: int = 64,
                 on_close: Callable[[], Awaitable[None]] | None = None):
        self._exports = {e.name: e for e in exports}
        self._infos = {e.name: e.info() for e in exports}
        self._listen = listen
        self._max = max_connections
        self._on_close = on_close
        self._servers: list[asyncio.base_events.Server] = []
        self._connections: set[asyncio.Task] = set()
        self._transmissions: set[Transmission] = set()
        self._stopping = asyncio.Event()

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stopping.set)
        for where in self._listen:
            if where.unix:
                if os.path.exists(where.unix):
                    os.unlink(where.unix)
                self._servers.append(await asyncio.start_unix_server(self._handle, where.unix,
                                                                    backlog=BACKLOG))
            elif where.tcp:
                self._servers.append(await asyncio.start_server(self._handle, *where.tcp,
                                                               backlog=BACKLOG))
        names = ", ".join(self._exports)
        log.info("serving %s on %s", names, ", ".join(_describe(w) for w in self._listen))
        systemd.notify("READY=1", f"STATUS=serving {names}")
        await self._stopping.wait()
        await self.stop()

    async def stop(self) -> None:
        systemd.notify("STOPPING=1")
        log.info("stopping: finishing requests in flight")
        for server in self._servers:
            server.close()
        for t in list(self._transmissions):
            await t.drain()
        for task in list(self._connections):
            task.cancel()
        await asyncio.gather(*self._connections, return_exceptions=True)
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

    async def _handle(self, reader: asyncio.StreamReader,
                      writer: asyncio.StreamWriter) -> None:
        peer = _peer(writer)
        task = asyncio.current_task()
        assert task is not None
        if len(self._connections) >= self._max:
            log.warning("%s: refused, %d connections already", peer, self._max)
            writer.close()
            return
        self._connections.add(task)
        try:
            negotiated = await asyncio.wait_for(
                Handshake(reader, writer, self._infos, peer).run(), HANDSHAKE_TIMEOUT)
            if negotiated is None or self._stopping.is_set():
                return
            name = negotiated.export.name
            log.debug("%s: transmission on %s", peer, name)
            transmission = Transmission(reader, writer, self._exports[name].layer,
                                        negotiated, f"{peer} {name}")
            self._transmissions.add(transmission)
            try:
                await transmission.run()
            finally:
                self._transmissions.discard(transmission)
        except ProtocolError as exc:
            log.warning("%s", exc.message)
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.TimeoutError) as exc:
            log.debug("%s: connection ended: %s", peer, exc or type(exc).__name__)
        except asyncio.CancelledError:
            pass
        finally:
            self._connections.discard(task)
            writer.close()


def _peer(writer: asyncio.StreamWriter) -> str:
    name = writer.get_extra_info("peername")
    if isinstance(name, tuple):
        return f"{name[0]}:{name[1]}"
    return f"unix:{writer.get_extra_info('sockname') or '?'}"


def _describe(where: Listen) -> str:
    return f"unix:{where.unix}" if where.unix else f"tcp:{where.tcp[0]}:{where.tcp[1]}"
