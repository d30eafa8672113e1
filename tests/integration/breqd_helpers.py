"""Helpers for the breqd integration tests: raw control-socket frames, device files, CLI.

Everything here talks to a real breqd subprocess (tests/daemon.py starts it). The raw
helpers build frame bodies byte by byte (docs/control-protocol.md) so tests can send
what no well-behaved client would.
"""

from __future__ import annotations

import json
import os
import socket
import struct
import subprocess
import sys
from typing import Any, Sequence

from bmig.constants import CONTROL_PROTOCOL_VERSION
from bmig.framing import LENGTH, recv_frame
from bmig.limits import MAX_CONTROL_FRAME
from bmig.tracker.blocking_client import TrackerClient
from bmig.tracker.protocol import Message, Op, decode
from tests.daemon import Daemon, breqd_argv

HEAD = struct.Struct("<BBHIQ")
SOCKET_TIMEOUT = 10.0
CLI_TIMEOUT = 60.0
KiB = 1 << 10
MiB = 1 << 20


# -- raw frames ----------------------------------------------------------------------

def body(op: int, request_id: int = 1, fields: Any = None,
         ranges: Sequence[tuple[int, int]] = (), *, doc: bytes | None = None,
         json_len: int | None = None, tail: bytes = b"", flags: int = 0,
         reserved: int = 0) -> bytes:
    """A frame body; ``doc``/``json_len``/``tail`` let a test break it on purpose."""
    if doc is None:
        doc = b"" if fields is None else json.dumps(fields).encode()
    raw_ranges = b"".join(struct.pack("<QQ", o, n) for o, n in ranges)
    return (HEAD.pack(op, flags, reserved, len(doc) if json_len is None else json_len,
                      request_id) + doc + raw_ranges + tail)


def frame(data: bytes) -> bytes:
    return LENGTH.pack(len(data)) + data


def raw_connect(path: str, timeout: float = SOCKET_TIMEOUT) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    s.connect(path)
    return s


def send(s: socket.socket, data: bytes) -> None:
    s.sendall(frame(data))


def receive(s: socket.socket) -> Message:
    return decode(recv_frame(s, MAX_CONTROL_FRAME))


def hello(s: socket.socket, request_id: int = 1) -> Message:
    send(s, body(Op.HELLO, request_id, {"version": CONTROL_PROTOCOL_VERSION}))
    reply = receive(s)
    assert reply.op == Op.REPLY_OK and reply.request_id == request_id, reply
    return reply


def request(s: socket.socket, op: int, request_id: int, fields: Any = None,
            ranges: Sequence[tuple[int, int]] = ()) -> Message:
    send(s, body(op, request_id, fields, ranges))
    reply = receive(s)
    assert reply.request_id == request_id, reply
    return reply


def assert_error(reply: Message, code: str, request_id: int | None = None) -> None:
    assert reply.op == Op.REPLY_ERROR, reply
    assert reply.fields.get("code") == code, reply
    assert isinstance(reply.fields.get("message"), str) and reply.fields["message"], reply
    assert "\n" not in reply.fields["message"], reply
    if request_id is not None:
        assert reply.request_id == request_id, reply


def assert_closed(s: socket.socket) -> None:
    """The peer closed the connection (EOF, or a reset because input was left unread)."""
    try:
        data = s.recv(1 << 16)
        while data:  # anything still queued before the close
            data = s.recv(1 << 16)
    except ConnectionResetError:
        pass


def read_until_closed(s: socket.socket) -> list[Message]:
    """Every reply until breqd closes the connection (fails on a timeout)."""
    replies = []
    buf = b""
    try:
        while True:
            data = s.recv(1 << 16)
            if not data:
                break
            buf += data
    except ConnectionResetError:
        pass
    while len(buf) >= LENGTH.size:
        (n,) = LENGTH.unpack_from(buf)
        if len(buf) < LENGTH.size + n:
            break
        replies.append(decode(buf[LENGTH.size:LENGTH.size + n]))
        buf = buf[LENGTH.size + n:]
    assert not buf, f"breqd sent a partial frame: {buf!r}"
    return replies


