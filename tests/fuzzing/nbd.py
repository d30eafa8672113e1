"""Drivers for bmig-nbd's parsers: the fixed-newstyle handshake (option loop), the
transmission phase (request parsing and validation) and NbdClient's reply parsing.

In every driver the first byte of an input chooses the configuration (TLS offered or
required, structured replies, meta contexts, read-only), so that an input is reproduced
by itself."""

from __future__ import annotations

import asyncio
import logging
import os
import random
import re
import socket
import struct
import threading
import zlib

import uvloop

from bmig.errors import BmigError, ProtocolError
from bmig.nbd import protocol as p
from bmig.nbdclient import NbdAddress, NbdClient, NbdError
from bmig.nbdclient import handshake as client_handshake
from bmig.nbdclient.connection import NbdSocket
from bmig.nbd.connection import Connection
from bmig.nbd.handshake import ExportInfo, Handshake, Negotiated
from bmig.nbd.layers.base import Layer
from bmig.nbd.layers.file import FileLayer
from bmig.nbd.server import Export, Listen, Server
from bmig.nbd.transmission import Transmission
from tests.fuzzing.engine import Driver, Field, Frame, Seed, Violation, seed

SIZE = 1 << 20
DIRTY_CONTEXT = p.META_DIRTY_BITMAP_PREFIX + "fuzz"
_U16 = struct.Struct(">H")
_U32 = struct.Struct(">I")

NBD_TOKENS = [struct.pack(">Q", p.IHAVEOPT), struct.pack(">I", p.REQUEST_MAGIC),
              struct.pack(">I", p.SIMPLE_REPLY_MAGIC), struct.pack(">I", p.STRUCTURED_REPLY_MAGIC),
              struct.pack(">Q", p.REPLY_MAGIC_OPT), b"base:allocation", DIRTY_CONTEXT.encode(),
              b"qemu:", b"base:", b"\xff\xff\xff\xff", b"\x00\x00\x00\x00"]


# -- the handshake ------------------------------------------------------------------------

class _Reader:
    """The client's bytes; the end of them is the end of the stream."""

    def __init__(self, data: bytes):
        self._data = memoryview(data)
        self._pos = 0

    async def readexactly(self, n: int) -> bytes:
        if self._pos + n > len(self._data):
            partial = bytes(self._data[self._pos:])
            self._pos = len(self._data)
            raise asyncio.IncompleteReadError(partial, n)
        out = bytes(self._data[self._pos:self._pos + n])
        self._pos += n
        return out


class _Writer:
    def __init__(self) -> None:
        self.written = 0

    def write(self, data: bytes) -> None:
        self.written += len(data)

    async def drain(self) -> None:
        pass


def _complete(coro):
    """Run a coroutine that never waits for anything to its end."""
    try:
        coro.send(None)
    except StopIteration as done:
        return done.value
    coro.close()
    raise Violation("the handshake waited for something other than the client's bytes")


HANDSHAKE_EXPORTS = {
    "a": ExportInfo("a", SIZE, p.FLAG_HAS_FLAGS | p.FLAG_SEND_FLUSH, "disk a",
                    (p.META_BASE_ALLOCATION, DIRTY_CONTEXT)),
    "b": ExportInfo("b", 2 * SIZE, p.FLAG_HAS_FLAGS | p.FLAG_READ_ONLY),
}
TLS_CONFIGS = ("none", "offered", "required")


def option(opt: int, data: bytes = b"") -> Frame:
    fields = (Field(0, 8, "big"), Field(8, 4, "big"), Field(12, 4, "big"))
    if len(data) >= 4:
        fields += (Field(16, 4, "big"),)
    return Frame(p.OPTION_HEADER.pack(p.IHAVEOPT, opt, len(data)) + data, fields)


def _string(text: bytes) -> bytes:
    return _U32.pack(len(text)) + text


