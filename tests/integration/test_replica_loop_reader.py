"""A replica's acknowledgements read by bmig-nbd's event loop (WireTarget.read_on), over
a plain socket: from OPENED on, each acknowledgement reaches the replica in the loop's
own thread (no thread to wake on the way); the end of the connection, a hostile frame,
and a close from either side of the loop end the reading, and the loop stops watching the
socket before it is closed. On asyncio's loop and on uvloop's (bmig-nbd's)."""

from __future__ import annotations

import asyncio
import os
import socket
import threading

import pytest
import uvloop

from bmig.errors import BmigError, FrameTooLarge, TargetFull
from bmig.nbd import replica as replica_module
from bmig.nbd.replica import Replica
from bmig.wire import client as client_module
from bmig.wire import codec, handshake
from bmig.wire.channel import LOOP_FRAME, Channel
from bmig.wire.client import SourceInfo, WireTarget
from bmig.wire.options import ConnectOptions
from bmig.wire.protocol import (DATA_HEAD, FLAG_ACK_WRITTEN, Message, T, decode_json,
                                error_message, pack_seq, type_of, unpack_seq)
from bmig.wire.transports import SocketStream
from bmig.wire.urls import parse_target_url

from tests.daemon import wait_until

from .wire_helpers import IN_PROCESS_SIZE, SECRET, WAIT, FakeReceiver, session_in_process

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


def settle(loop) -> None:
    """Let the loop run what a replica's close left it (its last callbacks, a task)."""
    for _ in range(3):
        on_loop(loop, lambda: None)


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


def opened(loop, sock: socket.socket, acks: Heard | None = None) -> WireTarget:
    """A replication session on ``sock``, its reading handed to ``loop`` (and
    ``acks`` listening from the start), once the loop watches the socket."""
    target = target_over(sock)
    assert target.read_on(loop)
    if acks is not None:
        target.set_acks(acks)
    assert target.open(SOURCE, False, mode="replicate", extra=REPLICATE) in ("new", "same")
    wait_until(lambda: target._watched, timeout=WAIT, what="the hand-over")
    return target


def send_data(target: WireTarget, first: int, count: int) -> None:
    payload = b"\x5a" * 4096
    target.send_batch([target.data_frame(seq, (seq % 64) * 4096, codec.RAW, payload, 4096,
                                         codec.checksum(payload), FLAG_ACK_WRITTEN)
                       for seq in range(first, first + count)]
                      + [target.durable_frame(first + count)])


def test_acknowledgements_after_opened_are_heard_in_the_loops_thread(loop, tmp_path):
    sock, session = session_in_process(tmp_path)
    heard = Heard()
    target = opened(loop, sock, heard)
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
    sock, session = session_in_process(tmp_path)
    heard = Heard()
    target = opened(loop, sock, heard)
    send_data(target, 1, 4)
    heard.wait_for("durable", 5)
    on_loop(loop, target.close)
    session.join(WAIT)
    assert not session.is_alive() and not session.raised, session.raised
    on_loop(loop, lambda: None)               # the loop runs on


def test_a_receiver_that_goes_away_is_heard_and_no_longer_watched(loop, tmp_path):
    sock, session = session_in_process(tmp_path)
    heard = Heard()
    target = opened(loop, sock, heard)
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



