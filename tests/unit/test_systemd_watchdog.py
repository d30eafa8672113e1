"""WATCHDOG=1 comes from the loop that does the work, never from a thread of its own.

A ping sent by a helper thread goes on while the work is stuck, and systemd never restarts
the daemon: the point of WatchdogSec= is lost. ``keep_alive`` runs on the daemon's event
loop, so a loop that is blocked sends nothing; ``Heartbeat`` beats only where its loop
turns and in the loop's own waits, which it cuts into pieces shorter than the interval.
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time

import pytest

from bmig import systemd


class Sink:
    """A notify socket whose reader thread keeps each message with its arrival time."""

    def __init__(self, path: str):
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(path)
        self._got: list[tuple[float, str]] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        while True:
            data = self.sock.recv(4096)
            if not data:
                return
            self._got.append((time.time(), data.decode()))

    def pings(self) -> list[float]:
        # What was sent before this call is queued: our own marker comes after it.
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
            s.sendto(b"SYNC", self.path)
        deadline = time.monotonic() + 5
        while not any(text == "SYNC" for _, text in self._got):
            assert time.monotonic() < deadline, "the sink's reader is stuck"
            time.sleep(0.01)
        got = [m for m in self._got if m[1] != "SYNC"]
        self._got.clear()
        return [t for t, text in got if "WATCHDOG=1" in text.split("\n")]

    def close(self) -> None:
        self.sock.shutdown(socket.SHUT_RDWR)
        self._reader.join(timeout=5)
        self.sock.close()


@pytest.fixture
def sink(tmp_path, monkeypatch):
    s = Sink(str(tmp_path / "notify"))
    monkeypatch.setenv("NOTIFY_SOCKET", s.path)
    monkeypatch.setenv("WATCHDOG_USEC", "100000")        # pings every 50 ms
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    yield s
    s.close()


def test_keep_alive_pings_only_while_its_event_loop_turns(sink):
    blocked: list[float] = []

    async def main() -> None:
        task = asyncio.get_running_loop().create_task(systemd.keep_alive())
        await asyncio.sleep(0.3)
        blocked.append(time.time())
        time.sleep(0.6)                 # the loop is stuck: no ping may go out meanwhile
        blocked.append(time.time())
        await asyncio.sleep(0.3)
        task.cancel()

    asyncio.run(main())
    pings = sink.pings()
    start, end = blocked
    assert len([t for t in pings if t < start]) >= 3
    assert len([t for t in pings if t > end]) >= 3
    # One ping may be on its way as the loop blocks; a thread would have sent a dozen.
    assert len([t for t in pings if start + 0.01 < t < end]) == 0, pings


def test_keep_alive_returns_at_once_without_a_watchdog(sink, monkeypatch):
    monkeypatch.delenv("WATCHDOG_USEC")
    asyncio.run(asyncio.wait_for(systemd.keep_alive(), 5))
    assert sink.pings() == []


def test_the_watchdog_of_another_process_is_not_ours(sink, monkeypatch):
    monkeypatch.setenv("WATCHDOG_PID", "1")
    beat = systemd.Heartbeat()
    beat.beat()
    assert beat.interval is None and sink.pings() == []


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class Event:
    """An event whose waits only move a fake clock and are written down."""

    def __init__(self, clock: Clock, set_after: float | None = None):
        self.clock = clock
        self.waits: list[float] = []
        self.set_at = None if set_after is None else clock.now + set_after

    def is_set(self) -> bool:
        return self.set_at is not None and self.clock.now >= self.set_at

    def wait(self, timeout: float | None = None) -> bool:
        assert timeout is not None, "a heartbeat never waits without an end"
        self.waits.append(timeout)
        self.clock.now += timeout
        return self.is_set()


def test_a_heartbeat_sends_at_most_one_ping_per_half_interval(sink, monkeypatch):
    # The pings are counted as sent, not as received: notify never blocks, so a burst
    # larger than the kernel's datagram queue (net.unix.max_dgram_qlen, 10 here) would
    # lose some on the way to a sink whose reader is slower than this fake clock.
    sent: list[str] = []
    monkeypatch.setattr(systemd, "notify", lambda *lines: sent.extend(lines))
    clock = Clock()
    beat = systemd.Heartbeat(clock)
    assert beat.interval == pytest.approx(0.05)
    for _ in range(10):
        beat.beat()                         # a loop that turns fast: one ping
    clock.now += 0.02
    beat.beat()
    assert sent.count("WATCHDOG=1") == 1
    clock.now += 0.01                       # half an interval since the first: one more
    beat.beat()
    assert sent.count("WATCHDOG=1") == 2
    # ... a wait that lasts: pieces of the interval, a ping before each.
    sent.clear()
    event = Event(clock)
    assert beat.wait(event, 1.0) is False
    assert max(event.waits) <= beat.interval and sum(event.waits) == pytest.approx(1.0)
    assert sent.count("WATCHDOG=1") >= 1.0 / beat.interval - 1


def test_a_wait_ends_when_its_event_is_set_and_an_endless_one_is_cut_too(sink):
    clock = Clock()
    beat = systemd.Heartbeat(clock)
    event = Event(clock, set_after=0.3)
    assert beat.wait(event, None) is True
    assert event.waits and max(event.waits) <= beat.interval


def test_a_watched_event_beats_at_every_look(sink):
    clock = Clock()
    beat = systemd.Heartbeat(clock)
    stop = threading.Event()
    watched = beat.watch(stop)
    for _ in range(5):
        assert watched.is_set() is False
        clock.now += beat.interval
    assert len(sink.pings()) == 5
    stop.set()
    assert watched.is_set() and watched.wait(10) is True


def test_without_a_watchdog_a_heartbeat_only_waits(tmp_path, monkeypatch):
    monkeypatch.delenv("WATCHDOG_USEC", raising=False)
    beat = systemd.Heartbeat()
    event = threading.Event()
    event.set()
    assert beat.interval is None and beat.wait(event, 10) is True
    assert beat.watch(event).is_set()