def go(opt: int, name: bytes, *infos: int) -> Frame:
    body = _string(name) + _U16.pack(len(infos)) + b"".join(_U16.pack(i) for i in infos)
    frame = option(opt, body)
    return Frame(frame.data, frame.fields + (Field(16 + 4 + len(name), 2, "big"),))


def meta(opt: int, name: bytes, *queries: bytes) -> Frame:
    body = _string(name) + _U32.pack(len(queries)) + b"".join(_string(q) for q in queries)
    frame = option(opt, body)
    return Frame(frame.data, frame.fields + (Field(16 + 4 + len(name), 4, "big"),))


FLAGS = Frame(p.CLIENT_FLAGS.pack(p.FLAG_C_FIXED_NEWSTYLE | p.FLAG_C_NO_ZEROES),
              (Field(0, 4, "big"),))


class NbdHandshake(Driver):
    name = "nbd-handshake"
    what = "bmig-nbd fixed-newstyle option loop (bmig/nbd/handshake.py)"
    allowed = (ProtocolError, asyncio.IncompleteReadError)
    dictionary = NBD_TOKENS

    def seeds(self) -> list[Seed]:
        base = p.META_BASE_ALLOCATION.encode()
        out = []
        for config in range(len(TLS_CONFIGS)):
            c = Frame(bytes([config]))
            tls = [option(p.Opt.STARTTLS)] if config else []
            out += [
                seed("go", c, FLAGS, *tls, go(p.Opt.GO, b"a", p.Info.NAME, p.Info.DESCRIPTION)),
                seed("list-abort", c, FLAGS, *tls, option(p.Opt.LIST), option(p.Opt.ABORT)),
                seed("export-name", c, FLAGS, *tls, option(p.Opt.EXPORT_NAME, b"b")),
                seed("structured-meta-go", c, FLAGS, *tls, option(p.Opt.STRUCTURED_REPLY),
                     meta(p.Opt.LIST_META_CONTEXT, b"a"),
                     meta(p.Opt.LIST_META_CONTEXT, b"a", b"qemu:"),
                     meta(p.Opt.SET_META_CONTEXT, b"a", base, DIRTY_CONTEXT.encode()),
                     go(p.Opt.INFO, b"a", p.Info.BLOCK_SIZE), go(p.Opt.GO, b"a")),
                seed("unknown-then-default", c, FLAGS, *tls, option(99, b"xyz"),
                     option(p.Opt.EXTENDED_HEADERS), go(p.Opt.GO, b"nope"), go(p.Opt.GO, b"")),
                seed("tls-twice", c, FLAGS, option(p.Opt.STARTTLS), option(p.Opt.STARTTLS),
                     option(p.Opt.STARTTLS, b"x"), go(p.Opt.GO, b"b")),
            ]
        return out

    def run(self, data: bytes) -> None:
        config = TLS_CONFIGS[data[0] % len(TLS_CONFIGS)] if data else "none"
        tls = object() if config != "none" else None
        started = []

        async def start_tls(context) -> str:
            started.append(context)
            return "PSK identity 'fuzz'"

        shake = Handshake(_Reader(data[1:]), _Writer(), HANDSHAKE_EXPORTS, "fuzz", tls=tls,
                          tls_required=config == "required", start_tls=start_tls)
        result = _complete(shake.run())
        if result is None:
            return
        export = result.export
        if export not in HANDSHAKE_EXPORTS.values():
            raise Violation(f"negotiated an export that is not configured: {export}")
        if config == "required" and not shake.tls_active:
            raise Violation("transmission without TLS although TLS is required")
        if any(name not in export.contexts for name in result.contexts.values()):
            raise Violation(f"meta contexts {result.contexts} not offered by {export.name}")
        if result.contexts and not result.structured:
            raise Violation("meta contexts without structured replies")


# -- transmission -------------------------------------------------------------------------

