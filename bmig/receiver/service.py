"""breceive: listeners, one thread per session, stdio mode, a clean stop.

Sessions run in threads with blocking sockets: there are few of them and each is a bulk
stream. The main thread waits on the listeners and on a wake-up pipe that SIGTERM and
SIGINT write to; on a stop the listeners close and every session's connection is shut
down, so each sender sees the end, aborts what it had not committed, and resumes later.

A connection that has not authenticated costs little and cannot crowd out senders
(invariant 10): it has a small buffer (bmig.wire.channel), the whole handshake (TLS
included) must end within ``handshake_timeout`` or the main thread shuts the connection
down, such connections have a cap of their own (``max_unauthenticated``: when it is
reached the oldest one is dropped for the newcomer), and only authenticated sessions
count against ``max_sessions``. Failed handshakes are logged a few per minute; the rest
are counted and summed up in one line.

Connections, threads and limits only: what a session may do is bmig.receiver.session's.
"""

from __future__ import annotations

import logging
import os
import selectors
import signal
import socket
import ssl
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

from bmig import __version__, systemd
from bmig.errors import BmigError, ConfigError, ProtocolError, TargetBusy
from bmig.limits import MAX_UNAUTHENTICATED
from bmig.receiver.policy import Policy
from bmig.receiver.session import Session
from bmig.wire.channel import Channel
from bmig.wire.transports import FdStream, SocketStream, enlarge_pipe, keepalive, tune

log = logging.getLogger("breceive")

HANDSHAKE_TIMEOUT = 10.0       # the whole handshake, TLS included
BACKLOG = 64
REFUSALS_LOGGED = 5            # failed handshakes logged per window; the rest are counted
REFUSAL_WINDOW = 60.0


@dataclass
class ReceiverSettings:
    policy: Policy
    listen: list[tuple[str, int]] = field(default_factory=list)
    tls: ssl.SSLContext | None = None
    client_certificates: bool = False      # TLS clients must show a certificate
    max_sessions: int = 16                 # authenticated sessions at once
    max_unauthenticated: int = MAX_UNAUTHENTICATED
    handshake_timeout: float = HANDSHAKE_TIMEOUT


class RefusalLog:
    """At most ``burst`` lines per ``window`` seconds about peers that failed the
    handshake, so a flood of strangers cannot flood the log; the others are counted and
    summed up in one line when the window ends."""

    def __init__(self, burst: int = REFUSALS_LOGGED, window: float = REFUSAL_WINDOW,
                 clock: Callable[[], float] = time.monotonic):
        self.burst = burst
        self.window = window
        self._clock = clock
        self._lock = threading.Lock()
        self._started = clock()
        self._logged = 0
        self.held_back = 0
        self._last = ""

    def note(self, peer: str, message: str) -> None:
        with self._lock:
            self._roll(self._clock())
            if self._logged < self.burst:
                self._logged += 1
                log.warning("%s: %s", peer, message)
            else:
                self.held_back += 1
                self._last = f"{peer}: {message}"

    def flush(self) -> float | None:
        """Sum up a window that has ended; seconds until the current one ends, if it
        holds back anything."""
        with self._lock:
            now = self._clock()
            self._roll(now)
            return self._started + self.window - now if self.held_back else None

    def _roll(self, now: float) -> None:
        if now - self._started < self.window:
            return
        if self.held_back:
            log.warning("%d more failed handshakes in the last %.0f s (the last: %s)",
                        self.held_back, now - self._started, self._last)
        self._started, self._logged, self.held_back = now, 0, 0


@dataclass(eq=False)
class _Connection:
    """One accepted connection, from accept to the end of its thread."""

    sock: socket.socket
    peer: str
    deadline: float                # for the handshake
    authenticated: bool = False
    reaped: bool = False           # shut down for taking too long, or for a newcomer
    why: str = ""


