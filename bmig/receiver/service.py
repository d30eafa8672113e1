"""breceive: listeners, one thread per session, stdio mode, a clean stop.

Sessions run in threads with blocking sockets: there are few of them and each is a bulk
stream. The main thread waits on the listeners and on a wake-up pipe that SIGTERM and
SIGINT write to; on a stop the listeners close and every session's connection is shut
down, so each sender sees the end, aborts what it had not committed, and resumes later.
"""

from __future__ import annotations

import logging
import os
import selectors
import signal
import socket
import ssl
import threading
from dataclasses import dataclass, field

from bmig import __version__, systemd
from bmig.errors import BmigError, ConfigError
from bmig.receiver.session import Policy, Session
from bmig.wire.channel import Channel
from bmig.wire.transports import FdStream, SocketStream, keepalive, tune

log = logging.getLogger("breceive")

HANDSHAKE_TIMEOUT = 30.0
BACKLOG = 64


@dataclass
class ReceiverSettings:
    policy: Policy
    listen: list[tuple[str, int]] = field(default_factory=list)
    tls: ssl.SSLContext | None = None
    client_certificates: bool = False      # TLS clients must show a certificate
    max_sessions: int = 16


class Receiver:
    def __init__(self, settings: ReceiverSettings):
        self.settings = settings
        self._listeners: list[socket.socket] = []
        self._sessions: dict[threading.Thread, socket.socket] = {}
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self.address: tuple[str, int] | None = None

    # -- stdio -----------------------------------------------------------------------

    def serve_stdio(self) -> None:
        """One session on stdin/stdout: what SSH runs. The transport authenticated the peer."""
        stream = FdStream(0, 1, "the sender on stdin", close_fds=False)
        Session(Channel(stream), self.settings.policy, True, "stdio").run()

    # -- listening -------------------------------------------------------------------

    def open_listeners(self) -> None:
        self._listeners = systemd.listen_sockets()
        for host, port in self.settings.listen:
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
        """Accept until SIGTERM or SIGINT."""
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
                for key, _ in selector.select():
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
            sessions = dict(self._sessions)
        for thread, sock in sessions.items():
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        for thread in sessions:
            thread.join(timeout=30)
        log.info("breceive stopped")

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
        with self._lock:
            if len(self._sessions) >= self.settings.max_sessions:
                log.warning("%s: refused, %d sessions already", name,
                            self.settings.max_sessions)
                sock.close()
                return
            thread = threading.Thread(target=self._session, args=(sock, name),
                                      name=f"session {name}", daemon=True)
            self._sessions[thread] = sock
        thread.start()

    def _session(self, sock: socket.socket, peer: str) -> None:
        try:
            if sock.family in (socket.AF_INET, socket.AF_INET6):
                tune(sock)
                keepalive(sock)
            sock.settimeout(HANDSHAKE_TIMEOUT)
            authenticated = False
            if self.settings.tls is not None:
                try:
                    sock = self.settings.tls.wrap_socket(sock, server_side=True)
                except (ssl.SSLError, OSError) as exc:
                    log.warning("%s: TLS handshake failed: %s", peer, exc)
                    sock.close()
                    return
                authenticated = self.settings.client_certificates
                with self._lock:
                    self._sessions[threading.current_thread()] = sock
            log.info("%s: connected%s", peer, " (TLS)" if self.settings.tls else "")
            session = Session(Channel(SocketStream(sock, f"sender {peer}")),
                              self.settings.policy, authenticated, peer)
            # The timeout covers the handshake only: then a sender may stay silent for a
            # long time (a catch-up service with nothing to ship); keepalive finds dead ones.
            session.on_ready = lambda: sock.settimeout(None)
            session.run()
        except BmigError as exc:
            log.warning("%s: %s", peer, exc.message)
        except Exception:
            log.exception("%s: internal error; the session ends", peer)
        finally:
            sock.close()
            with self._lock:
                self._sessions.pop(threading.current_thread(), None)


def _describe(sock: socket.socket) -> str:
    name = sock.getsockname()
    if isinstance(name, tuple):
        return f"{name[0]}:{name[1]}"
    return str(name)