class ContractLayer(Layer):
    """Between the transmission and the file: fails (AssertionError, which the
    transmission can only log as an unexpected failure) on any request that its
    validation should have refused."""

    def __init__(self, inner: Layer):
        super().__init__(inner)

    def _check(self, what: str, offset: int, length: int, write: bool = False) -> None:
        if offset < 0 or length <= 0 or offset + length > self.size:
            raise AssertionError(f"{what} {offset}+{length} reached the layers "
                                 f"(export of {self.size} bytes)")
        if write and not self.capabilities().writable:
            raise AssertionError(f"{what} reached a read-only export")

    def read_now(self, buf, offset):
        self._check("read", offset, len(buf))
        if len(buf) > p.MAX_PAYLOAD:
            raise AssertionError(f"read of {len(buf)} bytes reached the layers")
        return self._next().read_now(buf, offset)

    async def read(self, buf, offset):
        self._check("read", offset, len(buf))
        await self._next().read(buf, offset)

    def write_now(self, data, offset, fua):
        self._check("write", offset, len(data), write=True)
        return self._next().write_now(data, offset, fua)

    async def write(self, data, offset, fua):
        self._check("write", offset, len(data), write=True)
        await self._next().write(data, offset, fua)

    async def trim(self, offset, length, fua):
        self._check("trim", offset, length, write=True)
        await self._next().trim(offset, length, fua)

    async def zero(self, offset, length, fua, may_trim, fast):
        self._check("zero", offset, length, write=True)
        await self._next().zero(offset, length, fua, may_trim, fast)

    def extents(self, offset, length):
        self._check("block status", offset, length)
        return self._next().extents(offset, length)

    def contexts(self):
        return (DIRTY_CONTEXT,)

    async def context_extents(self, context, offset, length):
        self._check("block status", offset, length)
        if context != DIRTY_CONTEXT:
            raise AssertionError(f"unknown context {context!r} reached the layers")
        return [(min(length, 65536), 1), (length, 0)]


class _Refusals(logging.Handler):
    _NUMBERS = re.compile(r"0x[0-9a-fA-F]+|\d+")

    def __init__(self, found: list[str]):
        super().__init__(logging.DEBUG)
        self.found = found

    def emit(self, record: logging.LogRecord) -> None:
        if "->" in str(record.msg) and isinstance(record.args, tuple) \
                and len(record.args) == 3:             # nbd_error: what, why, NBD error
            text = f"{record.args[1]} -> {record.args[2]}"
        elif record.levelno >= logging.WARNING:       # the connection was closed
            text = record.getMessage().replace("fuzz: ", "", 1)
        else:
            return
        self.found.append(self._NUMBERS.sub("N", text)[:100])


class _Transport(asyncio.Transport):
    def __init__(self, conn: Connection):
        super().__init__()
        self.conn = conn
        self.closing = False
        self.written = 0

    def write(self, data) -> None:
        self.written += len(data)

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        self.closing = True

    def abort(self) -> None:
        self.closing = True

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def get_extra_info(self, name, default=None):
        return ("fuzz", 1) if name == "peername" else default


def request(cmd: int, offset: int = 0, length: int = 0, flags: int = 0, cookie: int = 1,
            payload: bytes = b"") -> Frame:
    fields = (Field(0, 4, "big"), Field(4, 2, "big"), Field(6, 2, "big"), Field(8, 8, "big"),
              Field(16, 8, "big"), Field(24, 4, "big"))
    return Frame(p.REQUEST.pack(p.REQUEST_MAGIC, flags, cmd, cookie, offset, length) + payload,
                 fields)


