"""One stream API over every transport: TCP, TLS, SSH (bmig.wire.ssh) and stdio pipes.

A Stream moves bytes and knows nothing of frames. ``recv_into`` returns 0 at the end of
the stream; ``send`` takes several buffers and sends them as one (sendmsg or writev),
so a frame header and its payload are never concatenated. A plain socket can also send
and receive without waiting (``nowait``, ``send_nowait``, ``recv_nowait``), for an event
loop that must not block. Errors are OSError; the framing layer above turns them into the
toolkit's errors.

No frames and no authentication: bmig.wire.channel and bmig.wire.handshake sit above.
"""

from __future__ import annotations

import fcntl
import os
import select
import socket
import sys
import time
from typing import TYPE_CHECKING, Protocol, Sequence

from bmig.errors import ConfigError, UnreachableError
from bmig.vectored import Buffer, send_all

if TYPE_CHECKING:
    import ssl


class Stream(Protocol):
    description: str

    def recv_into(self, buf: memoryview) -> int: ...
    def send(self, parts: Sequence[Buffer]) -> None: ...
    def close(self) -> None: ...


class SocketStream:
    """A connected socket, plain or TLS (``ssl.SSLSocket``)."""

    def __init__(self, sock: socket.socket, description: str):
        self.sock = sock
        self.description = description
        # ssl is imported only for tls:// (a few ms of every start): a socket can be an
        # SSLSocket only once it has been.
        ssl = sys.modules.get("ssl")
        self._tls = ssl is not None and isinstance(sock, ssl.SSLSocket)

    def recv_into(self, buf: memoryview) -> int:
        try:
            return self.sock.recv_into(buf)
        except OSError as exc:
            if self._tls and isinstance(exc, sys.modules["ssl"].SSLZeroReturnError):
                return 0
            raise

    def send(self, parts: Sequence[Buffer]) -> None:
        if self._tls:                        # SSLSocket has no sendmsg
            for part in parts:
                self.sock.sendall(part)
            return
        send_all(self._sendmsg, parts)

    def _sendmsg(self, views: list[memoryview]) -> int:
        """sendmsg that waits for room even when the descriptor was made non-blocking
        under us (an event loop watching it: libuv does that, for a moment)."""
        while True:
            try:
                return self.sock.sendmsg(views)
            except BlockingIOError:
                poller = select.poll()
                poller.register(self.sock, select.POLLOUT)
                poller.poll()

    @property
    def nowait(self) -> bool:
        """``send_nowait`` works: not TLS (SSLSocket takes no flags), and a blocking
        socket (with a timeout, Python would wait for room before trying)."""
        return not self._tls and self.sock.gettimeout() is None

    def send_nowait(self, views: list[memoryview]) -> int:
        """As much of ``views`` as the socket takes now, without waiting (only where
        ``nowait``: not TLS): the bytes sent."""
        try:
            return self.sock.sendmsg(views, [], socket.MSG_DONTWAIT)
        except (BlockingIOError, InterruptedError):
            return 0

    def recv_nowait(self, buf: memoryview) -> int:
        """What the socket holds now, without waiting (only where ``nowait``: not
        TLS, whose records may sit in the TLS layer unseen by a poll of the socket);
        BlockingIOError when nothing."""
        return self.sock.recv_into(buf, 0, socket.MSG_DONTWAIT)

    def fileno(self) -> int:
        return self.sock.fileno()

    def readable(self, timeout: float) -> bool:
        """Something to read (or the end) within ``timeout`` seconds."""
        poller = select.poll()
        poller.register(self.sock, select.POLLIN)
        return bool(poller.poll(max(0.0, timeout) * 1000))

    def shutdown(self) -> None:
        """End both directions, waking whoever waits on the socket, without closing
        it (an event loop may still watch its descriptor)."""
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def settimeout(self, timeout: float | None) -> None:
        self.sock.settimeout(timeout)

    def close(self) -> None:
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()

    def close_after_reason(self, linger: float) -> None:
        """Close a session we end with a reason just sent (a fatal ERROR): FIN after it,
        then read and drop what the peer still sends, for ``linger`` seconds at most or
        until it closes too. Closing with unread input would make the kernel send a
        reset, and a reset can make the peer's kernel drop our last frame unread: the
        sender would see "connection closed" instead of why."""
        deadline = time.monotonic() + linger
        try:
            self.sock.shutdown(socket.SHUT_WR)
            scratch = bytearray(64 * 1024)
            while (left := deadline - time.monotonic()) > 0:
                self.sock.settimeout(left)
                if not self.sock.recv_into(scratch):
                    break
        except (OSError, ValueError):
            pass
        self.close()


