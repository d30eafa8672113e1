"""One NBD connection's socket: open it (TCP or a Unix socket), STARTTLS, send a
header with its payload, read exactly so many bytes, and remember the first failure.

Any failure here leaves the stream mid-message, so the first one closes the socket for
good and every later call raises it again (``broken``). Small reads go through one
buffer; large payloads are received straight into their target. The handshake
(bmig.nbdclient.handshake) and the transmission (bmig.nbdclient.transmission) both
speak through this class; it knows no NBD message.
"""

from __future__ import annotations

import socket
import ssl
from typing import Any, Callable

from bmig.errors import BmigError, ProtocolError, UnreachableError
from bmig.nbdclient.errors import ServerClosed, reason, seconds
from bmig.nbdclient.uri import NbdAddress
from bmig.vectored import send_all

READ_BUFFER = 64 * 1024                # small messages are read through this buffer...
DIRECT_READ = 16 * 1024                # ...payloads this large go straight to their target


class NbdSocket:
    """The socket of one client, and the first error that broke it."""

    def __init__(self, sock: socket.socket, address: NbdAddress, timeout: float | None):
        self.address = address
        self._sock = sock
        self._timeout = timeout
        self.tls = False
        self.broken: BmigError | None = None
        self.on_broken: Callable[[], None] | None = None   # told once, when it breaks
        self.in_flight: Callable[[], int] = lambda: 0      # for the message on a close
        self._rview = memoryview(bytearray(READ_BUFFER))
        self._rpos = self._rend = 0

    @classmethod
    def open(cls, address: NbdAddress, timeout: float | None) -> "NbdSocket":
        """Connect, with one-line errors that say where to."""
        try:
            if address.unix is not None:
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                try:
                    sock.settimeout(timeout)
                    sock.connect(address.unix)
                except BaseException:
                    sock.close()
                    raise
                return cls(sock, address, timeout)
            assert address.host is not None
            sock = socket.create_connection((address.host, address.port), timeout=timeout)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            return cls(sock, address, timeout)
        except socket.gaierror as exc:
            raise UnreachableError(f"cannot resolve {address.host!r} for {address}: "
                                   f"{reason(exc)}") from None
        except socket.timeout:
            raise UnreachableError(f"cannot connect to {address}: no answer within "
                                   f"{seconds(timeout)}") from None
        except OSError as exc:
            raise UnreachableError(f"cannot connect to {address}: {reason(exc)} (is the NBD "
                                   "server running?)") from None

    # -- state ------------------------------------------------------------------------------

    @property
    def timeout(self) -> float | None:
        return self._timeout

    @timeout.setter
    def timeout(self, seconds: float | None) -> None:
        self._timeout = seconds
        if not self.closed:
            self._sock.settimeout(seconds)

    @property
    def closed(self) -> bool:
        return self._sock.fileno() == -1

    def close(self) -> None:
        self._sock.close()

    def start_tls(self, context: ssl.SSLContext | None) -> None:
        """The TLS handshake, once the server has agreed to NBD_OPT_STARTTLS."""
        if self._rpos != self._rend:
            raise self.protocol("data before the TLS handshake")
        context = context or ssl.create_default_context()
        hostname = self.address.host or ("localhost" if context.check_hostname else None)
        try:
            self._sock = context.wrap_socket(self._sock, server_hostname=hostname)
        except (OSError, ValueError) as exc:
            raise self.fail(UnreachableError(
                f"TLS handshake with {self.address} failed: {reason(exc)}")) from None
        self.tls = True

    # -- failures ---------------------------------------------------------------------------

    def fail(self, exc: BaseException) -> BmigError:
        """Mark the connection broken by ``exc`` and close it; returns the error to raise."""
        if isinstance(exc, (UnreachableError, ProtocolError)):
            error: BmigError = exc
        else:
            error = UnreachableError(f"connection to {self.address} abandoned after "
                                     f"{type(exc).__name__}")
        if self.broken is None:
            self.broken = error
            if self.on_broken is not None:
                self.on_broken()
            self._sock.close()
        return error

    def protocol(self, message: str) -> BmigError:
        return self.fail(ProtocolError(f"NBD server at {self.address} broke the protocol: "
                                       f"{message}"))

    def lost(self, exc: OSError) -> BmigError:
        if isinstance(exc, socket.timeout):
            return self.fail(UnreachableError(
                f"the NBD server at {self.address} did not answer within "
                f"{seconds(self._timeout)}"))
        return self.fail(UnreachableError(f"lost the NBD server at {self.address}: "
                                          f"{reason(exc)}"))

    # -- bytes ------------------------------------------------------------------------------

    def send(self, head: bytes, payload: Any = None) -> None:
        """A header and its payload, in one system call where the socket allows it."""
        try:
            if payload is None or not len(payload):
                self._sock.sendall(head)
            elif self.tls:                  # SSLSocket has no sendmsg
                self._sock.sendall(head)
                self._sock.sendall(payload)
            else:
                send_all(self._sock.sendmsg, [memoryview(head), payload])
        except OSError as exc:
            raise self.lost(exc) from None

    def _recv_some(self, target: memoryview) -> int:
        try:
            n = self._sock.recv_into(target)
        except OSError as exc:
            raise self.lost(exc) from None
        if n == 0:
            in_flight = self.in_flight()
            raise self.fail(ServerClosed(f"the NBD server at {self.address} closed the "
                                         "connection" + (f" with {in_flight} requests in flight"
                                                         if in_flight else "")))
        return n

    def recv_into(self, view: memoryview) -> None:
        """Fill ``view``: small reads through the buffer, large ones straight into it."""
        need, done = len(view), 0
        while done < need:
            if self._rpos < self._rend:
                n = min(self._rend - self._rpos, need - done)
                view[done:done + n] = self._rview[self._rpos:self._rpos + n]
                self._rpos += n
                done += n
            elif need - done >= DIRECT_READ:
                done += self._recv_some(view[done:])
            else:
                self._rpos, self._rend = 0, self._recv_some(self._rview)

    def recv(self, n: int) -> bytes:
        buf = bytearray(n)
        self.recv_into(memoryview(buf))
        return bytes(buf)