class NbdTransmission(Driver):
    name = "nbd-transmission"
    what = "bmig-nbd request parsing and validation (bmig/nbd/transmission.py, connection.py)"
    allowed = ()                   # the transmission never raises: it answers or closes
    dictionary = NBD_TOKENS
    max_size = 256 * 1024

    def __init__(self, workdir: str):
        super().__init__(workdir)
        path = os.path.join(workdir, "export")
        with open(path, "wb") as f:
            f.truncate(SIZE)
        self._path = path
        self._refusals: list[str] = []
        # Refused requests and closed connections are logged (debug and warning): that
        # is how this driver tells them from accepted input.
        logger = logging.getLogger("bmig-nbd")
        logger.setLevel(logging.DEBUG)
        logging.getLogger("bmig-nbd.requests").setLevel(logging.INFO)
        logger.addHandler(_Refusals(self._refusals))
        self._loop = asyncio.new_event_loop()
        self._layers = self._open_layers()

    def _open_layers(self) -> list[Layer]:
        return [ContractLayer(FileLayer(self._path)), ContractLayer(FileLayer(self._path, True))]

    def seeds(self) -> list[Seed]:
        out = []
        for config in range(8):
            c = Frame(bytes([config]))
            out += [
                seed("write-read", c, request(p.Cmd.WRITE, 4096, 512, payload=b"w" * 512),
                     request(p.Cmd.READ, 0, 8192, cookie=2),
                     request(p.Cmd.WRITE, 8192, 512, p.CMD_FLAG_FUA, 3, b"f" * 512),
                     request(p.Cmd.FLUSH, cookie=4), request(p.Cmd.DISC, cookie=5)),
                seed("trim-zero-status", c, request(p.Cmd.TRIM, 0, 65536),
                     request(p.Cmd.WRITE_ZEROES, 65536, 65536, p.CMD_FLAG_NO_HOLE, 2),
                     request(p.Cmd.WRITE_ZEROES, 0, 4096, p.CMD_FLAG_FAST_ZERO, 3),
                     request(p.Cmd.BLOCK_STATUS, 0, SIZE, p.CMD_FLAG_REQ_ONE, 4),
                     request(p.Cmd.BLOCK_STATUS, 4096, 4096, 0, 5),
                     request(p.Cmd.READ, 0, 4096, p.CMD_FLAG_DF, 6)),
                seed("large-write", c, request(p.Cmd.WRITE, 0, 200 * 1024,
                                               payload=bytes(200 * 1024)),
                     request(p.Cmd.READ, 0, 200 * 1024, cookie=2)),
                seed("refused", c, request(p.Cmd.WRITE, SIZE - 100, 200, payload=b"x" * 200),
                     request(p.Cmd.READ, SIZE, 1, cookie=2), request(p.Cmd.CACHE, 0, 1, cookie=3),
                     request(p.Cmd.RESIZE, 0, 0, cookie=4), request(99, 0, 1, cookie=5),
                     request(p.Cmd.READ, 0, 0, cookie=6), request(p.Cmd.FLUSH, 1, 1, cookie=7),
                     request(p.Cmd.WRITE, 0, 10, 0xFFFF, 8, b"y" * 10)),
            ]
        return out

    def _negotiated(self, config: int) -> tuple[Layer, Negotiated]:
        layer = self._layers[config >> 2 & 1]
        structured = bool(config & 1)
        contexts = {}
        if config & 2 and structured:
            contexts = {1: p.META_BASE_ALLOCATION, 2: DIRTY_CONTEXT} if config & 4 \
                else {1: p.META_BASE_ALLOCATION}
        info = ExportInfo("a", SIZE, p.FLAG_HAS_FLAGS)
        return layer, Negotiated(info, structured, contexts)

    def run(self, data: bytes) -> str | None:
        self._refusals.clear()
        try:
            self._loop.run_until_complete(self._one(data))
        except BaseException:
            self._reset()
            raise
        return self._refusals[0] if self._refusals else None

    def _reset(self) -> None:
        """After an interrupted input: a fresh loop, no leftover tasks."""
        try:
            for task in asyncio.all_tasks(self._loop):
                task.cancel()
            self._loop.close()
        except Exception:     # noqa: BLE001 - the loop was interrupted anywhere
            pass
        for layer in self._layers:
            os.close(layer.inner._fd)
        self._loop = asyncio.new_event_loop()
        self._layers = self._open_layers()    # their locks belong to the old loop

    async def _one(self, data: bytes) -> None:
        layer, negotiated = self._negotiated(data[0] if data else 0)
        conn = Connection()
        transport = _Transport(conn)
        conn.connection_made(transport)
        transmission = Transmission(conn, layer, negotiated, "fuzz")
        conn.transmission = transmission
        rng = random.Random(zlib.crc32(data))
        body = memoryview(data)[1:]
        pos = 0
        idle = 0
        while pos < len(body) and not transmission.finished.done() and not transport.closing:
            if conn.reading_paused:
                idle += 1
                if idle > 10000:
                    raise Violation("reading stays paused with nothing running")
                await asyncio.sleep(0.001 if idle > 100 else 0)
                continue
            idle = 0
            target = conn.get_buffer(-1)
            n = min(len(target), len(body) - pos, rng.choice((1, 7, 28, 512, 4096, 1 << 20)))
            target[:n] = body[pos:pos + n]
            pos += n
            conn.buffer_updated(n)
            await asyncio.sleep(0)
        if not transport.closing:
            conn.eof_received()
        await transmission.finished
        await transmission.drain()
        conn.connection_lost(None)

    def close(self) -> None:
        self._loop.run_until_complete(self._layers[0].close())
        self._loop.run_until_complete(self._layers[1].close())
        self._loop.close()


