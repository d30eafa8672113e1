"""make demo: a live device copied to another "host" while it is written, on one machine.

What it shows is the main job of bmig, with the real daemons and commands: an ext4 image
full of real files is served through bmig-nbd (every write marked in breqd first) while a
writer keeps changing a file inside it; ``bmigrate sync`` ships it to breceive on
127.0.0.1 until the copy has converged under those writes; once the writer stops, a last
``bmigrate sync --threshold 0`` leaves a target that is the source byte for byte (sha256)
and a clean file system (``e2fsck -fn``).

Everything lives in one temporary directory (kept with --keep): the images, the daemons'
state, sockets and logs. Run it with ``make demo`` or ``.venv/bin/python -m bmig.demo``.
"""

from __future__ import annotations

import argparse
import bisect
import errno
import fcntl
import glob
import hashlib
import json
import os
import pty
import random
import re
import secrets
import shlex
import shutil
import signal
import socket
import stat
import struct
import subprocess
import sys
import tempfile
import termios
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Iterator, TextIO

from bmig.cli.common import human_bytes
from bmig.config import parse_size
from bmig.constants import KiB, MiB
from bmig.errors import BmigError
from bmig.nbdclient import NbdClient

DEVICE = "src"                      # the device's name in breqd and the export's in breceive
STEPS = 8
START_TIMEOUT = 30.0                # seconds for a daemon to say READY=1
STOP_TIMEOUT = 20.0                 # seconds between SIGTERM and SIGKILL
# bmigrate sync stopped in a pass waits for acknowledgements of frames it never sent,
# up to its 300 s ACK_TIMEOUT; the demo does not wait that long before SIGKILL.
SYNC_STOP_TIMEOUT = 5.0
SYNC_TIMEOUT = 600.0
BLOCK = 4 * KiB                     # the image's block size, and the writer's alignment
MAX_WRITE = 64 * KiB
MIN_SIZE = 32 * MiB
# The live sync's --bwlimit: a 20 MB/s link, so that its passes can be watched (on one
# machine it ships at hundreds of MB/s and would be over before a bar is drawn).
LINK = "20M"
# Real files for the image, in this order, until the budget is spent.
# (Not /usr/share/man: mkfs.ext4 -d takes seconds per thousand small files.)
FILE_SOURCES = ("/usr/share/common-licenses", "/usr/share/doc", "/usr/lib/python3*",
                "/usr/share/locale", "/usr/lib/*-linux-gnu")
WORKLOAD_FILE = "srv/db/orders.db"  # what the writer changes inside the file system
SBIN = ("/usr/sbin", "/sbin")       # e2fsprogs lives here, often not in a user's PATH
_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
_TEXT_SUMMARY = re.compile(
    rf"^{DEVICE}: (?P<state>[^:]+): (?P<passes>\d+) pass\(es\) in (?P<seconds>[\d.]+) s; "
    r"read (?P<read>[\d.]+ \w+), sent (?P<sent>[\d.]+ \w+)"
    r"(?: \(compression [\d.]+x\))?, zeros (?P<zero>[\d.]+ \w+)")
_UNITS = {"B": 1, "KiB": KiB, "MiB": MiB, "GiB": 1 << 30, "TiB": 1 << 40, "PiB": 1 << 50}


class DemoError(Exception):
    """A step failed; ``daemon`` is the one whose log explains it, if any."""

    def __init__(self, message: str, daemon: "Daemon | None" = None, log: str | None = None):
        super().__init__(message)
        self.daemon = daemon
        self.log = log


class Stopped(Exception):
    """SIGTERM or SIGHUP reached the demo."""


# -- settings ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Profile:
    """How big the demo is: the image, the real files in it, the writer's file and pace."""

    size: int
    file_budget: int
    workload: int
    write_rate: int                 # bytes per second
    bwlimit: str = LINK             # bmigrate sync --bwlimit while the writer runs


