"""Abuse over a raw socket: the server answers as the spec says and stays up."""

from __future__ import annotations

import socket
import struct

from bmig.nbd import protocol as p
from tests.daemon import wait_until
from tests.integration.nbd_helpers import nbd_server, require, tool  # noqa: F401


def connect(path: str) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(10)
    s.connect(path)
    return s


def recv_exact(s: socket.socket, n: int) -> bytes:
    out = b""
    while len(out) < n:
        chunk = s.recv(n - len(out))
        if not chunk:
            raise EOFError(f"closed after {len(out)} of {n} bytes")
        out += chunk
    return out


def open_export(path: str) -> socket.socket:
    """Handshake with NBD_OPT_EXPORT_NAME (simple replies only)."""
    s = connect(path)
    recv_exact(s, p.SERVER_GREETING.size)
    s.sendall(struct.pack(">I", p.FLAG_C_FIXED_NEWSTYLE | p.FLAG_C_NO_ZEROES)
              + p.OPTION_HEADER.pack(p.IHAVEOPT, p.Opt.EXPORT_NAME, 2) + b"d1")
    recv_exact(s, p.EXPORT_NAME_REPLY.size)
    return s


def request(s: socket.socket, cmd: int, offset: int, length: int, cookie: int = 7,
            payload: bytes = b"") -> int:
    s.sendall(p.REQUEST.pack(p.REQUEST_MAGIC, 0, cmd, cookie, offset, length) + payload)
    magic, error, got = p.SIMPLE_REPLY.unpack(recv_exact(s, p.SIMPLE_REPLY.size))
    assert magic == p.SIMPLE_REPLY_MAGIC and got == cookie
    if error == 0 and cmd == p.Cmd.READ:
        recv_exact(s, length)
    return error


def assert_closed(s: socket.socket) -> None:
    assert s.recv(1) == b""


def test_range_errors_follow_the_spec(nbd_server):
    s = open_export(nbd_server.socket)
    size = 64 << 20
    assert request(s, p.Cmd.READ, size - 1, 2) == p.Err.EINVAL
    assert request(s, p.Cmd.READ, 2**64 - 1, 2**32 - 1) == p.Err.EINVAL
    assert request(s, p.Cmd.WRITE, size, 4, payload=b"abcd") == p.Err.ENOSPC
    assert request(s, p.Cmd.TRIM, size, 4) == p.Err.EINVAL
    assert request(s, 42, 0, 0) == p.Err.EINVAL
    assert request(s, p.Cmd.FLUSH, 0, 0) == 0
    assert request(s, p.Cmd.READ, 0, 4096) == 0        # still in step
    s.close()


def test_oversize_write_is_refused_and_the_stream_stays_in_step(nbd_server):
    s = open_export(nbd_server.socket)
    length = p.MAX_PAYLOAD + 4096
    assert request(s, p.Cmd.WRITE, 0, length, payload=bytes(length)) == p.Err.EINVAL
    assert request(s, p.Cmd.READ, 0, 4096) == 0
    s.close()


def test_a_payload_too_large_to_skip_closes_the_connection(nbd_server):
    s = open_export(nbd_server.socket)
    s.sendall(p.REQUEST.pack(p.REQUEST_MAGIC, 0, p.Cmd.WRITE, 1, 0, 2**32 - 1))
    assert_closed(s)


def test_bad_request_magic_and_command_before_handshake_close(nbd_server):
    s = open_export(nbd_server.socket)
    s.sendall(p.REQUEST.pack(0xDEADBEEF, 0, p.Cmd.READ, 1, 0, 512))
    assert_closed(s)
    s = connect(nbd_server.socket)
    recv_exact(s, p.SERVER_GREETING.size)
    s.sendall(struct.pack(">I", p.FLAG_C_FIXED_NEWSTYLE)
              + p.REQUEST.pack(p.REQUEST_MAGIC, 0, p.Cmd.READ, 1, 0, 512))
    assert_closed(s)


def test_half_sent_requests_and_a_thousand_dropped_connections(nbd_server):
    require("nbdinfo")
    s = open_export(nbd_server.socket)
    s.sendall(p.REQUEST.pack(p.REQUEST_MAGIC, 0, p.Cmd.WRITE, 1, 0, 4096) + b"x" * 100)
    s.close()
    for _ in range(1000):      # blocking connects: wait for room in the backlog
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as dropped:
            dropped.connect(nbd_server.socket)
    # The dropped connections count against the cap until the server has seen them go.
    wait_until(lambda: tool("nbdinfo", "--json", nbd_server.uri, check=False).returncode == 0,
               timeout=30, what="nbdinfo to get in")
    assert nbd_server.daemon.proc.poll() is None