class Receiver:
    def __init__(self, settings: ReceiverSettings):
        self.settings = settings
        self._listeners: list[socket.socket] = []
        self._connections: dict[threading.Thread, _Connection] = {}
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self.refusals = RefusalLog()
        self.address: tuple[str, int] | None = None

    # -- stdio -----------------------------------------------------------------------

    def serve_stdio(self) -> None:
        """One session on stdin/stdout: what SSH runs. The transport authenticated the peer."""
        enlarge_pipe(0)
        stream = FdStream(0, 1, "the sender on stdin", close_fds=False)
        Session(Channel(stream), self.settings.policy, True, "stdio").run()

    # -- listening -------------------------------------------------------------------

    def open_listeners(self) -> None:
        """Sockets from systemd (a socket unit) replace the ``listen`` addresses: the
        unit owns the port, and binding it again would fail."""
        self._listeners = systemd.listen_sockets()
        addresses = self.settings.listen
        if self._listeners and addresses:
            log.info("serving the socket(s) systemd passed (%s), not listen = %s",
                     ", ".join(_describe(s) for s in self._listeners),
                     ", ".join(f"{host}:{port}" for host, port in addresses))
            addresses = []
        for host, port in addresses:
            try:
                sock = socket.create_server((host, port), backlog=BACKLOG, reuse_port=False)
            except OSError as exc:
                raise ConfigError(f"cannot listen on {host}:{port}: {exc.strerror}") from None
            self._listeners.append(sock)
        if not self._listeners:
            raise ConfigError("nowhere to listen: give --listen HOST:PORT, --stdio, or start "
                              "breceive from a systemd socket unit")
        name = self._listeners[0].getsockname()
        self.address = (name[0], name[1]) if isinstance(name, tuple) else None

    def serve(self) -> None:
        """Accept until SIGTERM or SIGINT; shut down handshakes past their deadline."""
        self.open_listeners()
        reader, writer = os.pipe()
        os.set_blocking(writer, False)
        old_fd = signal.set_wakeup_fd(writer)
        handlers = {s: signal.signal(s, lambda *_: None) for s in (signal.SIGTERM, signal.SIGINT)}
        selector = selectors.DefaultSelector()
        try:
            for sock in self._listeners:
                sock.setblocking(False)
                selector.register(sock, selectors.EVENT_READ)
            selector.register(reader, selectors.EVENT_READ)
            where = ", ".join(_describe(s) for s in self._listeners)
            log.info("breceive %s ready on %s%s, %d target(s)", __version__, where,
                     " (TLS)" if self.settings.tls else "", len(self.settings.policy.targets))
            systemd.notify("READY=1", f"STATUS=listening on {where}")
            while not self._stopping.is_set():
                for key, _ in selector.select(self._tick()):
                    if key.fileobj == reader:
                        os.read(reader, 64)
                        self._stopping.set()
                        break
                    self._accept(key.fileobj)
        finally:
            systemd.notify("STOPPING=1")
            selector.close()
            signal.set_wakeup_fd(old_fd)
            for sig, handler in handlers.items():
                signal.signal(sig, handler)
            os.close(reader)
            os.close(writer)
            self.stop()

    def stop(self) -> None:
        self._stopping.set()
        for sock in self._listeners:
            sock.close()
        with self._lock:
            connections = dict(self._connections)
        for connection in connections.values():
            _shut(connection.sock)
        for thread in connections:
            thread.join(timeout=30)
        log.info("breceive stopped")

    # -- connections -------------------------------------------------------------------

    def _tick(self) -> float | None:
        """Shut down the handshakes past their deadline; seconds until the next one (or
        the end of the refusal log's window), None when nothing waits."""
        now = time.monotonic()
        waits: list[float] = []
        with self._lock:
            for connection in self._connections.values():
                if connection.authenticated or connection.reaped:
                    continue
                if connection.deadline <= now:
                    self._reap(connection, f"no authentication within "
                                           f"{self.settings.handshake_timeout:g} s")
                else:
                    waits.append(connection.deadline - now)
        window = self.refusals.flush()
        if window is not None:
            waits.append(window)
        return max(0.01, min(waits)) if waits else None

    @staticmethod
    def _reap(connection: _Connection, why: str) -> None:
        """Called with the lock held: the session thread sees its socket shut down."""
        connection.reaped = True
        connection.why = why
        _shut(connection.sock)

    def _accept(self, listener) -> None:
        try:
            sock, peer = listener.accept()
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            log.warning("accept failed: %s", exc.strerror)
            return
        sock.setblocking(True)
        name = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else "unix"
        cap = self.settings.max_unauthenticated
        connection = _Connection(sock, name, time.monotonic() + self.settings.handshake_timeout)
        with self._lock:
            waiting = [c for c in self._connections.values() if not c.authenticated]
            live = [c for c in waiting if not c.reaped]
            if len(live) >= cap:          # the oldest stranger makes room for the newcomer
                self._reap(min(live, key=lambda c: c.deadline),
                           f"dropped for a newer connection ({cap} waiting to authenticate)")
            if len(waiting) >= 2 * cap:   # reaped ones that have not ended yet
                sock.close()
                self.refusals.note(name, f"refused: {len(waiting)} connections waiting to "
                                         "authenticate or to end")
                return
            thread = threading.Thread(target=self._session, args=(connection,),
                                      name=f"session {name}", daemon=True)
            self._connections[thread] = connection
        thread.start()

    def _session(self, connection: _Connection) -> None:
        sock, peer = connection.sock, connection.peer
        try:
            if sock.family in (socket.AF_INET, socket.AF_INET6):
                tune(sock)
                keepalive(sock)
            sock.settimeout(self.settings.handshake_timeout)
            log.debug("%s: connected", peer)
            transport_suffices = False
            if self.settings.tls is not None:
                try:
                    sock = self.settings.tls.wrap_socket(sock, server_side=True)
                except (ssl.SSLError, OSError) as exc:
                    self._refused(connection, ProtocolError(f"TLS handshake failed: {exc}"))
                    return
                with self._lock:
                    connection.sock = sock
                    if connection.reaped:
                        _shut(sock)
                # A client certificate alone authenticates the sender only when no
                # secret is configured: with both, both are required.
                transport_suffices = (self.settings.client_certificates
                                      and self.settings.policy.secret is None)
            session = Session(Channel(SocketStream(sock, f"sender {peer}")),
                              self.settings.policy, transport_suffices, peer)
            session.on_ready = lambda: self._admit(connection, sock)
            session.on_refused = lambda exc: self._refused(connection, exc)
            session.run()
        except BmigError as exc:
            log.warning("%s: %s", peer, exc.message)
        except Exception:
            log.exception("%s: internal error; the session ends", peer)
        finally:
            sock.close()
            with self._lock:
                self._connections.pop(threading.current_thread(), None)

    def _admit(self, connection: _Connection, sock: socket.socket) -> None:
        """The sender has authenticated: a session, if there is room for one. The
        timeout covered the handshake only: a sender may then stay silent for a long
        time (a catch-up service with nothing to ship); keepalive finds dead ones."""
        with self._lock:
            if connection.reaped:
                raise ProtocolError(f"the handshake took too long ({connection.why})")
            sessions = sum(1 for c in self._connections.values() if c.authenticated)
            if sessions >= self.settings.max_sessions:
                raise TargetBusy(f"this receiver serves {sessions} sessions already "
                                 "(max_sessions); try again later")
            connection.authenticated = True
        sock.settimeout(None)

    def _refused(self, connection: _Connection, exc: BmigError) -> None:
        why = f"{connection.why}; closed" if connection.reaped else exc.message
        self.refusals.note(connection.peer, why)


def _shut(sock: socket.socket) -> None:
    """Shut a connection down under the thread that reads it (TLS or not: the plain
    socket call, which leaves the TLS object alone)."""
    try:
        socket.socket.shutdown(sock, socket.SHUT_RDWR)
    except OSError:
        pass


def _describe(sock: socket.socket) -> str:
    name = sock.getsockname()
    if isinstance(name, tuple):
        return f"{name[0]}:{name[1]}"
    return str(name)