def profile(size: int | None, quick: bool) -> Profile:
    if quick and size is None:
        return Profile(64 * MiB, 20 * MiB, 8 * MiB, 1 * MiB)
    size = size or 768 * MiB
    if size < MIN_SIZE:
        raise DemoError(f"--size {size} is too small: give at least {MIN_SIZE // MiB}M")
    size -= size % BLOCK
    workload = max(4 * MiB, min(64 * MiB, size // 12 // MiB * MiB))
    return Profile(size, int(size * 0.45), workload, 1 * MiB if quick else 3 * MiB)


def _size(text: str) -> int:
    try:
        return parse_size(text)
    except BmigError as exc:
        raise argparse.ArgumentTypeError(exc.message) from None


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bmig.demo",
        description="Copy a live ext4 image to a local breceive with bmigrate sync while it "
                    "is written, then prove the copy identical.")
    parser.add_argument("--size", type=_size, metavar="SIZE",
                        help="image size, e.g. 512M or 1G [default: 768M; 64M with --quick]")
    parser.add_argument("--keep", action="store_true",
                        help="keep the temporary directory (images, state, logs)")
    parser.add_argument("--quick", action="store_true",
                        help="a small image and a slow writer: a few seconds")
    parser.add_argument("--json", action="store_true",
                        help="print the final summary as JSON on stdout (steps on stderr)")
    return parser.parse_args(argv)


# -- output ------------------------------------------------------------------------------


class Out:
    """Headed step lines and details, on stdout (or stderr when stdout carries JSON)."""

    def __init__(self, stream: TextIO):
        self.stream = stream

    def step(self, number: int, title: str) -> None:
        self.line(f"\n[{number}/{STEPS}] {title}")

    def detail(self, text: str) -> None:
        self.line(f"      {text}")

    def command(self, argv: list[str]) -> None:
        self.detail("$ " + shlex.join([_short(argv[0]), *argv[1:]]))

    def line(self, text: str) -> None:
        self.stream.write(text + "\n")
        self.stream.flush()


def _short(program: str) -> str:
    """The venv's ``.../bin/bmigrate`` as ``bmigrate``."""
    return os.path.basename(program) if os.path.dirname(program) == _bin_dir() else program


def _bin_dir() -> str:
    return os.path.dirname(sys.executable)


def program(name: str) -> list[str]:
    """The argv that runs one of bmig's commands: the venv's script, else the module."""
    script = os.path.join(_bin_dir(), name)
    if os.access(script, os.X_OK):
        return [script]
    module = {"bmigrate": "main", "breqd": "breqd", "bmig-nbd": "nbd",
              "breceive": "breceive"}[name]
    return [sys.executable, "-c", f"from bmig.cli.{module} import main; main()"]


def tool(name: str) -> str | None:
    """A system tool by name, also from /usr/sbin when it is not in PATH."""
    found = shutil.which(name)
    if found:
        return found
    for directory in SBIN:
        path = os.path.join(directory, name)
        if os.access(path, os.X_OK):
            return path
    return None


def child_env() -> dict[str, str]:
    """Our environment without what belongs to our own service manager or breqd."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("NOTIFY_SOCKET", "LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES",
                        "WATCHDOG_USEC", "WATCHDOG_PID", "BMIG_CONTROL")}
    env["PYTHONUNBUFFERED"] = "1"
    return env


def tail(path: str, lines: int = 20) -> str:
    try:
        with open(path, errors="replace") as f:
            return "".join(f.readlines()[-lines:])
    except OSError:
        return ""


# -- processes ---------------------------------------------------------------------------


def stop_process(proc: subprocess.Popen, timeout: float = STOP_TIMEOUT) -> int:
    """SIGTERM to its process group, wait, SIGKILL after ``timeout``; the exit status."""
    if proc.poll() is None:
        _signal_group(proc, signal.SIGTERM)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            _signal_group(proc, signal.SIGKILL)
            proc.wait(timeout=timeout)
    return proc.returncode


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    try:
        if os.getpgid(proc.pid) == proc.pid:     # a group of its own: take all of it
            os.killpg(proc.pid, sig)
        else:
            proc.send_signal(sig)
    except ProcessLookupError:
        pass


class Children:
    """Every process the demo starts, so that none outlives it, and the signals that stop
    the demo: SIGTERM, SIGHUP and Ctrl-C become exceptions in the main thread, except
    while a child is being started; then they wait until it is on the list."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen] = []
        self._starting = False
        self._pending: int | None = None

    def install(self) -> None:
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, self._on_signal)

    def ignore_signals(self) -> None:
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, signal.SIG_IGN)

    def spawn(self, argv: list[str], **kw: Any) -> subprocess.Popen:
        """Popen, on the list before a signal can stop the demo."""
        self._starting = True
        try:
            proc = subprocess.Popen(argv, **kw)
            self.procs.append(proc)
        finally:
            self._starting = False
        pending, self._pending = self._pending, None
        if pending is not None:
            _raise_for(pending)
        return proc

    def run(self, argv: list[str], timeout: float, **kw: Any) -> subprocess.CompletedProcess:
        """subprocess.run(capture_output=True, text=True), started with spawn()."""
        proc = self.spawn(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True, **kw)
        try:
            out, err = proc.communicate(timeout=timeout)
        finally:
            stop_process(proc)
        return subprocess.CompletedProcess(argv, proc.returncode, out, err)

    def stop_all(self) -> None:
        for proc in reversed(self.procs):
            stop_process(proc, SYNC_STOP_TIMEOUT)

    def _on_signal(self, signum: int, frame: Any) -> None:
        if self._starting:
            self._pending = signum
        else:
            _raise_for(signum)


