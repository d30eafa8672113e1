"""Connections that never authenticate cannot lock senders out of breceive.

Many at once (idle, dribbling a hello a byte at a time, sending garbage) keep breceive's
memory small, do not count against --max-sessions, are dropped at the handshake deadline
however slowly they keep talking, and are logged a few at a time; the real sender still
gets in.
"""

from __future__ import annotations

import socket
import struct
import threading

import pytest

from bmig.wire.protocol import Message, T
from tests.daemon import wait_until
from tests.integration.sync_helpers import (MiB, make_image, receivers,  # noqa: F401
                                            same_bytes, start_receiver, sync, track)

STRANGERS = 48                      # above the default cap of 32 waiting connections
RSS_GROWTH_LIMIT = 16 * MiB


def status_field(pid: int, name: str) -> int:
    """A number from /proc/PID/status (VmRSS in KiB, Threads)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(name + ":"):
                return int(line.split()[1])
    raise AssertionError(f"no {name} in /proc/{pid}/status")


def rss(pid: int) -> int:
    return status_field(pid, "VmRSS") * 1024


class Dribbler:
    """A HELLO sent one byte every ``interval`` seconds: never silent for long, never
    done. ``closed`` is set when breceive ends the connection."""

    def __init__(self, port: int, interval: float = 0.1):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=30)
        self.data = struct.pack("<I", 4000) + Message(T.HELLO, {"version": 2}).encode() \
            + b" " * 4000
        self.interval = interval
        self.closed = threading.Event()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            for i in range(len(self.data)):
                if self.stop.wait(self.interval):     # the pace of the attack, not a sync
                    return
                self.sock.send(self.data[i:i + 1])
        except OSError:
            self.closed.set()

    def close(self) -> None:
        self.stop.set()
        self.thread.join(timeout=10)
        self.sock.close()


def test_a_handshake_has_a_deadline_however_slowly_the_peer_keeps_talking(tmp_path,
                                                                          receivers):
    r = start_receiver(tmp_path, {"d": str(tmp_path / "tgt.img")}, "--handshake-timeout", "1")
    receivers.append(r)
    slow = Dribbler(r.port)
    try:
        wait_until(slow.closed.is_set, timeout=15, what="breceive to drop the slow peer")
    finally:
        slow.close()
    assert "no authentication within 1 s" in open(r.daemon.log_path).read()


def test_many_strangers_at_once_cost_little_and_the_sender_still_gets_in(breqd, tmp_path,
                                                                         receivers):
    source = make_image(str(tmp_path / "src.img"), 8 * MiB, "random")
    target = str(tmp_path / "tgt.img")
    track(breqd, "d", source)
    r = start_receiver(tmp_path, {"d": target})
    receivers.append(r)
    pid = r.daemon.proc.pid
    before = rss(pid)
    threads_before = status_field(pid, "Threads")
    strangers: list[socket.socket] = []
    slow: list[Dribbler] = []
    try:
        for i in range(STRANGERS):
            kind = i % 3
            if kind == 0:                              # idle
                strangers.append(socket.create_connection(("127.0.0.1", r.port)))
            elif kind == 1:                            # a frame that never ends
                sock = socket.create_connection(("127.0.0.1", r.port))
                sock.sendall(struct.pack("<I", 4096) + b"\x01" * 3000)
                strangers.append(sock)
            else:
                slow.append(Dribbler(r.port, interval=0.5))
        wait_until(lambda: status_field(pid, "Threads") >= threads_before + 16, timeout=30,
                   what="breceive to take the strangers in")
        grown = rss(pid) - before
        assert grown < RSS_GROWTH_LIMIT, f"breceive grew by {grown >> 20} MiB"
        sync(breqd, "d", "--source", source, "--to", r.url("d"), "--secret-file",
             r.secret_file, timeout=120)
        assert same_bytes(source, target)
        grown = rss(pid) - before          # the strangers are still there
        assert grown < RSS_GROWTH_LIMIT + 16 * MiB, f"breceive grew by {grown >> 20} MiB"
    finally:
        for dribbler in slow:
            dribbler.close()
        for sock in strangers:
            sock.close()
    assert r.daemon.proc.poll() is None


@pytest.mark.parametrize("garbage", [
    b"\x00" * 12,
    struct.pack("<I", 1 << 30),
    struct.pack("<I", 20) + b"\x01\x00\x00\x00{not json at all",
], ids=["zeros", "huge-length", "bad-json"])
def test_failed_handshakes_are_logged_a_few_at_a_time(tmp_path, receivers, garbage):
    r = start_receiver(tmp_path, {"d": str(tmp_path / "tgt.img")})
    receivers.append(r)
    for _ in range(40):
        with socket.create_connection(("127.0.0.1", r.port), timeout=30) as sock:
            sock.sendall(garbage)
            try:
                while sock.recv(4096):                 # until breceive closes it
                    pass
            except ConnectionResetError:
                pass
    lines = [line for line in open(r.daemon.log_path).read().splitlines()
             if "127.0.0.1:" in line and ("WARNING" in line or "ERROR" in line)]
    assert 1 <= len(lines) <= 5, "\n".join(lines)
    log = open(r.daemon.log_path).read()
    assert "Traceback" not in log and "internal error" not in log
