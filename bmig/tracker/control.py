"""breqd's control socket: listening, one task per connection, HELLO, request dispatch
and replies.

Each connection is a session (sessions.py): opened when it connects, ended whatever way
it closes. Requests of a connection are read and dispatched one after another, in the
order they arrive, to the handler the table gives for their type; a reply that depends on
durability is sent when what it waits for is done, so replies may overtake each other
and clients match them by request id. A request that fails is answered with its error
and the connection goes on; a protocol error (a bad frame, an unknown type, a malformed
field) is answered, logged and ends the connection. What a frame may make breqd allocate
is capped (MAX_CONTROL_FRAME, checked before its body is read).

The room may read and write the socket and decide nothing else: it does not look at a
request's fields beyond HELLO, and it changes no chunk state and no set of devices.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import stat
from typing import Awaitable, Callable

from bmig import __version__
from bmig.constants import CONTROL_PROTOCOL_VERSION
from bmig.errors import BmigError, ConfigError, ProtocolError, StateError
from bmig.framing import ConnectionClosed, read_frame, write_frame
from bmig.limits import MAX_CLIENT_NAME, MAX_CONTROL_FRAME
from bmig.tracker.protocol import Message, Op, Reply, decode, field_int
from bmig.tracker.sessions import Session, Sessions

log = logging.getLogger("breqd")

Handler = Callable[[Session, Message], Reply]


class ControlServer:
    def __init__(self, path: str, mode: int, sessions: Sessions,
                 handlers: dict[Op, Handler]):
        self.path = path
        self._mode = mode
        self._sessions = sessions
        self._handlers = handlers
        self._server: asyncio.AbstractServer | None = None
        self._connections: set[asyncio.Task] = set()

    # -- the socket ------------------------------------------------------------------

    async def listen(self) -> None:
        """Listen on the socket path, with the mode asked for; a stale socket is replaced,
        a live one (another breqd) refused."""
        path = self.path
        directory = os.path.dirname(path) or "."
        try:
            os.makedirs(directory, mode=0o755, exist_ok=True)
        except OSError as exc:
            raise ConfigError(f"cannot create {directory} for the control socket: "
                              f"{exc.strerror}") from None
        if os.path.exists(path):
            if not stat.S_ISSOCK(os.lstat(path).st_mode):
                raise ConfigError(f"control path {path} exists and is not a socket")
            if _socket_answers(path):
                raise StateError(f"control socket {path} is in use by another process")
            os.unlink(path)
        old = os.umask(0o777 & ~self._mode)
        try:
            self._server = await asyncio.start_unix_server(self._serve, path=path)
        finally:
            os.umask(old)

    def close(self) -> None:
        """Stop listening and remove the socket path."""
        if self._server is not None:
            self._server.close()
            self._server = None
            try:
                os.unlink(self.path)
            except OSError:
                pass

    async def drop_connections(self) -> None:
        """End every connection (each one's session ends with it)."""
        connections = list(self._connections)
        for task in connections:
            task.cancel()
        await asyncio.gather(*connections, return_exceptions=True)

    # -- connections -----------------------------------------------------------------

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        session = self._sessions.open(_peer_name(writer))
        task = asyncio.current_task()
        self._connections.add(task)  # type: ignore[arg-type]
        request_id = 0
        try:
            hello = decode(await read_frame(reader, MAX_CONTROL_FRAME))
            request_id = hello.request_id
            _send(writer, _hello(hello))
            session.peer = _client_name(hello, session.peer)
            while True:
                request_id = 0
                msg = decode(await read_frame(reader, MAX_CONTROL_FRAME))
                request_id = msg.request_id
                self._dispatch(session, msg, writer)
                await writer.drain()
        except ConnectionClosed:
            pass
        except ProtocolError as exc:
            log.warning("control client %s: %s; closing the connection", session.peer,
                        exc.message)
            _send(writer, _error_reply(request_id, exc))
        except (ConnectionError, OSError):
            pass
        except asyncio.CancelledError:
            # breqd is stopping. The handler ends normally: asyncio's stream callback
            # would log a cancelled handler as an error with a traceback.
            pass
        except Exception:
            log.exception("control client %s: internal error; closing the connection",
                          session.peer)
        finally:
            self._connections.discard(task)
            self._sessions.end(session)
            writer.close()

    def _dispatch(self, session: Session, msg: Message, writer: asyncio.StreamWriter) -> None:
        handler = self._handlers.get(msg.op)
        if handler is None:
            raise ProtocolError(f"{msg.op.name} is not a request")
        try:
            reply = handler(session, msg)
        except ProtocolError:
            raise
        except BmigError as exc:
            _send(writer, _error_reply(msg.request_id, exc))
            return
        if isinstance(reply, Message):
            _send(writer, reply)
        else:
            asyncio.get_running_loop().create_task(_reply_later(msg.request_id, reply, writer))


def _hello(msg: Message) -> Message:
    if msg.op != Op.HELLO:
        raise ProtocolError(f"expected HELLO, got {msg.op.name}")
    version = field_int(msg, "version")
    if version < 1:
        raise ProtocolError(f"protocol version {version} is not supported "
                            f"(this breqd speaks 1 to {CONTROL_PROTOCOL_VERSION})")
    return Message(Op.REPLY_OK, msg.request_id,
                   {"version": min(version, CONTROL_PROTOCOL_VERSION),
                    "server": f"breqd {__version__}"})


async def _reply_later(request_id: int, reply: Awaitable[Message],
                       writer: asyncio.StreamWriter) -> None:
    try:
        message = await reply
    except BmigError as exc:
        message = _error_reply(request_id, exc)
    _send(writer, message)


def _send(writer: asyncio.StreamWriter, msg: Message) -> None:
    write_frame(writer, msg.encode())       # a client gone meanwhile: nobody to tell


def _error_reply(request_id: int, exc: BmigError) -> Message:
    return Message(Op.REPLY_ERROR, request_id, {"code": exc.wire_code, "message": exc.message})


def _client_name(hello: Message, peer: str) -> str:
    """The name a session goes by: HELLO's ``client`` (printable, at most
    MAX_CLIENT_NAME characters) and the peer's pid, e.g. "bmigrate run 0.1.0 (pid 42)"."""
    client = hello.fields.get("client")
    if not isinstance(client, str):
        return peer
    client = "".join(c if c.isprintable() else "?" for c in client[:MAX_CLIENT_NAME]).strip()
    return f"{client} ({peer})" if client else peer


def _peer_name(writer: asyncio.StreamWriter) -> str:
    sock = writer.get_extra_info("socket")
    try:
        creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12)
        pid = int.from_bytes(creds[:4], "little")
        return f"pid {pid}"
    except (OSError, AttributeError):
        return "unknown"


def _socket_answers(path: str) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(1.0)
        try:
            probe.connect(path)
        except OSError:
            return False
    return True
