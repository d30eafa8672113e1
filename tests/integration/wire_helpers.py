"""Peers of the replication protocol driven by hand, for tests that send what a
well-behaved sender or receiver never would.

``HandSender`` connects to a real breceive and goes through the handshake step by step
(each step can be bent: another version, a wrong proof, a malformed field); once
``accept`` has checked AUTH_OK, its frames are sealed like the real sender's, so the
tests after it speak the real protocol. ``FakeReceiver`` listens on 127.0.0.1 and plays
a receiver with a script: an impostor, an old version. ``replicating_in_process`` opens
a replication session of breceive's own Session in this process, over a socket pair.
"""

from __future__ import annotations

import socket
import threading
from typing import Any, Callable

from bmig.errors import BmigError, UnreachableError
from bmig.framing import ConnectionClosed
from bmig.receiver.policy import Policy, TargetConfig
from bmig.receiver.session import Session
from bmig.wire import auth, handshake
from bmig.wire.channel import Channel
from bmig.wire.protocol import WIRE_VERSION, Message, T, decode_json, pack_seq, type_of
from bmig.wire.seal import derive_keys, transcript
from bmig.wire.transports import SocketStream

SECRET = b"a shared secret of thirty-two bytes!"
WAIT = 30.0
IN_PROCESS_SIZE = 4 << 20


class HandSender:
    """A sender on a plain socket, one handshake step at a time."""

    def __init__(self, port: int, timeout: float = 20.0):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.channel = Channel(SocketStream(self.sock, "breceive"))
        self._mine = b""
        self._theirs = b""
        self.challenge = ""
        self.nonce = ""

    # -- frames ----------------------------------------------------------------------

    def send_raw(self, data: bytes) -> None:
        """Bytes as they are, outside any framing or sealing."""
        self.sock.sendall(data)

    def send_body(self, body: bytes) -> None:
        self.channel.send(body)

    def send(self, message: Message) -> None:
        self.send_body(message.encode())

    def read(self) -> bytes:
        """The next frame's body; EOFError when the receiver closed the connection."""
        try:
            return bytes(self.channel.read())
        except ConnectionClosed as exc:
            raise EOFError(exc.message) from None
        except UnreachableError as exc:
            raise ConnectionResetError(exc.message) from None

    def closed(self) -> bool:
        """True when the receiver closed the connection (after any frames it sent)."""
        try:
            while True:
                self.read()
        except (EOFError, ConnectionResetError):
            return True

    # -- the handshake ---------------------------------------------------------------

    def hello(self, version: int = WIRE_VERSION, method: str = auth.METHOD,
              **fields: Any) -> Message:
        """HELLO out, the receiver's answer back (its HELLO, or an ERROR)."""
        self._mine = Message(T.HELLO, {"version": version, "client": "test", "auth": method,
                                       **fields}).encode()
        self.send_body(self._mine)
        self._theirs = self.read()
        answer = decode_json(self._theirs)
        if answer.type == T.HELLO:
            self.challenge = str(answer.fields.get("challenge", ""))
        return answer

    def proof(self, secret: bytes) -> str:
        return auth.client_proof(secret, self.challenge, self.nonce,
                                 transcript(self._mine, self._theirs))

    def auth(self, secret: bytes = SECRET, **override: Any) -> None:
        """AUTH with the proof for ``secret``; ``override`` replaces any field."""
        self.nonce = auth.new_nonce()
        fields = {"method": auth.METHOD, "nonce": self.nonce, "proof": self.proof(secret)}
        fields.update(override)
        self.send(Message(T.AUTH, fields))

    def accept(self, secret: bytes = SECRET, sealed: bool = True) -> Message:
        """Read AUTH_OK, check the receiver's proof, and seal from now on."""
        ok = decode_json(self.read())
        assert ok.type == T.AUTH_OK, ok
        hellos = transcript(self._mine, self._theirs)
        assert auth.matches(auth.server_proof(secret, self.challenge, self.nonce, hellos),
                            ok.fields.get("proof"))
        if sealed:
            keys = derive_keys(secret, bytes.fromhex(self.challenge),
                               bytes.fromhex(self.nonce), hellos)
            self.channel.authenticated((keys.sender_to_receiver, keys.receiver_to_sender))
        else:
            self.channel.authenticated()
        return ok

    def handshake(self, secret: bytes = SECRET) -> None:
        """HELLO and AUTH; the caller reads the answer (AUTH_OK, or an ERROR)."""
        self.hello()
        self.auth(secret)

    def authenticate(self, secret: bytes = SECRET) -> "HandSender":
        self.handshake(secret)
        self.accept(secret)
        return self

    def open(self, export: str, size: int, generation: int = 7, device_id: int = 9) -> Message:
        self.send(Message(T.OPEN, {"export": export, "device_id": f"{device_id:016x}",
                                   "generation": f"{generation:016x}", "size": size}))
        return decode_json(self.read())

    def close(self) -> None:
        self.sock.close()