class GatedReceiver:
    """A receiver that answers OPEN at once, then reads nothing until ``go`` is set, and
    from then on answers each DATA with WRITTEN and each FLUSH with DURABLE; with
    ``trickle``, after BYE it sends a DURABLE every ``trickle`` seconds until ``stop``
    (``bytewise``: one frame, a byte every ``trickle`` seconds)."""

    def __init__(self, trickle: float = 0.0, bytewise: bool = False):
        self.go = threading.Event()
        self.stop = threading.Event()
        self.trickle = trickle
        self.bytewise = bytewise          # trickle one frame a byte at a time instead
        self.fake = FakeReceiver(self._script)

    def connect(self) -> socket.socket:
        sock = socket.create_connection(("127.0.0.1", self.fake.port), timeout=WAIT)
        sock.settimeout(None)
        return sock

    def _script(self, channel: Channel) -> None:
        handshake.receiver(channel, SECRET, False, "gated", [])
        assert decode_json(channel.read()).type == T.OPEN
        channel.send(Message(T.OPENED, {"relation": "same", "target": {}}).encode())
        assert self.go.wait(WAIT), "the test never let the receiver go"
        while True:
            body = channel.read()
            kind = type_of(body)
            if kind == T.BYE:
                break
            seq = unpack_seq(body) if kind == T.FLUSH else DATA_HEAD.unpack_from(body)[4]
            channel.send(pack_seq(T.DURABLE if kind == T.FLUSH else T.WRITTEN, seq))
        if self.bytewise:                 # a frame's length, then a byte at a time
            channel.stream.sock.sendall((100).to_bytes(4, "little"))
            for _ in range(100):
                if self.stop.wait(self.trickle):
                    return
                channel.stream.sock.sendall(b"x")
        while self.trickle and not self.stop.wait(self.trickle):
            channel.send(pack_seq(T.DURABLE, 1))

    def close(self) -> None:
        self.go.set()
        self.stop.set()
        self.fake.stop()


def test_a_burst_larger_than_the_socket_waits_for_room_on_every_loop(loop):
    """uvloop makes a descriptor it watches non-blocking; the replica's sender thread
    must still wait for room, not fail with EAGAIN: the socket stays blocking once the
    loop watches it, and 32 MiB queued while the receiver reads nothing all land."""
    receiver = GatedReceiver()
    sock = receiver.connect()
    try:
        target = opened(loop, sock)
        replica = Replica(target, "C", loop, ack_timeout=4 * WAIT)
        assert on_loop(loop, lambda: os.get_blocking(sock.fileno()))

        async def burst():
            return await asyncio.gather(*(replica.write(i << 20, b"\x5a" * (1 << 20), False)
                                          for i in range(32)), return_exceptions=True)

        future = asyncio.run_coroutine_threadsafe(burst(), loop)
        wait_until(lambda: replica.queued_seq >= 32, timeout=WAIT, what="the burst queued")
        receiver.go.set()
        results = future.result(WAIT)
        assert replica.error is None, replica.error
        assert not [r for r in results if isinstance(r, BaseException)], results
        replica.close()
        settle(loop)
    finally:
        receiver.close()


def test_the_loops_close_is_bounded_when_the_receiver_trickles_frames(loop, monkeypatch):
    """After BYE, a receiver that sends a frame now and then but never closes does not
    keep the loop: the loop's own close reads for BYE_WAIT in all."""
    monkeypatch.setattr(client_module, "BYE_WAIT", 1.0)
    receiver = GatedReceiver(trickle=0.2)
    receiver.go.set()
    sock = receiver.connect()
    try:
        target = opened(loop, sock)
        on_loop(loop, target.close)           # WAIT: an unbounded read would outlast it
        assert sock.fileno() == -1
    finally:
        receiver.close()


def test_the_loops_close_is_bounded_when_the_receiver_trickles_bytes(loop, monkeypatch):
    """... and so is it when the receiver sends one frame a byte at a time: the bound
    is on the whole read, not on each receive."""
    monkeypatch.setattr(client_module, "BYE_WAIT", 1.0)
    receiver = GatedReceiver(trickle=0.5, bytewise=True)
    receiver.go.set()
    sock = receiver.connect()
    try:
        target = opened(loop, sock)
        on_loop(loop, target.close)           # WAIT: 100 bytes at 0.5 s outlast it
        assert sock.fileno() == -1
    finally:
        receiver.close()


def test_the_loops_close_does_not_wait_for_room_for_its_bye(loop):
    """A receiver that reads nothing, a socket full to the brim: the loop's own close
    sends no BYE rather than wait for room (the receiver sees the close instead)."""
    receiver = GatedReceiver()                 # reads nothing until the end of the test
    sock = receiver.connect()
    try:
        target = opened(loop, sock)
        payload = b"\x33" * 65536

        def fill() -> int:
            for seq in range(1, 100_000):
                frame = target.data_frame(seq, 0, codec.RAW, payload, len(payload),
                                          codec.checksum(payload), FLAG_ACK_WRITTEN)
                if target.try_send_batch([frame]) != []:
                    return seq
            raise AssertionError("the socket never filled")

        assert on_loop(loop, fill) > 1
        on_loop(loop, target.close)           # WAIT: a BYE waiting for room would hang
        assert sock.fileno() == -1
    finally:
        receiver.close()