def _raise_for(signum: int) -> None:
    if signum == signal.SIGINT:
        raise KeyboardInterrupt
    raise Stopped(signal.Signals(signum).name)


CHILDREN = Children()


@dataclass
class Daemon:
    """A daemon in its own process group, ready when it says READY=1 on our socket."""

    name: str
    argv: list[str]
    run_dir: str
    log_path: str
    proc: subprocess.Popen | None = None
    status: list[str] = field(default_factory=list)

    def start(self, out: Out) -> "Daemon":
        out.command(self.argv)
        path = os.path.join(self.run_dir, f"{self.name}.notify")
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify:
            notify.bind(path)
            with open(self.log_path, "ab") as log:
                self.proc = CHILDREN.spawn(
                    self.argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                    env={**child_env(), "NOTIFY_SOCKET": path}, process_group=0)
            self._wait_ready(notify)
        os.unlink(path)
        out.detail(f"{self.name} ready (pid {self.proc.pid}, log {self.log_path})")
        return self

    def _wait_ready(self, notify: socket.socket) -> None:
        assert self.proc is not None
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            if self.proc.poll() is not None:
                raise DemoError(f"{self.name} exited with status {self.proc.returncode} "
                                "before it was ready", self)
            left = deadline - time.monotonic()
            if left <= 0:
                raise DemoError(f"{self.name} did not say READY=1 in {START_TIMEOUT:.0f} s",
                                self)
            notify.settimeout(min(left, 0.2))
            try:
                lines = notify.recv(4096).decode(errors="replace").split("\n")
            except socket.timeout:
                continue
            self.status += [line[7:] for line in lines if line.startswith("STATUS=")]
            if "READY=1" in lines:
                return

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> int | None:
        return None if self.proc is None else stop_process(self.proc)


# -- the source image --------------------------------------------------------------------


@dataclass
class Image:
    """The source: an ext4 image of real files, or a file of mixed data without mkfs."""

    path: str
    size: int
    kind: str                                   # "ext4" or "mixed"
    extents: list[tuple[int, int]]              # byte ranges the writer may change
    files: int = 0
    file_bytes: int = 0


def copy_real_files(staging: str, budget: int) -> tuple[int, int]:
    """Files from FILE_SOURCES under ``staging``, until ``budget`` bytes: hard links where
    the system allows them (mkfs.ext4 only reads them), copies otherwise."""
    files = copied = 0
    for pattern in FILE_SOURCES:
        for top in sorted(glob.glob(pattern)):
            for src, dst, st in _walk(top, staging):
                if stat.S_ISLNK(st.st_mode):
                    os.symlink(os.readlink(src), dst)
                elif stat.S_ISREG(st.st_mode):
                    if copied + st.st_size > budget:
                        return files, copied
                    if not _link_or_copy(src, dst):
                        continue                    # unreadable: not needed
                    copied += st.st_size
                files += 1
    return files, copied


def _link_or_copy(src: str, dst: str) -> bool:
    try:
        os.link(src, dst)
        return True
    except OSError:
        pass
    try:
        shutil.copyfile(src, dst)
        return True
    except OSError:
        return False


def _walk(top: str, staging: str) -> Iterator[tuple[str, str, os.stat_result]]:
    """(source, destination, lstat) of everything under ``top``; directories made."""
    for root, dirs, names in os.walk(top):
        dest = os.path.join(staging, root.lstrip("/"))
        os.makedirs(dest, exist_ok=True)
        dirs.sort()
        for name in sorted(names) + [d for d in dirs if os.path.islink(os.path.join(root, d))]:
            src = os.path.join(root, name)
            try:
                st = os.lstat(src)
            except OSError:
                continue
            if not os.path.lexists(os.path.join(dest, name)):
                yield src, os.path.join(dest, name), st
        dirs[:] = [d for d in dirs if not os.path.islink(os.path.join(root, d))]