# -- NbdClient's reply parsing --------------------------------------------------------------

class _ServerBytes:
    """A socket whose peer sends ``data`` (in pieces of varying size), then closes."""

    def __init__(self, data: bytes):
        self._data = memoryview(data)
        self._pos = 0
        self._fd = 3
        self._rng = random.Random(zlib.crc32(data))

    def recv_into(self, view) -> int:
        if self._fd < 0:
            raise OSError(9, "Bad file descriptor")
        n = min(len(view), len(self._data) - self._pos,
                self._rng.choice((1, 5, 20, 4096, 1 << 20)))
        view[:n] = self._data[self._pos:self._pos + n]
        self._pos += n
        return n

    def sendall(self, data) -> None:
        if self._fd < 0:
            raise OSError(9, "Bad file descriptor")

    def sendmsg(self, views) -> int:
        self.sendall(b"")
        return sum(len(v) for v in views)

    def settimeout(self, seconds) -> None:
        pass

    def fileno(self) -> int:
        return self._fd

    def close(self) -> None:
        self._fd = -1


class _Recording:
    """A real socket that keeps what it receives."""

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.received = bytearray()

    def recv_into(self, view) -> int:
        n = self.sock.recv_into(view)
        self.received += view[:n]
        return n

    def __getattr__(self, name):
        return getattr(self.sock, name)


CLIENT_CONFIGS = ((True, ("base:allocation",)), (True, ()), (False, ()),
                  (True, ("base:allocation", DIRTY_CONTEXT)))


