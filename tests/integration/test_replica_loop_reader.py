"""A replica's acknowledgements read by bmig-nbd's event loop (WireTarget.read_on), over
a plain socket: from OPENED on, each acknowledgement reaches the replica in the loop's
own thread (no thread to wake on the way); the end of the connection, a hostile frame,
and a close from either side of the loop end the reading, and the loop stops watching the
socket before it is closed. On asyncio's loop and on uvloop's (bmig-nbd's)."""

from __future__ import annotations

import asyncio
import socket
import threading

import pytest
import uvloop

from bmig.errors import BmigError, FrameTooLarge
from bmig.receiver.policy import Policy, TargetConfig
from bmig.receiver.session import Session
from bmig.wire import client as client_module
from bmig.wire import codec, handshake
from bmig.wire.channel import LOOP_FRAME, Channel
from bmig.wire.client import SourceInfo, WireTarget
from bmig.wire.options import ConnectOptions
from bmig.wire.protocol import FLAG_ACK_WRITTEN, Message, T, decode_json, type_of
from bmig.wire.transports import SocketStream
from bmig.wire.urls import parse_target_url

from .wire_helpers import IN_PROCESS_SIZE, SECRET, WAIT, FakeReceiver, SessionThread

SOURCE = SourceInfo("t", 0xAA, 0xBB, IN_PROCESS_SIZE, 65536)
REPLICATE = {"protocol": "C", "acks": "cumulative", "window": 0}


@pytest.fixture(params=["asyncio", "uvloop"])
def loop(request):
    """An event loop running in a thread of its own, as bmig-nbd's runs in its main
    thread while workers open and close replicas."""
    loop = uvloop.new_event_loop() if request.param == "uvloop" else asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    yield loop
    loop.call_soon_threadsafe(loop.stop)
    thread.join(WAIT)
    loop.close()


def on_loop(loop, function):
    """Run ``function`` in the loop's thread and return what it returned."""
    async def call():
        return function()
    return asyncio.run_coroutine_threadsafe(call(), loop).result(WAIT)


class Heard:
    """The replica's side of the acknowledgements: what came, and in which thread."""

    def __init__(self):
        self.events: list[tuple[str, int, int]] = []     # (kind, seq, thread ident)
        self.errors: list[BmigError] = []
        self.changed = threading.Condition()

    def _note(self, kind: str, seq: int) -> None:
        with self.changed:
            self.events.append((kind, seq, threading.get_ident()))
            self.changed.notify_all()

    def durable(self, seq: int) -> None:
        self._note("durable", seq)

    def written(self, seq: int) -> None:
        self._note("written", seq)

    def received(self, seq: int) -> None:
        self._note("received", seq)

    def failed(self, seq: int, error: BmigError) -> None:
        self._note("failed", seq)

    def fatal(self, error: BmigError) -> None:
        self.errors.append(error)
        self._note("fatal", 0)

    def wait_for(self, kind: str, seq: int = 0) -> tuple[str, int, int]:
        with self.changed:
            assert self.changed.wait_for(
                lambda: any(k == kind and s >= seq for k, s, _ in self.events), WAIT), \
                self.events
            return next(e for e in self.events if e[0] == kind and e[1] >= seq)


def target_over(sock: socket.socket) -> WireTarget:
    return WireTarget(SocketStream(sock, "receiver"), parse_target_url("tcp://127.0.0.1:1/t"),
                      ConnectOptions(secret=SECRET), receiver_verified=False)


def in_process_receiver(tmp_path) -> tuple[socket.socket, SessionThread]:
    """breceive's own Session on one end of a socket pair; the other end."""
    path = str(tmp_path / "t.img")
    with open(path, "wb") as f:
        f.truncate(IN_PROCESS_SIZE)
    policy = Policy({"t": TargetConfig("t", path)}, str(tmp_path), SECRET)
    a, b = socket.socketpair()
    thread = SessionThread(Session(Channel(SocketStream(a, "sender")), policy, False, "s"))
    thread.start()
    return b, thread


