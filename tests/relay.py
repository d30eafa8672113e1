"""A TCP relay on 127.0.0.1 that tests can break: reset connections, stall them, or
(TamperingRelay) alter, drop, replay or reorder frames as a man in the middle would.

    relay = Relay(("127.0.0.1", receiver_port)).start()
    ... connect to relay.port ...
    relay.reset_after(bytes_upstream=50 << 20)   # RST both sides after that much
    relay.reset_now()
    relay.partition(); relay.heal()               # stop forwarding, then go on
    relay.stop()

    relay = TamperingRelay(("127.0.0.1", receiver_port), "replay", "down").start()

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
        # partition() stops forwarding without breaking anything: bytes wait here and in
        # the kernels' buffers, as on a link that went silent; heal() lets them flow.
        self.flowing = threading.Event()
        self.flowing.set()

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
                self.flowing.wait()
                if self._stopping:
                    return
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

    def partition(self) -> None:
        self.flowing.clear()

    def heal(self) -> None:
        self.flowing.set()

    def stop(self) -> None:
        with self._lock:
            self._stopping = True
        self.flowing.set()
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


class TamperingRelay(Relay):
    """The relay as a man in the middle that understands framing (a u32 little-endian
    length, then the body: the same whether the body is sealed or not). Once, on the
    first frame in ``direction`` ("up": sender to receiver, "down": back) for which
    ``pick(index, length)`` is true, it does ``action``:

    - flip: flip the bits of one byte of the body (at ``flip_at``, or the last byte)
    - drop: leave the frame out
    - replay: send the frame twice
    - reorder: send the next frame first, then this one
    - rewrite: send ``rewrite(body)`` instead, with its own length

    ``acted`` is set once it has. When either side of a connection fails, both are shut
    down, as a middlebox that lost one side would.
    """

    def __init__(self, upstream: tuple[str, int], action: str, direction: str = "up",
                 pick: Callable[[int, int], bool] = lambda index, length: index >= 2,
                 flip_at: int = 18, rewrite: Callable[[bytes], bytes] | None = None):
        super().__init__(upstream)
        assert action in ("flip", "drop", "replay", "reorder", "rewrite")
        assert direction in ("up", "down")
        self.action = action
        self.direction = direction
        self.pick = pick
        self.flip_at = flip_at
        self.rewrite = rewrite
        self.acted = threading.Event()

    def _pump(self, src: socket.socket, dst: socket.socket, upstream: bool) -> None:
        mine = (self.direction == "up") == upstream
        held: bytes | None = None
        index = 0
        try:
            while True:
                frame = _read_frame(src)
                if frame is None:
                    try:
                        dst.shutdown(socket.SHUT_WR)
                    except OSError:
                        pass
                    return
                if upstream:
                    with self._lock:
                        self.bytes_upstream += len(frame)
                out = [frame]
                if held is not None:
                    out, held = [frame, held], None
                elif mine and not self.acted.is_set() and self.pick(index, len(frame) - 4):
                    out, held = self._act(frame)
                    self.acted.set()
                index += 1
                for piece in out:
                    dst.sendall(piece)
        except OSError:
            for sock in (src, dst):
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def _act(self, frame: bytes) -> tuple[list[bytes], bytes | None]:
        """(what to send now, what to hold for after the next frame)."""
        if self.action == "flip":
            body = bytearray(frame[4:])
            at = min(self.flip_at, len(body) - 1)
            body[at] ^= 0xFF
            return [frame[:4] + bytes(body)], None
        if self.action == "drop":
            return [], None
        if self.action == "replay":
            return [frame, frame], None
        if self.action == "reorder":
            return [], frame
        assert self.rewrite is not None
        body = self.rewrite(frame[4:])
        return [struct.pack("<I", len(body)) + body], None


def _read_frame(sock: socket.socket) -> bytes | None:
    """One whole frame, length prefix included; None at a clean end between frames."""
    head = _read_exactly(sock, 4, allow_eof=True)
    if head is None:
        return None
    (length,) = struct.unpack("<I", head)
    body = _read_exactly(sock, length, allow_eof=False)
    assert body is not None
    return head + body


def _read_exactly(sock: socket.socket, n: int, allow_eof: bool) -> bytes | None:
    buf = bytearray(n)
    view = memoryview(buf)
    have = 0
    while have < n:
        got = sock.recv_into(view[have:])
        if got == 0:
            if allow_eof and have == 0:
                return None
            raise ConnectionResetError("the connection ended inside a frame")
        have += got
    return bytes(buf)