def client_script(client: NbdClient) -> None:
    """What the driver asks of a client after its handshake; a failed request goes on,
    a broken connection ends it."""
    steps = [
        lambda: client.pwrite(b"w" * 8192, 4096),
        lambda: [client.submit_write(b"p" * 4096, 4096 * i) for i in range(4)],
        lambda: client.submit_zero(65536, 65536) if client.can_zero else None,
        lambda: client.submit_trim(0, 4096) if client.can_trim else None,
        lambda: client.wait_all(),
        lambda: client.pread(8192, 0),
        lambda: client.pread(100 * 1024, 4096),
        lambda: [client.block_status(0, SIZE, c) for c in client.contexts],
        lambda: client.flush() if client.can_flush else None,
        lambda: client.zero(0, 3 * SIZE // 4, fua=client.can_fua) if client.can_zero else None,
        lambda: client.wait_all(),
    ]
    for step in steps:
        try:
            step()
        except NbdError:
            continue
    client.close()


class NbdClientReplies(Driver):
    name = "nbd-client"
    what = "NbdClient's handshake and reply parsing against a foreign server (bmig/nbdclient/)"
    allowed = (BmigError,)
    dictionary = NBD_TOKENS
    max_size = 512 * 1024

    def __init__(self, workdir: str):
        super().__init__(workdir)
        self._address = NbdAddress(host="fuzz", export="a")

    def seeds(self) -> list[Seed]:
        """What bmig-nbd itself answers to the script, recorded over a real socket."""
        path = os.path.join(self.workdir, "client-export")
        with open(path, "wb") as f:
            f.truncate(SIZE)
        os.pwrite(os.open(path, os.O_WRONLY), b"data" * 4096, 8192)
        sock_path = os.path.join(self.workdir, "nbd.sock")
        loop = uvloop.new_event_loop()          # bmig-nbd's loop, as it serves
        layer = ContractLayer(FileLayer(path))
        server = Server([Export("a", layer, "disk a")], [Listen(unix=sock_path)])
        started = threading.Event()

        def serve() -> None:
            asyncio.set_event_loop(loop)
            loop.run_until_complete(server.start())
            started.set()
            loop.run_forever()

        thread = threading.Thread(target=serve, daemon=True)
        thread.start()
        started.wait(10)
        out = []
        try:
            for config, (structured, contexts) in enumerate(CLIENT_CONFIGS):
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                sock.settimeout(10)
                sock.connect(sock_path)
                recording = _Recording(sock)
                conn = NbdSocket(recording, NbdAddress(unix=sock_path, export="a"), 10)
                client = NbdClient(conn, client_handshake.negotiate(conn, contexts, None,
                                                                    structured))
                client_script(client)
                out.append(seed(f"recorded-{config}", bytes([config]),
                                *split_server_bytes(bytes(recording.received), structured)))
        finally:
            asyncio.run_coroutine_threadsafe(server.stop(), loop).result(30)
            loop.call_soon_threadsafe(loop.stop)
            thread.join(10)
            loop.close()
        return out

    def run(self, data: bytes) -> None:
        structured, contexts = CLIENT_CONFIGS[data[0] % len(CLIENT_CONFIGS)] if data \
            else CLIENT_CONFIGS[0]
        conn = NbdSocket(_ServerBytes(data[1:]), self._address, None)
        try:
            agreed = client_handshake.negotiate(conn, contexts, None, structured)
        except BaseException:
            client_handshake.abort(conn)
            raise
        client = NbdClient(conn, agreed)
        if client.structured and not structured:
            raise Violation("structured replies although the client did not ask")
        client_script(client)


def split_server_bytes(data: bytes, structured: bool) -> list[Frame]:
    """The server's side of a conversation as frames: the greeting, each option reply,
    and (with structured replies) each reply chunk; the rest as one frame."""
    frames = [Frame(data[:p.SERVER_GREETING.size],
                    (Field(0, 8, "big"), Field(8, 8, "big"), Field(16, 2, "big")))]
    pos = p.SERVER_GREETING.size
    while pos + p.OPTION_REPLY.size <= len(data):
        magic, _, _, length = p.OPTION_REPLY.unpack_from(data, pos)
        if magic != p.REPLY_MAGIC_OPT:
            break
        end = pos + p.OPTION_REPLY.size + length
        frames.append(Frame(data[pos:end], (Field(0, 8, "big"), Field(8, 4, "big"),
                                            Field(12, 4, "big"), Field(16, 4, "big"))))
        pos = end
    while structured and pos + p.STRUCTURED_REPLY.size <= len(data):
        magic, _, _, _, length = p.STRUCTURED_REPLY.unpack_from(data, pos)
        if magic != p.STRUCTURED_REPLY_MAGIC:
            break
        end = pos + p.STRUCTURED_REPLY.size + length
        frames.append(Frame(data[pos:end], (Field(4, 2, "big"), Field(6, 2, "big"),
                                            Field(8, 8, "big"), Field(16, 4, "big"),
                                            Field(20, 8, "big"), Field(28, 4, "big"))))
        pos = end
    if pos < len(data):
        frames.append(Frame(data[pos:], (Field(0, 4, "big"), Field(4, 4, "big"),
                                         Field(8, 8, "big"))))
    return frames


DRIVERS = (NbdHandshake, NbdTransmission, NbdClientReplies)