def send_data(target: WireTarget, first: int, count: int) -> None:
    payload = b"\x5a" * 4096
    target.send_batch([target.data_frame(seq, (seq % 64) * 4096, codec.RAW, payload, 4096,
                                         codec.checksum(payload), FLAG_ACK_WRITTEN)
                       for seq in range(first, first + count)]
                      + [target.durable_frame(first + count)])


def test_acknowledgements_after_opened_are_heard_in_the_loops_thread(loop, tmp_path):
    sock, session = in_process_receiver(tmp_path)
    target = target_over(sock)
    heard = Heard()
    assert target.read_on(loop) is True
    target.set_acks(heard)
    assert target.open(SOURCE, False, mode="replicate", extra=REPLICATE) in ("new", "same")
    loop_thread = on_loop(loop, threading.get_ident)
    send_data(target, 1, 20)
    heard.wait_for("durable", 21)
    assert heard.events and {t for _, _, t in heard.events} == {loop_thread}, heard.events
    assert ("written", 20) in [(k, s) for k, s, _ in heard.events]
    send_data(target, 22, 5)                  # and on, batch after batch
    heard.wait_for("durable", 27)
    target.close()                            # BYE from a worker: the session ends
    session.join(WAIT)
    assert not session.is_alive() and not session.raised, session.raised
    assert not heard.errors, heard.errors


def test_a_close_in_the_loops_own_thread_does_not_wait_for_the_loop(loop, tmp_path,
                                                                   monkeypatch):
    """A replica replaced while another runs is closed by the loop itself: the loop
    cannot wait for its own reading to end, so it stops watching and reads the last
    frames itself until the receiver has ended the session."""
    monkeypatch.setattr(client_module, "BYE_WAIT", 4 * WAIT)   # a wait would outlast WAIT
    sock, session = in_process_receiver(tmp_path)
    target = target_over(sock)
    heard = Heard()
    target.read_on(loop)
    target.set_acks(heard)
    target.open(SOURCE, False, mode="replicate", extra=REPLICATE)
    send_data(target, 1, 4)
    heard.wait_for("durable", 5)
    on_loop(loop, target.close)
    session.join(WAIT)
    assert not session.is_alive() and not session.raised, session.raised
    on_loop(loop, lambda: None)               # the loop runs on


def test_a_receiver_that_goes_away_is_heard_and_no_longer_watched(loop, tmp_path):
    sock, session = in_process_receiver(tmp_path)
    target = target_over(sock)
    heard = Heard()
    target.read_on(loop)
    target.set_acks(heard)
    target.open(SOURCE, False, mode="replicate", extra=REPLICATE)
    send_data(target, 1, 2)
    heard.wait_for("durable", 3)
    fd = sock.fileno()
    session.session.channel.close()           # the receiver's end of the pair
    kind, _, thread = heard.wait_for("fatal")
    assert thread == on_loop(loop, threading.get_ident)
    assert "closed the connection" in heard.errors[0].message
    assert not target._watched                # not watched any more
    if isinstance(loop, asyncio.SelectorEventLoop):     # uvloop's answers None either way
        assert on_loop(loop, lambda: loop.remove_reader(fd)) is False
    target.close()
    session.join(WAIT)


def hostile_receiver(channel: Channel) -> None:
    """Answers OPEN, then sends an 'acknowledgement' of 16 MiB."""
    handshake.receiver(channel, SECRET, False, "hostile", [])
    assert decode_json(channel.read()).type == T.OPEN
    channel.send(Message(T.OPENED, {"relation": "same", "target": {}}).encode())
    channel.send(b"\x00" * (16 << 20))
    while type_of(channel.read()) != T.BYE:
        pass


def test_a_frame_too_large_for_an_acknowledgement_ends_the_replica(loop):
    receiver = FakeReceiver(hostile_receiver)
    sock = socket.create_connection(("127.0.0.1", receiver.port), timeout=WAIT)
    sock.settimeout(None)
    try:
        target = target_over(sock)
        heard = Heard()
        assert target.read_on(loop)
        target.set_acks(heard)
        target.open(SOURCE, False, mode="replicate", extra=REPLICATE)
        heard.wait_for("fatal")
        assert isinstance(heard.errors[0], FrameTooLarge), heard.errors
        assert f"limit of {LOOP_FRAME}" in heard.errors[0].message
        target.close()
    finally:
        receiver.stop()