class FdStream:
    """A pair of file descriptors: stdin/stdout of ``breceive --stdio``, or the pipes of a
    child process such as ``ssh HOST breceive --stdio``."""

    def __init__(self, read_fd: int, write_fd: int, description: str,
                 close_fds: bool = True):
        self.read_fd = read_fd
        self.write_fd = write_fd
        self.description = description
        self._close = close_fds

    def recv_into(self, buf: memoryview) -> int:
        return os.readv(self.read_fd, [buf])

    def send(self, parts: Sequence[Buffer]) -> None:
        send_all(lambda views: os.writev(self.write_fd, views), parts)

    def readable(self, timeout: float) -> bool:
        ready, _, _ = select.select([self.read_fd], [], [], timeout)
        return bool(ready)

    def close(self) -> None:
        if not self._close:
            return
        for fd in {self.read_fd, self.write_fd}:
            try:
                os.close(fd)
            except OSError:
                pass


STDIN_PIPE_SIZE = 1 << 20     # the most an unprivileged process may ask (fs.pipe-max-size)


def enlarge_pipe(fd: int, size: int = STDIN_PIPE_SIZE) -> int | None:
    """Make the pipe ``fd`` is an end of hold ``size`` bytes, if the kernel lets us: its
    new size, or None (not a pipe, or refused: over fs.pipe-max-size or the user's pipe
    allowance). Either end may ask.

    ``breceive --stdio`` asks for its stdin: sshd writes what it has deciphered as far as
    the pipe takes it, so with 64 KiB (the default) it writes, and wakes the reader, for
    every 64 KiB, and waits whenever breceive is busy writing to the target."""
    try:
        return fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, size)
    except OSError:
        return None


def connect_tcp(host: str, port: int, timeout: float) -> socket.socket:
    """A TCP connection with the options bulk transfer wants; UnreachableError if not."""
    # An ASCII name goes to getaddrinfo as bytes: as text, Python passes every name
    # through the idna codec, whose import (stringprep, unicodedata) costs a command
    # about a millisecond; a name that is not ASCII still goes the idna way.
    name: str | bytes = host.encode("ascii") if host.isascii() else host
    try:
        sock = socket.create_connection((name, port), timeout=timeout)
    except socket.gaierror as exc:
        raise UnreachableError(f"cannot resolve {host}: {exc.strerror}") from None
    except UnicodeError as exc:         # a name idna cannot take: an empty label, say
        raise UnreachableError(f"cannot resolve {host}: {exc}") from None
    except OSError as exc:
        raise UnreachableError(f"cannot connect to {host}:{port}: "
                               f"{exc.strerror or exc}") from None
    tune(sock)
    return sock


def tune(sock: socket.socket) -> None:
    """No Nagle delay for acknowledgements; large buffers for data."""
    if sock.family in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    for option in (socket.SO_SNDBUF, socket.SO_RCVBUF):
        try:
            sock.setsockopt(socket.SOL_SOCKET, option, 4 << 20)
        except OSError:
            pass


def keepalive(sock: socket.socket) -> None:
    """A dead peer is noticed within about two minutes, without a read timeout."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, 60)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, 10)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, 6)
    except (OSError, AttributeError):
        pass


def client_tls_context(ca: str | None, cert: str | None, key: str | None,
                       verify: bool = True) -> ssl.SSLContext:
    """The sender's TLS context: the receiver's certificate checked against ``ca`` (or
    the system's CAs), and an optional client certificate."""
    import ssl
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=ca)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if not verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    if cert:
        try:
            context.load_cert_chain(cert, key)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(f"cannot load the client certificate {cert}: {exc}") from None
    return context


def server_tls_context(cert: str, key: str | None, client_ca: str | None) -> ssl.SSLContext:
    """The receiver's TLS context; with ``client_ca``, clients must show a certificate
    signed by it (which authenticates them)."""
    import ssl
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"cannot load the TLS certificate {cert}: {exc}") from None
    if client_ca:
        try:
            context.load_verify_locations(client_ca)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(f"cannot load the client CA {client_ca}: {exc}") from None
        context.verify_mode = ssl.CERT_REQUIRED
    return context