def test_a_loop_too_busy_to_let_go_closes_the_socket_itself(loop, monkeypatch):
    """close() from a worker while the loop is busy: it does not close a descriptor the
    loop still watches; the loop closes it once it lets go."""
    monkeypatch.setattr(client_module, "REASON_WAIT", 0.5)
    monkeypatch.setattr(client_module, "BYE_WAIT", 0.5)
    receiver = GatedReceiver()
    receiver.go.set()
    sock = receiver.connect()
    release = threading.Event()
    try:
        target = opened(loop, sock)
        loop.call_soon_threadsafe(lambda: release.wait(WAIT))   # the loop is busy
        target.close()
        assert sock.fileno() != -1             # not closed while watched
        release.set()
        on_loop(loop, lambda: None)
        assert not target._watched and sock.fileno() == -1
    finally:
        release.set()
        receiver.close()


def test_acknowledgements_read_on_the_loop_answer_writers_without_a_wake_up(tmp_path):
    """The replica takes what the loop read at once: no call_soon_threadsafe between
    breceive's WRITTEN and the writer's answer."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    sock, session = session_in_process(tmp_path)
    scheduled: list[str] = []
    threadsafe = loop.call_soon_threadsafe

    def counting(callback, *args, **kwargs):
        scheduled.append(getattr(callback, "__name__", repr(callback)))
        return threadsafe(callback, *args, **kwargs)

    loop.call_soon_threadsafe = counting
    try:
        target = opened(loop, sock)
        replica = Replica(target, "C", loop)
        wait_until(lambda: replica._loop_thread is not None, timeout=WAIT,
                   what="the replica's start on the loop")
        answered: list[int] = []
        all_answered = threading.Event()

        def answer(seq, error):
            assert error is None, error
            answered.append(threading.get_ident())
            if len(answered) == 20:
                all_answered.set()

        def write_all():
            for i in range(20):
                replica.write_now(i * 4096, b"\x11" * 4096, False, answer)

        scheduled.clear()
        threadsafe(write_all)
        assert all_answered.wait(WAIT)
        assert set(answered) == {thread.ident}
        assert "_take_inbox" not in scheduled, scheduled
        replica.close()
        settle(loop)
        session.join(WAIT)
    finally:
        threadsafe(loop.stop)
        thread.join(WAIT)
        loop.close()


def test_a_receiver_that_stops_answering_is_aborted_and_let_go(loop):
    """Nothing acknowledged for ack_timeout: the replica fails, abort() shuts the socket
    down (the loop still watches it, so it is not closed there), the loop hears the end,
    and close() closes it once the loop no longer watches it."""
    receiver = GatedReceiver()                 # reads nothing until the end of the test
    sock = receiver.connect()
    try:
        target = opened(loop, sock)
        replica = Replica(target, "C", loop, ack_timeout=1.0)
        outcome: list = []
        answered = threading.Event()

        def answer(seq, error):
            outcome.append(error)
            answered.set()

        loop.call_soon_threadsafe(replica.write_now, 0, b"\x22" * 4096, False, answer)
        assert answered.wait(WAIT)
        assert "acknowledged nothing" in outcome[0].message
        assert sock.fileno() != -1             # shut down, not closed under the loop
        wait_until(lambda: not target._watched, timeout=WAIT, what="the loop to let go")
        replica.close()
        settle(loop)
        assert sock.fileno() == -1
    finally:
        receiver.close()


def test_a_bug_in_handling_an_acknowledgement_ends_the_replica_not_the_loop(loop, tmp_path):
    """An exception other than the product's own while the loop handles what it read is
    logged, and ends the replication as a lost connection would: the loop stops
    watching and goes on."""
    class Broken(Heard):
        def written(self, seq: int) -> None:
            raise RuntimeError("a bug")

    sock, session = session_in_process(tmp_path)
    heard = Broken()
    target = opened(loop, sock, heard)
    send_data(target, 1, 2)
    heard.wait_for("fatal")
    assert "internal error" in heard.errors[0].message
    wait_until(lambda: not target._watched, timeout=WAIT, what="the loop to let go")
    on_loop(loop, lambda: None)               # the loop runs on
    target.close()
    session.join(WAIT)


def test_a_close_with_frames_stuck_behind_a_receiver_that_reads_nothing_ends(loop,
                                                                               monkeypatch):
    """Protocol A answers writers at once; with the receiver reading nothing, the
    sender thread is stuck in a send. Stopping the replication drops the link after
    SENDER_WAIT rather than wait for ever (BYE would wait for the stuck send)."""
    monkeypatch.setattr(replica_module, "SENDER_WAIT", 1.0)
    monkeypatch.setattr(client_module, "BYE_WAIT", 1.0)
    receiver = GatedReceiver()                 # reads nothing until the end of the test
    sock = receiver.connect()
    try:
        target = opened(loop, sock)
        replica = Replica(target, "A", loop, ack_timeout=4 * WAIT)

        async def burst():
            for i in range(32):                # answered at once: queued, not sent
                await replica.write(i << 20, b"\x44" * (1 << 20), False)

        asyncio.run_coroutine_threadsafe(burst(), loop).result(WAIT)
        wait_until(lambda: replica._in_thread, timeout=WAIT,
                   what="the sender thread to take frames the socket did not")
        closer = threading.Thread(target=replica.close, daemon=True)
        closer.start()
        closer.join(WAIT)
        assert not closer.is_alive(), "the close waited for the stuck send"
        settle(loop)
        assert sock.fileno() == -1
    finally:
        receiver.close()


def test_a_failed_send_raises_the_receivers_reason_read_by_the_loop(loop):
    """The receiver sends a fatal ERROR and closes; the sender's next send fails with
    a broken connection before the loop has read the ERROR (the loop is held up).
    The send waits for the loop's reading to end and raises the receiver's reason,
    not the broken pipe that followed it."""
    def refusing_receiver(channel: Channel) -> None:
        handshake.receiver(channel, SECRET, False, "refusing", [])
        assert decode_json(channel.read()).type == T.OPEN
        channel.send(Message(T.OPENED, {"relation": "same", "target": {}}).encode())
        assert type_of(channel.read()) == T.DATA
        channel.send(error_message(TargetFull("the target disk is full"),
                                   fatal=True).encode())
        channel.stream.sock.shutdown(socket.SHUT_RDWR)

    class Waited(threading.Event):
        """``_read_ended``, telling when somebody starts waiting on it."""

        def __init__(self):
            super().__init__()
            self.waiting = threading.Event()

        def wait(self, timeout=None):
            self.waiting.set()
            return super().wait(timeout)

    receiver = FakeReceiver(refusing_receiver)
    sock = socket.create_connection(("127.0.0.1", receiver.port), timeout=WAIT)
    sock.settimeout(None)
    held_up = threading.Event()
    try:
        target = opened(loop, sock, Heard())
        target._read_ended = read_ended = Waited()
        holding = threading.Event()

        def hold_up() -> None:                             # the loop reads nothing
            holding.set()
            held_up.wait(WAIT)

        loop.call_soon_threadsafe(hold_up)
        assert holding.wait(WAIT)
        outcome: list[BaseException] = []

        def send_until_refused() -> None:
            try:
                for seq in range(1, 10_000):
                    send_data(target, seq, 1)
            except BaseException as exc:
                outcome.append(exc)

        sender = threading.Thread(target=send_until_refused, daemon=True)
        sender.start()
        wait_until(lambda: read_ended.waiting.is_set() or outcome, timeout=WAIT,
                   what="the failed send to wait for the loop")
        held_up.set()
        sender.join(WAIT)
        assert not sender.is_alive()
        assert len(outcome) == 1 and isinstance(outcome[0], TargetFull), outcome
        assert "the target disk is full" in outcome[0].message
        target.close()
    finally:
        held_up.set()
        receiver.stop()
