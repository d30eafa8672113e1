"""sd_notify without libsystemd: READY=1, STATUS=, WATCHDOG=1, STOPPING=1.

Does nothing when NOTIFY_SOCKET is unset, so daemons call it unconditionally.

The watchdog (WatchdogSec= in a unit) is fed by the loop that does a daemon's work, never
by a thread of its own: a ping from a helper thread would go on while the work is stuck.
``keep_alive`` is that loop's task in an asyncio daemon; ``Heartbeat`` serves a loop of
threads, which beats where it turns and waits in pieces shorter than the interval. Under a
watchdog, faulthandler is on: the SIGABRT that systemd sends a daemon that stopped pinging
leaves every thread's stack on stderr (the journal) before it dies.
"""

from __future__ import annotations

import faulthandler
import os
import socket
import time
from typing import Callable, Protocol


def _address() -> str | None:
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return None
    if address.startswith("@"):  # abstract namespace
        return "\0" + address[1:]
    return address


def notify(*lines: str) -> bool:
    """Send ``lines`` (e.g. "READY=1", "STATUS=...") to the service manager.

    Never waits: a daemon's event loop calls this, and a manager that does not read its
    socket (its queue full) must not stop the daemon; the message is dropped instead."""
    address = _address()
    if address is None:
        return False
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
        try:
            sock.sendto("\n".join(lines).encode(), socket.MSG_DONTWAIT, address)
        except OSError:
            return False
    return True


def watchdog_interval() -> float | None:
    """Seconds between WATCHDOG=1 pings (half of WATCHDOG_USEC), or None."""
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or (pid and pid != str(os.getpid())):
        return None
    try:
        value = int(usec)
    except ValueError:
        return None
    return value / 2e6 if value > 0 else None


class Event(Protocol):
    """What a loop's waits are made of: threading.Event and its look-alikes."""

    def is_set(self) -> bool: ...

    def wait(self, timeout: float | None = None) -> bool: ...


def _report_hangs() -> None:
    """A watchdog kill (SIGABRT) prints where each thread was, on stderr."""
    if not faulthandler.is_enabled():
        faulthandler.enable(all_threads=True)


async def keep_alive() -> None:
    """WATCHDOG=1 from the event loop itself, at half the watchdog interval, for as long
    as the loop turns (run it as a task of the loop that serves). Returns at once when
    the service manager asked for no watchdog."""
    import asyncio      # here: the loop that runs this has it; the tools never need it
    interval = watchdog_interval()
    if interval is None:
        return
    _report_hangs()
    while True:
        notify("WATCHDOG=1")
        await asyncio.sleep(interval)


class Heartbeat:
    """WATCHDOG=1 from a loop run by threads: ``beat`` where the loop turns (at most one
    message per half interval goes out), ``wait`` for its deliberate waits, and
    ``watch`` for an event the loop polls while it works. Without a watchdog every call
    is as cheap as a comparison and sends nothing."""

    def __init__(self, clock: Callable[[], float] = time.monotonic):
        self.interval = watchdog_interval()
        self._clock = clock
        self._last: float | None = None
        if self.interval is not None:
            _report_hangs()

    def beat(self) -> None:
        if self.interval is None:
            return
        now = self._clock()
        if self._last is not None and now - self._last < self.interval / 2:
            return
        self._last = now
        notify("WATCHDOG=1")

    def wait(self, event: Event, timeout: float | None) -> bool:
        """``event.wait(timeout)`` in pieces no longer than the interval, with a beat
        before each: waiting on purpose is not being stuck."""
        if self.interval is None:
            return event.wait(timeout)
        deadline = None if timeout is None else self._clock() + timeout
        while True:
            self.beat()
            piece = self.interval
            if deadline is not None:
                piece = min(piece, deadline - self._clock())
                if piece <= 0:
                    return event.is_set()
            if event.wait(piece):
                return True

    def watch(self, event: Event) -> Watched:
        """``event`` as seen by a loop that polls it while it works (a pass's stop
        event): each look is a beat, and each wait on it is ``wait``."""
        return Watched(event, self)


class Watched:
    """An event whose every look is a heartbeat (see Heartbeat.watch)."""

    def __init__(self, event: Event, heartbeat: Heartbeat):
        self._event = event
        self._heartbeat = heartbeat

    def is_set(self) -> bool:
        self._heartbeat.beat()
        return self._event.is_set()

    def wait(self, timeout: float | None = None) -> bool:
        return self._heartbeat.wait(self._event, timeout)


SD_LISTEN_FDS_START = 3


def listen_sockets() -> list[socket.socket]:
    """Listening sockets handed over by systemd (LISTEN_FDS, LISTEN_PID), or none.

    The variables are removed so that children do not take the sockets for theirs.
    """
    pid = os.environ.get("LISTEN_PID")
    count = os.environ.get("LISTEN_FDS")
    if not count or (pid and pid != str(os.getpid())):
        return []
    for name in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        os.environ.pop(name, None)
    try:
        n = int(count)
    except ValueError:
        return []
    sockets = []
    for fd in range(SD_LISTEN_FDS_START, SD_LISTEN_FDS_START + n):
        os.set_inheritable(fd, False)
        sockets.append(socket.socket(fileno=fd))
    return sockets