class FakeReceiver:
    """Something on 127.0.0.1 that answers a sender like breceive would: ``script`` gets
    each connection's Channel and does what it likes. Stopped by ``stop``."""

    def __init__(self, script: Callable[[Channel], None]):
        self.script = script
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.errors: list[BaseException] = []
        self.received: list[int] = []           # types of the frames the script read
        self._threads: list[threading.Thread] = []
        self._socks: list[socket.socket] = []
        self._accepter = threading.Thread(target=self._accept, daemon=True)
        self._accepter.start()

    def url(self, export: str = "d") -> str:
        return f"tcp://127.0.0.1:{self.port}/{export}"

    def _accept(self) -> None:
        while True:
            try:
                sock, _ = self.listener.accept()
            except OSError:
                return
            sock.settimeout(60)
            self._socks.append(sock)
            thread = threading.Thread(target=self._serve, args=(sock,), daemon=True)
            self._threads.append(thread)
            thread.start()

    def _serve(self, sock: socket.socket) -> None:
        channel = Channel(SocketStream(sock, "sender"))
        try:
            self.script(channel)
        except (BmigError, OSError, EOFError):
            pass
        except BaseException as exc:       # a bug in the script: the test reports it
            self.errors.append(exc)
        finally:
            sock.close()

    def stop(self) -> None:
        try:
            self.listener.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.listener.close()
        for sock in self._socks:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        for thread in [self._accepter, *self._threads]:
            thread.join(timeout=10)
        assert not self.errors, self.errors


def play_receiver(channel: Channel, received: list[int]) -> None:
    """After the handshake: answer a pass session like a receiver that writes nothing.
    OPENED "new", DURABLE for every FLUSH, PASS_DONE for PASS_END; until BYE or the end."""
    while True:
        try:
            body = channel.read()
        except ConnectionClosed:
            return
        kind = type_of(body)
        received.append(int(kind))
        if kind == T.OPEN:
            channel.send(Message(T.OPENED, {"relation": "new", "target": {}}).encode())
        elif kind == T.FLUSH:
            channel.send(pack_seq(T.DURABLE, int.from_bytes(bytes(body[8:16]), "little")))
        elif kind == T.PASS_END:
            channel.send(Message(T.PASS_DONE, {"target": {}}).encode())
        elif kind == T.STATUS_REQ:
            channel.send(Message(T.STATUS, {"targets": []}).encode())
        elif kind == T.BYE:
            return


def dirty_chunks(breqd, name: str, size: int, chunk: int) -> set[int]:
    """The chunks breqd has dirty (or in flight) for ``name``."""
    client = breqd.client()
    try:
        runs, _ = client.query(name, 0, size)
    finally:
        client.close()
    return {c for offset, length in runs
            for c in range(offset // chunk, (offset + length - 1) // chunk + 1)}


def assert_clean_chunks_are_on_the_target(breqd, name: str, source: str, target: str,
                                          chunk: int) -> set[int]:
    """Invariant 3 from the outside: every chunk breqd no longer has dirty is on the
    target as it is on the source. Returns the dirty chunks."""
    import os

    size = os.path.getsize(source)
    dirty = dirty_chunks(breqd, name, size, chunk)
    with open(source, "rb") as a, open(target, "rb") if os.path.exists(target) \
            else open(os.devnull, "rb") as b:
        for index in range(-(-size // chunk)):
            if index in dirty:
                continue
            a.seek(index * chunk)
            b.seek(index * chunk)
            n = min(chunk, size - index * chunk)
            assert b.read(n) == a.read(n), f"chunk {index} is clean in breqd but differs"
    return dirty


class SessionThread(threading.Thread):
    """A receiver Session's ``run`` in a thread; what it raised is in ``raised``."""

    def __init__(self, session: Session):
        super().__init__(daemon=True)
        self.session = session
        self.raised: list[BaseException] = []

    def run(self) -> None:
        try:
            self.session.run()
        except BaseException as exc:        # noqa: BLE001 - the test looks at it
            self.raised.append(exc)


def session_in_process(tmp_path) -> tuple[socket.socket, SessionThread]:
    """breceive's own Session for export "t" (a 4 MiB file in ``tmp_path``, breceive's
    state there too) on one end of a socket pair, in a thread; the other end."""
    target = str(tmp_path / "t.img")
    with open(target, "wb") as f:
        f.truncate(IN_PROCESS_SIZE)
    policy = Policy({"t": TargetConfig("t", target)}, str(tmp_path), SECRET)
    a, b = socket.socketpair()
    thread = SessionThread(Session(Channel(SocketStream(a, "sender")), policy, False, "s"))
    thread.start()
    return b, thread


def replicating_in_process(tmp_path) -> tuple[Channel, SessionThread]:
    """A replication session of export "t", opened by hand; the sender's end of it and
    the session's thread."""
    b, thread = session_in_process(tmp_path)
    sender = Channel(SocketStream(b, "receiver"))
    sender.stream.settimeout(WAIT)
    handshake.sender(sender, SECRET, receiver_verified=False)
    sender.send(Message(T.OPEN, {"export": "t", "device_id": "00000000000000aa",
                                 "generation": "00000000000000bb", "size": IN_PROCESS_SIZE,
                                 "mode": "replicate"}).encode())
    assert decode_json(sender.read()).type == T.OPENED
    return sender, thread


def bye_in_process(sender: Channel, thread: SessionThread) -> None:
    """BYE, and the session's end (its thread joined, nothing raised)."""
    try:
        sender.send(Message(T.BYE, {}).encode())
        thread.join(WAIT)
    finally:
        sender.close()
    assert not thread.is_alive()
    assert not thread.raised, thread.raised
