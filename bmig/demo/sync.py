"""``bmigrate sync`` as the demo runs it, and what it reported.

On a terminal the sync draws its own progress bars through a pty, its output relayed in
order with the demo's lines and its summary line read back; with ``--json`` its pass
events become the demo's detail lines. Either way the result is a ``SyncRun``: the exit
status and the summary. The sync is a child in the demo's process group (Ctrl-C reaches
it, and its two-stage Ctrl-C works), started and stopped by bmig/processes.py; this
module reads its output and nothing else.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import pty
import re
import struct
import subprocess
import termios
from dataclasses import dataclass
from typing import Any, TextIO

from bmig.constants import KiB, MiB
from bmig.demo.output import Out, pass_line
from bmig.demo.settings import DEVICE, SYNC_STOP_TIMEOUT, SYNC_TIMEOUT
from bmig.processes import Child, Group, child_env

_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
_TEXT_SUMMARY = re.compile(
    rf"^{DEVICE}: (?P<state>[^:]+): (?P<passes>\d+) pass\(es\) in (?P<seconds>[\d.]+) s; "
    r"read (?P<read>[\d.]+ \w+), sent (?P<sent>[\d.]+ \w+)"
    r"(?: \(compression [\d.]+x\))?, zeros (?P<zero>[\d.]+ \w+)")
_UNITS = {"B": 1, "KiB": KiB, "MiB": MiB, "GiB": 1 << 30, "TiB": 1 << 40, "PiB": 1 << 50}


@dataclass
class SyncRun:
    """What one bmigrate sync reported: its exit status and summary (exact from --json,
    read back from the text summary line otherwise)."""

    status: int
    summary: dict[str, Any] | None
    exact: bool


def sync_text(argv: list[str], log_path: str, stream: TextIO) -> SyncRun:
    """Run sync on our terminal, so tqdm draws its bars (through a pty, so that the
    summary line can be read too); one line per pass when ``stream`` is not a terminal.
    Its output goes to ``stream``, in order with the demo's own lines."""
    tty = stream.isatty()
    reader, writer = pty.openpty() if tty else os.pipe()
    if tty:
        _copy_window_size(stream.fileno(), writer)
    sync = Child(argv, name="bmigrate sync", group=Group.SHARED)
    try:
        sync.start(child_env(), stdout=writer, stderr=writer)
    finally:
        os.close(writer)
    assert sync.proc is not None
    try:
        text = _relay(reader, stream, log_path)
        status = sync.proc.wait(timeout=SYNC_TIMEOUT)
    finally:
        sync.stop(SYNC_STOP_TIMEOUT)
        os.close(reader)
    return SyncRun(status, parse_text_summary(text), False)


def _copy_window_size(terminal: int, pty_slave: int) -> None:
    """The terminal's rows and columns for the pty (80x24 when it says 0: tqdm would
    draw nothing in 0 columns)."""
    try:
        rows, cols, x, y = struct.unpack("HHHH", fcntl.ioctl(terminal, termios.TIOCGWINSZ,
                                                             b"\0" * 8))
    except OSError:
        rows = cols = x = y = 0
    size = struct.pack("HHHH", rows or 24, cols or 80, x, y)
    try:
        fcntl.ioctl(pty_slave, termios.TIOCSWINSZ, size)
    except OSError:
        pass


def _relay(fd: int, stream: TextIO, log_path: str) -> str:
    """Copy ``fd`` to ``stream`` (and a log) until it closes; what was read, as text."""
    seen = bytearray()
    with open(log_path, "ab") as log:
        while True:
            try:
                data = os.read(fd, 65536)
            except OSError as exc:
                if exc.errno == errno.EIO:              # the pty's last writer is gone
                    break
                raise
            if not data:
                break
            stream.buffer.write(data)
            stream.flush()
            log.write(data)
            seen += data
    return seen.decode(errors="replace")


def parse_text_summary(text: str) -> dict[str, Any] | None:
    """bmigrate's text summary line as a --json summary (sizes rounded as printed)."""
    for line in reversed(text.replace("\r", "\n").split("\n")):
        match = _TEXT_SUMMARY.match(_ANSI.sub("", line).strip())
        if match:
            state = match["state"]
            dirty = re.search(r"([\d.]+ \w+) (still )?dirty", state)
            return {"passes": int(match["passes"]), "seconds": float(match["seconds"]),
                    "bytes_read": _bytes(match["read"]), "bytes_sent": _bytes(match["sent"]),
                    "bytes_zero": _bytes(match["zero"]), "bytes_same": 0,
                    "converged": state.startswith("converged"),
                    "dirty_bytes": _bytes(dirty[1]) if dirty else 0}
    return None


def _bytes(text: str) -> int:
    number, unit = text.split()
    return int(float(number) * _UNITS[unit])


def sync_json(argv: list[str], log_path: str, out: Out) -> SyncRun:
    """Run sync --json; one line per pass from its events; its summary."""
    summary = None
    sync = Child(argv, name="bmigrate sync", group=Group.SHARED)
    with open(log_path, "ab") as log:
        sync.start(child_env(), stdout=subprocess.PIPE, stderr=log, text=True)
    proc = sync.proc
    assert proc is not None
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            event = _event(line)
            if event.get("event") == "pass":
                out.detail(pass_line(event))
            elif event.get("event") == "note":
                out.detail(str(event.get("message")))
            elif event.get("event") == "summary":
                summary = event
        status = proc.wait(timeout=SYNC_TIMEOUT)
    finally:
        sync.stop(SYNC_STOP_TIMEOUT)                 # closes its stdout too
    return SyncRun(status, summary, True)


def _event(line: str) -> dict[str, Any]:
    try:
        value = json.loads(line)
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}
