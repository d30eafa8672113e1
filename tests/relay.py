"""A TCP relay on 127.0.0.1 that tests can break: reset connections, stall them.

    relay = Relay(("127.0.0.1", receiver_port)).start()
    ... connect to relay.port ...
    relay.reset_after(bytes_upstream=50 << 20)   # RST both sides after that much
    relay.reset_now()
    relay.stop()

Resets are real TCP resets (SO_LINGER 0), as a failing network or a rebooted middlebox
gives them. Every thread the relay starts ends by stop().
"""

from __future__ import annotations

import socket
import struct
import threading
from typing import Callable


class Relay:
    def __init__(self, upstream: tuple[str, int]):
        self.upstream = upstream
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._lock = threading.Lock()
        self._pairs: list[tuple[socket.socket, socket.socket]] = []
        self._threads: list[threading.Thread] = []
        self._stopping = False
        self._reset_at: int | None = None
        self.bytes_upstream = 0          # total, all connections
        self.connections = 0
        self.resets = 0
        self.on_reset: Callable[[], None] | None = None

    def start(self) -> "Relay":
        self._spawn(self._accept)
        return self

    def _spawn(self, target, *args) -> None:
        thread = threading.Thread(target=target, args=args, daemon=True)
        with self._lock:
            self._threads.append(thread)
        thread.start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            try:
                server = socket.create_connection(self.upstream, timeout=10)
                server.settimeout(None)
            except OSError:
                client.close()
                continue
            with self._lock:
                if self._stopping:
                    client.close()
                    server.close()
                    return
                self._pairs.append((client, server))
                self.connections += 1
            self._spawn(self._pump, client, server, True)
            self._spawn(self._pump, server, client, False)

    def _pump(self, src: socket.socket, dst: socket.socket, upstream: bool) -> None:
        buf = bytearray(256 * 1024)
        view = memoryview(buf)
        try:
            while True:
                n = src.recv_into(buf)
                if n == 0:
                    try:
                        dst.shutdown(socket.SHUT_WR)
                    except OSError:
                        pass
                    return
                if upstream:
                    with self._lock:
                        self.bytes_upstream += n
                        trip = self._reset_at is not None and self.bytes_upstream >= self._reset_at
                        if trip:
                            self._reset_at = None
                    if trip:
                        self.reset_now()
                        return
                dst.sendall(view[:n])
        except OSError:
            return

    def reset_after(self, bytes_upstream: int) -> None:
        """Reset every connection once this many more bytes went upstream."""
        with self._lock:
            self._reset_at = self.bytes_upstream + bytes_upstream

    def reset_now(self) -> None:
        with self._lock:
            pairs, self._pairs = self._pairs, []
            self.resets += 1
        for pair in pairs:
            for sock in pair:
                _reset(sock)
        if self.on_reset is not None:
            self.on_reset()

    def stop(self) -> None:
        with self._lock:
            self._stopping = True
        try:
            self._listener.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._listener.close()
        self.reset_now()
        with self._lock:
            threads = list(self._threads)
        for thread in threads:
            thread.join(timeout=10)


def _reset(sock: socket.socket) -> None:
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass
    try:
        sock.shutdown(socket.SHUT_RD)    # wakes the pump blocked in recv; sends nothing
    except OSError:
        pass
    sock.close()                         # with linger 0: a RST, not a FIN