# -- a healthy client ----------------------------------------------------------------

def client(control: str) -> TrackerClient:
    return TrackerClient(control, timeout=SOCKET_TIMEOUT)


def works(c: TrackerClient, device: str, offset: int = 0) -> None:
    """One mark and one stats on an open connection succeed."""
    c.mark(device, [(offset, 4096)])
    stats = c.stats(device)
    assert stats["name"] == device
    assert stats["dirty_bytes"] >= 4096


def fresh_client_works(control: str, device: str, offset: int = 0) -> None:
    with client(control) as c:
        works(c, device, offset)


def dirty_chunks(c: TrackerClient, device: str) -> set[int]:
    """Every dirty chunk of ``device``, read by checking all of it out on ``c``.

    The caller closes ``c`` (or aborts) to give the chunks back.
    """
    chunk = c.stats(device)["chunk_size"]
    found: set[int] = set()
    while True:
        runs = c.checkout(device, 1 << 62)
        if not runs:
            return found
        for offset, length in runs:
            found.update(range(offset // chunk, (offset + length - 1) // chunk + 1))


def chunks_of(ranges: Sequence[tuple[int, int]], chunk: int) -> set[int]:
    out: set[int] = set()
    for offset, length in ranges:
        out.update(range(offset // chunk, (offset + length - 1) // chunk + 1))
    return out


def add_clean_device(c: TrackerClient, name: str, size: int, chunk_size: int = 4096) -> dict:
    """A new device with every chunk clean, so the next marks are first-time marks."""
    stats = c.add_device(name, size, chunk_size)
    c.clear_all(name, force=True)
    return stats


# -- daemons -------------------------------------------------------------------------

def breqd_daemon(root: str, env: dict[str, str] | None = None, state_dir: str | None = None,
                 log_name: str = "breqd.log") -> Daemon:
    """A Daemon (not started) with its directories under ``root``."""
    return Daemon(breqd_argv(state_dir or os.path.join(root, "state"),
                             os.path.join(root, "devices.d"),
                             os.path.join(root, "breqd.sock")),
                  os.path.join(root, log_name), env=dict(env or {}))


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


# -- device definition files ---------------------------------------------------------

def device_toml(name: str, size: int | str, chunk_size: int | str | None = None,
                device_id: str = "0123456789abcdef", file_name: str | None = None) -> str:
    lines = [f'name = "{name}"',
             f"size = {size if isinstance(size, int) else json.dumps(size)}"]
    if chunk_size is not None:
        lines.append(f"chunk_size = "
                     f"{chunk_size if isinstance(chunk_size, int) else json.dumps(chunk_size)}")
    lines.append(f'device_id = "{device_id}"')
    return "\n".join(lines) + "\n"


def write_atomic(path: str, text: str) -> None:
    """Temp file in the same directory (a dot file breqd ignores), fsync, rename."""
    directory, base = os.path.split(path)
    tmp = os.path.join(directory, f".{base}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.rename(tmp, path)


def write_plain(path: str, text: str) -> None:
    """What an editor without atomic saves does: truncate in place, write, close."""
    with open(path, "w") as f:
        f.write(text)


# -- the CLI -------------------------------------------------------------------------

def bmigrate(control: str, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, BMIG_CONTROL=control)
    return subprocess.run(
        [sys.executable, "-c", "from bmig.cli.main import main; main()", *args],
        env=env, capture_output=True, text=True, timeout=CLI_TIMEOUT,
        stdin=subprocess.DEVNULL)


def one_line_error(result: subprocess.CompletedProcess) -> str:
    """stderr is exactly one line, starting with the program name, and no traceback."""
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    assert lines[0].startswith("bmigrate: "), lines
    return lines[0]