def write_workload_file(path: str, size: int, seed: int = 1) -> None:
    """A "database" of rows, half text and half random, with no zero blocks."""
    rng = random.Random(seed)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        for n in range(size // MiB):
            rows = b"".join(b"order %08d customer %05d total %7.2f status shipped\n"
                            % (n * 8192 + i, rng.randrange(99999), rng.random() * 1e4)
                            for i in range(8192))
            f.write((rows[:MiB // 2] + rng.randbytes(MiB))[:MiB])


def build_ext4(image: str, staging: str, p: Profile, out: Out) -> Image:
    """mkfs.ext4 -d from a directory of real files and the writer's file; no mount."""
    mkfs, debugfs = tool("mkfs.ext4"), tool("debugfs")
    assert mkfs and debugfs
    files, copied = copy_real_files(staging, p.file_budget)
    write_workload_file(os.path.join(staging, WORKLOAD_FILE), p.workload)
    out.detail(f"gathered {files} real files ({human_bytes(copied)}) from "
               f"{', '.join(FILE_SOURCES)}; {WORKLOAD_FILE}: {human_bytes(p.workload)}")
    with open(image, "wb") as f:
        f.truncate(p.size)
    entries = sum(len(d) + len(f) for _, d, f in os.walk(staging))
    inodes = entries * 5 // 4 + 2048
    argv = [mkfs, "-q", "-F", "-b", str(BLOCK), "-N", str(inodes), "-L", "bmig-demo",
            "-d", staging, image, f"{p.size // KiB}k"]
    out.command(argv)
    run_tool(argv, "mkfs.ext4")
    shutil.rmtree(staging)
    extents = file_extents(debugfs, image, "/" + WORKLOAD_FILE)
    if sum(n for _, n in extents) != p.workload:
        raise DemoError(f"debugfs found {sum(n for _, n in extents)} bytes of "
                        f"/{WORKLOAD_FILE}, not {p.workload}")
    return Image(image, p.size, "ext4", extents, files + 1, copied + p.workload)


def file_extents(debugfs: str, image: str, path: str) -> list[tuple[int, int]]:
    """The byte ranges of the image that hold ``path``'s data (debugfs "blocks")."""
    done = run_tool([debugfs, "-R", f"blocks {path}", image], "debugfs")
    extents: list[tuple[int, int]] = []
    for block in sorted(int(b) for b in done.stdout.split()):
        offset = block * BLOCK
        if extents and extents[-1][0] + extents[-1][1] == offset:
            extents[-1] = (extents[-1][0], extents[-1][1] + BLOCK)
        else:
            extents.append((offset, BLOCK))
    return extents


def build_mixed(image: str, size: int, seed: int = 1) -> Image:
    """Random, text, zeros and holes, when there is no mkfs.ext4."""
    rng = random.Random(seed)
    with open(image, "wb") as f:
        f.truncate(size)
        pos = 0
        while pos < size:
            n = min(rng.choice([BLOCK, 64 * KiB, 1 * MiB, 4 * MiB]), size - pos)
            kind = rng.choice(["hole", "random", "text", "zero"])
            f.seek(pos)
            if kind == "random":
                f.write(rng.randbytes(n))
            elif kind == "text":
                f.write((b"mixed content at %d " % pos * (n // 16 + 1))[:n])
            elif kind == "zero":
                f.write(bytes(n))
            pos += n
    return Image(image, size, "mixed", [(0, size)])


def run_tool(argv: list[str], what: str) -> subprocess.CompletedProcess:
    done = CHILDREN.run(argv, timeout=300)
    if done.returncode != 0:
        raise DemoError(f"{what} failed with status {done.returncode}",
                        log=(done.stderr or done.stdout).strip())
    return done


# -- the live writer ---------------------------------------------------------------------


class Writer(threading.Thread):
    """Writes of 4 KiB to 64 KiB at random places of ``extents``, ``rate`` bytes a second,
    through the NBD export: the application whose device is being moved."""

    def __init__(self, uri: str, extents: list[tuple[int, int]], rate: int, seed: int = 7):
        super().__init__(name="demo-writer", daemon=True)
        self.uri, self.extents, self.rate = uri, extents, rate
        self.rng = random.Random(seed)
        self._ends = list(_running_sum(n // BLOCK for _, n in extents))
        self.halt = threading.Event()
        self.writes = 0
        self.bytes = 0
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            with NbdClient.connect(self.uri, timeout=60) as client:
                started = time.monotonic()
                while not self.halt.is_set():
                    offset, length = self._pick()
                    client.pwrite(self._data(length), offset)
                    self.writes += 1
                    self.bytes += length
                    ahead = self.bytes / self.rate - (time.monotonic() - started)
                    if ahead > 0:                       # the workload's pace
                        self.halt.wait(ahead)
                client.flush()
        except BaseException as exc:                    # reported by finish()
            self.error = exc

    def _pick(self) -> tuple[int, int]:
        """A random block of the extents, and up to 64 KiB from it within its extent."""
        block = self.rng.randrange(self._ends[-1])
        i = bisect.bisect_right(self._ends, block)
        start, length = self.extents[i]
        first = block - (self._ends[i - 1] if i else 0)
        left = length // BLOCK - first
        return start + first * BLOCK, min(left, self.rng.randint(1, MAX_WRITE // BLOCK)) * BLOCK

    def _data(self, length: int) -> bytes:
        if self.rng.random() < 0.5:
            return self.rng.randbytes(length)
        row = b"order %08d updated %.3f status paid\n" % (self.writes, time.time())
        return (row * (length // len(row) + 1))[:length]

    def finish(self) -> None:
        """Stop, after the last write and a flush."""
        self.halt.set()
        self.join(timeout=STOP_TIMEOUT)
        if self.is_alive():
            raise DemoError(f"the writer did not stop within {STOP_TIMEOUT:.0f} s")
        if self.error is not None:
            raise DemoError(f"the writer failed: {_reason(self.error)}")


def _running_sum(values: Iterator[int]) -> Iterator[int]:
    total = 0
    for v in values:
        total += v
        yield total


def _reason(exc: BaseException) -> str:
    return exc.message if isinstance(exc, BmigError) else f"{type(exc).__name__}: {exc}"


# -- bmigrate sync -----------------------------------------------------------------------


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
    try:
        proc = CHILDREN.spawn(argv, stdin=subprocess.DEVNULL, stdout=writer, stderr=writer,
                              env=child_env())
    finally:
        os.close(writer)
    try:
        text = _relay(reader, stream, log_path)
        status = proc.wait(timeout=SYNC_TIMEOUT)
    finally:
        stop_process(proc, SYNC_STOP_TIMEOUT)
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
    with open(log_path, "ab") as log:
        proc = CHILDREN.spawn(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                              stderr=log, env=child_env(), text=True)
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
        stop_process(proc, SYNC_STOP_TIMEOUT)
        if proc.stdout is not None:
            proc.stdout.close()
    return SyncRun(status, summary, True)


def _event(line: str) -> dict[str, Any]:
    try:
        value = json.loads(line)
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def pass_line(e: dict[str, Any]) -> str:
    return (f"{DEVICE}: pass {e['passes']}: {human_bytes(e['bytes_committed'])} in "
            f"{e['seconds']:.1f} s, sent {human_bytes(e['bytes_sent'])}, zeros "
            f"{human_bytes(e['bytes_zero'])}; {human_bytes(e['dirty_bytes'])} dirty")


# -- checking the copy -------------------------------------------------------------------


def sha256(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def fsck(image: str) -> tuple[bool, str]:
    """e2fsck -fn: (clean, its last line)."""
    e2fsck = tool("e2fsck")
    if e2fsck is None:
        return False, "e2fsck is not installed"
    done = CHILDREN.run([e2fsck, "-fn", image], timeout=300)
    lines = (done.stdout.strip() or done.stderr.strip()).splitlines()
    return done.returncode == 0, lines[-1] if lines else ""


# -- the demo ----------------------------------------------------------------------------


class Demo:
    """The steps, the processes they start, and stopping them whatever happens."""

    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.out = Out(sys.stderr if args.json else sys.stdout)
        self.workdir = ""
        self.daemons: list[Daemon] = []
        self.writer: Writer | None = None
        self.result: dict[str, Any] = {}
        self.started = time.monotonic()

    def path(self, *parts: str) -> str:
        return os.path.join(self.workdir, *parts)

    # -- running -----------------------------------------------------------------------

    def run(self) -> int:
        CHILDREN.install()
        status, failure = 1, ""
        try:
            p = profile(self.args.size, self.args.quick)
            self.workdir = tempfile.mkdtemp(prefix="bmig-demo-")
            self.out.line(f"bmig demo: a live migration on this machine, in {self.workdir}"
                          f"{' (kept)' if self.args.keep else ''}")
            self.result = {"workdir": self.workdir, "kept": self.args.keep}
            if self.steps(p):
                status = 0
            else:
                failure = self.failure(DemoError(
                    "the target differs from the source" if self.result.get("source_sha256")
                    != self.result.get("target_sha256") else "e2fsck found errors on the target"))
        except DemoError as exc:
            failure = self.failure(exc)
        except (KeyboardInterrupt, Stopped):
            self.out.line("\ndemo interrupted; stopping what it started")
            self.result["error"] = "interrupted"
            status = 130
        except Exception as exc:                        # a bug: say where
            import traceback
            traceback.print_exc()
            failure = self.failure(DemoError(f"unexpected error: {_reason(exc)}"))
        finally:
            self.cleanup()
        if failure:                                     # last, where it is seen
            sys.stderr.write(failure)
            sys.stderr.flush()
        if self.args.json:
            identical = status == 0 and bool(self.result.get("identical"))
            print(json.dumps({**self.result, "identical": identical}, sort_keys=True))
        return status

    def steps(self, p: Profile) -> bool:
        image = self.make_image(p)
        url, secret = self.start_daemons(image)
        uri = f"nbd+unix:///{DEVICE}?socket={self.path('run', 'src.nbd')}"
        self.start_writer(uri, image, p)
        live = self.live_sync(image, url, secret, p)
        last = self.last_pass(image, url, secret, p)
        identical = self.check_copy(image)
        self.summarize(image, [live, last], identical)
        return identical

    # -- steps ---------------------------------------------------------------------------

    def make_image(self, p: Profile) -> Image:
        self.out.step(1, f"The source device: an image of {human_bytes(p.size)}")
        os.makedirs(self.path("run"))
        os.makedirs(self.path("logs"))
        self._check_room(p)
        path = self.path("source.img")
        if tool("mkfs.ext4") and tool("debugfs"):
            image = build_ext4(path, self.path("files"), p, self.out)
            self.out.detail(f"{path}: ext4, {image.files} files, "
                            f"{human_bytes(image.file_bytes)} of data")
        else:
            self.out.detail("mkfs.ext4 or debugfs is missing (Debian package e2fsprogs): "
                            "using a file of mixed data instead of a file system")
            image = build_mixed(path, p.size)
            self.out.detail(f"{path}: random data, text, zeros and holes")
        self.result["image"] = {"path": path, "size": image.size, "kind": image.kind,
                                "files": image.files, "file_bytes": image.file_bytes}
        return image

    def _check_room(self, p: Profile) -> None:
        need = 3 * (p.file_budget + p.workload) + 64 * MiB
        free = shutil.disk_usage(self.workdir).free
        if free < need:
            raise DemoError(f"{self.workdir}: {human_bytes(free)} free, the demo needs about "
                            f"{human_bytes(need)} (give a smaller --size, or TMPDIR)")
        if len(self.path("run", "breqd.notify")) > 100:
            raise DemoError(f"{self.workdir} is too long a path for Unix sockets: set a "
                            "shorter TMPDIR")

    def start_daemons(self, image: Image) -> tuple[str, str]:
        self.out.step(2, "Daemons: breqd (dirty bitmap), bmig-nbd (the source, over NBD), "
                         "breceive (the target)")
        control = self.path("run", "breqd.sock")
        self.start("breqd", [*program("breqd"), "--state-dir", self.path("breqd", "state"),
                             "--config-dir", self.path("breqd", "devices.d"),
                             "--control", control])
        self.track(image, control)
        self.start("bmig-nbd", [*program("bmig-nbd"), "--device", DEVICE, "--backing",
                                image.path, "--unix", self.path("run", "src.nbd"),
                                "--control", control, "--manage-dir", self.path("run")])
        secret = self.make_secret()
        receiver = self.start("breceive", [
            *program("breceive"), "--listen", "127.0.0.1:0", "--target",
            f"{DEVICE}={self.path('target.img')}", "--state-dir",
            self.path("breceive", "state"), "--secret-file", secret])
        port = _port(receiver)
        self.out.detail(f"breceive listens on 127.0.0.1:{port}")
        return f"tcp://127.0.0.1:{port}/{DEVICE}", secret

    def start(self, name: str, argv: list[str]) -> Daemon:
        daemon = Daemon(name, argv, self.path("run"), self.path("logs", f"{name}.log"))
        self.daemons.append(daemon)
        return daemon.start(self.out)

    def track(self, image: Image, control: str) -> None:
        argv = [*program("bmigrate"), "track", "add", DEVICE, "--size-of", image.path,
                "--control", control]
        self.out.command(argv)
        done = CHILDREN.run(argv, timeout=60, env=child_env())
        if done.returncode != 0:
            raise DemoError(f"bmigrate track add failed with status {done.returncode}: "
                            f"{done.stderr.strip()}", self.daemons[0])
        self.out.detail(done.stdout.strip())

    def make_secret(self) -> str:
        path = self.path("secret")
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_urlsafe(32) + "\n")
        self.out.detail(f"shared secret: {path} (mode 0600)")
        return path

    def start_writer(self, uri: str, image: Image, p: Profile) -> None:
        self.out.step(3, "The application: a writer changing the device through bmig-nbd")
        where = (f"/{WORKLOAD_FILE} inside the file system" if image.kind == "ext4"
                 else "the whole device")
        self.out.detail(f"random 4 KiB-64 KiB writes to {where}, about "
                        f"{human_bytes(p.write_rate)}/s, on {uri}")
        self.writer = Writer(uri, image.extents, p.write_rate)
        self.writer.start()

    def sync_argv(self, image: Image, url: str, secret: str, *extra: str) -> list[str]:
        return [*program("bmigrate"), "sync", DEVICE, "--source", image.path, "--to", url,
                "--secret-file", secret, "--control", self.path("run", "breqd.sock"), *extra]

    def live_sync(self, image: Image, url: str, secret: str, p: Profile) -> SyncRun:
        self.out.step(4, "bmigrate sync while the writer keeps writing: passes until the "
                         "copy has converged")
        assert self.writer is not None
        argv = self.sync_argv(image, url, secret, "--bwlimit", p.bwlimit,
                              *(["--json"] if self.args.json else []))
        self.out.detail(f"--bwlimit {p.bwlimit}: as if over a {p.bwlimit}B/s link, so that "
                        "the passes can be watched")
        self.out.command(argv)
        before = (self.writer.writes, self.writer.bytes)
        log = self.path("logs", "bmigrate-sync-1.log")
        if self.args.json:
            run = sync_json(argv, log, self.out)
        else:
            run = sync_text(argv, log, self.out.stream)
        self.check_sync(run, "bmigrate sync", log, live=True)
        if not self.writer.is_alive():
            raise DemoError(f"the writer stopped during the sync: "
                            f"{_reason(self.writer.error) if self.writer.error else 'no error'}",
                            self.daemon("bmig-nbd"))
        writes, written = self.writer.writes - before[0], self.writer.bytes - before[1]
        left = run.summary["dirty_bytes"] if run.summary else None
        self.out.detail(f"converged while the writer went on: {writes} writes "
                        f"({human_bytes(written)}) during the sync"
                        + (f", {human_bytes(left)} left dirty" if left is not None else ""))
        return run

    def last_pass(self, image: Image, url: str, secret: str, p: Profile) -> SyncRun:
        self.out.step(5, "The application stops; the last pass (--threshold 0) ships what "
                         "is left")
        assert self.writer is not None
        self.writer.finish()
        self.out.detail(f"writer stopped and flushed after {self.writer.writes} writes "
                        f"({human_bytes(self.writer.bytes)})")
        argv = self.sync_argv(image, url, secret, "--bwlimit", p.bwlimit, "--threshold", "0",
                              "--json")
        self.out.command(argv)
        log = self.path("logs", "bmigrate-sync-2.log")
        run = sync_json(argv, log, self.out)
        self.check_sync(run, "the last bmigrate sync", log)
        if not run.summary or run.summary.get("dirty_bytes") != 0:
            raise DemoError("the last pass left chunks dirty", log=tail(log))
        self.out.detail(f"{DEVICE}: converged, nothing dirty: "
                        f"{run.summary['passes']} pass(es) in {run.summary['seconds']:.1f} s")
        return run

    def check_sync(self, run: SyncRun, what: str, log: str, live: bool = False) -> None:
        """Exit 0: identical; 15 (``live``): converged while the writer goes on."""
        if run.status == 10:
            raise DemoError(f"{what} did not converge (exit 10): the writer outpaced it",
                            log=tail(log))
        if run.status not in ((0, 15) if live else (0,)):
            raise DemoError(f"{what} failed with status {run.status}", log=tail(log))
        if run.summary is not None and not run.summary.get("converged"):
            raise DemoError(f"{what} ended without converging", log=tail(log))

    def check_copy(self, image: Image) -> bool:
        self.out.step(6, "Stop bmig-nbd (it flushes), then compare the target with the source")
        status = self.daemon("bmig-nbd").stop()
        if status != 0:
            raise DemoError(f"bmig-nbd stopped with status {status}", self.daemon("bmig-nbd"))
        self.out.detail("bmig-nbd stopped cleanly")
        target = self.path("target.img")
        if not os.path.exists(target):
            raise DemoError("breceive wrote no target file", self.daemon("breceive"))
        sums = {"source": sha256(image.path), "target": sha256(target)}
        sizes = {"source": image.size, "target": os.path.getsize(target)}
        for name, path in (("source", image.path), ("target", target)):
            self.out.detail(f"{name}  sha256 {sums[name]}  {human_bytes(sizes[name])}  {path}")
        identical = sums["source"] == sums["target"] and sizes["source"] == sizes["target"]
        self.out.detail("identical" if identical else "THE TARGET DIFFERS FROM THE SOURCE")
        self.result.update(source_sha256=sums["source"], target_sha256=sums["target"])
        if image.kind == "ext4":
            clean, line = fsck(target)
            self.out.detail(f"e2fsck -fn target.img: {'clean' if clean else 'NOT CLEAN'}: {line}")
            self.result["fsck"] = "clean" if clean else line
            identical = identical and clean
        return identical

    def summarize(self, image: Image, runs: list[SyncRun], identical: bool) -> None:
        self.out.step(7, "Summary")
        totals = _totals(runs)
        assert self.writer is not None
        self.result.update(totals, writer={"writes": self.writer.writes,
                                           "bytes": self.writer.bytes},
                           syncs=[r.summary for r in runs], identical=identical,
                           seconds=round(time.monotonic() - self.started, 1),
                           verdict="target identical to source" if identical
                           else "target differs from source")
        ratio = totals["compression_ratio"]
        per_run = " + ".join(str(r.summary["passes"]) for r in runs if r.summary)
        last = runs[-1].summary or {}
        rows = [("device", f"{human_bytes(image.size)} {image.kind} image"),
                ("passes", f"{totals['passes']} ({per_run})"),
                ("bytes read", human_bytes(totals["bytes_read"])),
                ("bytes sent", human_bytes(totals["bytes_sent"])),
                ("compression", f"{ratio:.2f}x" if ratio else "none"),
                ("zero bytes", f"{human_bytes(totals['bytes_zero'])} (sent as ranges)"),
                ("sync time", f"{totals['sync_seconds']:.1f} s, of which the last pass "
                              f"{last.get('seconds', 0):.1f} s with the writer stopped "
                              f"(demo: {self.result['seconds']:.0f} s)"),
                ("writer", f"{self.writer.writes} writes, {human_bytes(self.writer.bytes)}"),
                ("verdict", self.result["verdict"])]
        if not all(r.exact for r in runs):
            rows.insert(-1, ("note", "the first sync's byte counts are read from its text "
                                     "summary, rounded as printed"))
        for label, value in rows:
            self.out.detail(f"{label:<12} {value}")

    # -- failures and cleanup --------------------------------------------------------------

    def daemon(self, name: str) -> Daemon:
        return next(d for d in self.daemons if d.name == name)

    def failure(self, exc: DemoError) -> str:
        """One clear line, then the log that explains it (read now: cleanup removes it)."""
        failed = exc.daemon or next((d for d in self.daemons if d.proc is not None
                                     and d.proc.poll() not in (None, 0)), None)
        text = f"\nbmig demo failed: {exc}\n"
        if exc.log:
            text += exc.log.rstrip() + "\n"
        if failed is not None:
            where = failed.log_path if self.args.keep else "--keep keeps it"
            text += (f"--- the last lines of {failed.name}'s log ({where}) ---\n"
                     f"{tail(failed.log_path).rstrip()}\n")
        self.result.update(error=str(exc), identical=False)
        return text

    def cleanup(self) -> None:
        """Stop the writer and every daemon (SIGTERM, SIGKILL after a while); remove the
        directory unless --keep. Signals wait until it is done."""
        CHILDREN.ignore_signals()
        if not self.workdir:
            return
        self.out.step(STEPS, "Stopping everything the demo started")
        if self.writer is not None and self.writer.is_alive():
            self.writer.halt.set()
            self.writer.join(timeout=STOP_TIMEOUT)
        for daemon in reversed(self.daemons):
            if daemon.running():
                self.out.detail(f"{daemon.name}: stopped, status {daemon.stop()}")
        CHILDREN.stop_all()                             # anything else still running
        if self.workdir and not self.args.keep:
            shutil.rmtree(self.workdir, ignore_errors=True)
            self.out.detail(f"removed {self.workdir}")
        elif self.workdir:
            self.out.detail(f"kept {self.workdir} (images, state and logs)")


def _port(receiver: Daemon) -> int:
    for status in receiver.status:
        match = re.search(r"listening on 127\.0\.0\.1:(\d+)", status)
        if match:
            return int(match[1])
    raise DemoError(f"breceive did not say its port (STATUS: {receiver.status})", receiver)


def _totals(runs: list[SyncRun]) -> dict[str, Any]:
    summaries = [r.summary for r in runs if r.summary]
    total: dict[str, Any] = {key: sum(int(s.get(key, 0)) for s in summaries)
                             for key in ("passes", "bytes_read", "bytes_sent", "bytes_zero",
                                         "bytes_same")}
    total["sync_seconds"] = round(sum(float(s.get("seconds", 0)) for s in summaries), 3)
    data = total["bytes_read"] - total["bytes_same"]
    total["compression_ratio"] = round(data / total["bytes_sent"], 2) if total["bytes_sent"] \
        else None
    return total


def main(argv: list[str] | None = None) -> int:
    return Demo(parse_args(argv)).run()


if __name__ == "__main__":
    sys.exit(main())
