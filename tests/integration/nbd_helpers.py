"""Start bmig-nbd on a backing file next to a real breqd, for the NBD integration tests."""

from __future__ import annotations

import os
import random
import re
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from typing import Iterator

import pytest

from bmig.nbdclient import NbdClient, NbdError
from tests.daemon import Daemon, wait_until

TOOL_TIMEOUT = 60


def require(*tools: str) -> None:
    """Skip when a real client is truly absent (CI installs them via make test)."""
    missing = [t for t in tools if shutil.which(t) is None]
    if missing:
        pytest.skip(f"not installed: {', '.join(missing)}")


def tool(*argv: str, check: bool = True, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(argv, capture_output=True, text=True, timeout=TOOL_TIMEOUT,
                          check=check, **kw)


@dataclass
class NbdServer:
    daemon: Daemon
    socket: str
    backing: str
    device: str
    manage_dir: str = ""        # where its control socket DEVICE.sock is

    @property
    def uri(self) -> str:
        return f"nbd+unix:///{self.device}?socket={self.socket}"


def nbd_argv(*args: str) -> list[str]:
    return [sys.executable, "-c", "from bmig.cli.nbd import main; main()", *args]


def start_nbd(breqd, tmp_path, size: int = 64 << 20, *extra: str) -> NbdServer:
    """bmig-nbd serving a clean device "d1" of ``size`` bytes tracked by a real breqd."""
    backing = str(tmp_path / "backing.img")
    with open(backing, "wb") as f:
        f.truncate(size)
    client = breqd.client()
    client.add_device("d1", size)
    client.clear_all("d1", force=True)
    sock = str(tmp_path / "nbd.sock")
    manage = str(tmp_path / "manage")
    daemon = Daemon(nbd_argv("--device", "d1", "--backing", backing, "--unix", sock,
                             "--control", breqd.control, "--manage-dir", manage,
                             "--log-level", "debug", *extra),
                    str(tmp_path / "nbd.log")).start()
    return NbdServer(daemon, sock, backing, "d1", manage)


@pytest.fixture
def nbd_server(breqd, tmp_path) -> Iterator[NbdServer]:
    server = start_nbd(breqd, tmp_path)
    yield server
    assert server.daemon.stop() == 0
    assert not os.path.exists(server.socket)


_REQUEST_LINE = re.compile(r"bmig-nbd\.requests: DEBUG: .*: (NBD_CMD_\w+) (\d+)\+(\d+) ")
WRITE_LIKE = ("NBD_CMD_WRITE", "NBD_CMD_TRIM", "NBD_CMD_WRITE_ZEROES")


def logged_requests(log: str) -> list[tuple[str, int, int]]:
    """(command, offset, length) of every request bmig-nbd logged at debug level."""
    return [(m.group(1), int(m.group(2)), int(m.group(3)))
            for m in _REQUEST_LINE.finditer(log)]


def fuse_mounted(path: str) -> bool:
    """Whether a FUSE file system is mounted on ``path``, also one whose server ended
    (``os.path.ismount`` says no to those: their stat fails)."""
    path = os.path.realpath(path)
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            mountpoint = fields[4].encode().decode("unicode_escape")
            if mountpoint == path and "fuse" in fields[fields.index("-") + 1]:
                return True
    return False


class NbdFuse:
    """An export as a file through nbdfuse, on a loop device: a real kernel client."""

    def __init__(self, uri_socket: str, directory: str):
        self.mountpoint = os.path.join(directory, "fuse")
        os.makedirs(self.mountpoint, exist_ok=True)
        pidfile = os.path.join(directory, "nbdfuse.pid")
        self.proc = subprocess.Popen(["nbdfuse", "-P", pidfile, self.mountpoint,
                                      "--unix", uri_socket],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        self.loop: str | None = None
        wait_until(lambda: os.path.exists(pidfile) or self.proc.poll() is not None,
                   timeout=30, what="nbdfuse to be ready")
        if self.proc.poll() is not None:
            pytest.skip(f"nbdfuse failed: {self.proc.stderr.read().decode().strip()}")

    @property
    def file(self) -> str:
        return os.path.join(self.mountpoint, "nbd")

    def attach_loop(self) -> str:
        done = tool("losetup", "--find", "--show", "--direct-io=on", self.file, check=False)
        if done.returncode != 0:
            pytest.skip(f"cannot set up a loop device: {done.stderr.strip()}")
        self.loop = done.stdout.strip()
        return self.loop

    def close(self) -> None:
        if self.loop:
            tool("losetup", "--detach", self.loop, check=False)
            self.loop = None
        if self.proc.poll() is None:
            tool("fusermount3", "-u", self.mountpoint, check=False)
            try:
                self.proc.wait(timeout=TOOL_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=TOOL_TIMEOUT)
        if fuse_mounted(self.mountpoint):
            # nbdfuse ended first (its server went away): the kernel keeps the mount,
            # answering ENOTCONN, until it is taken down.
            tool("fusermount3", "-u", "-z", self.mountpoint, check=False)
        if self.proc.stderr:
            self.proc.stderr.close()


class Writer(threading.Thread):
    """Random writes through an NBD export, paced at ``per_second`` writes of ``block``
    bytes, into [low, high). A refused write (after the handover) ends it and is kept in
    ``refused``; any other failure in ``error``."""

    def __init__(self, uri: str, per_second: int, size: int, block: int = 4096,
                 seed: int = 3, low: int = 0, high: int | None = None):
        super().__init__(daemon=True)
        self.uri, self.per_second, self.block = uri, per_second, block
        self.low, self.high = low, size if high is None else high
        self.rng = random.Random(seed)
        self.stop = threading.Event()
        self.writes = 0
        self.refused: NbdError | None = None
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            with NbdClient.connect(self.uri, timeout=60) as client:
                started = time.monotonic()
                blocks = (self.high - self.low) // self.block
                while not self.stop.is_set():
                    offset = self.low + self.rng.randrange(blocks) * self.block
                    try:
                        client.pwrite(self.rng.randbytes(self.block), offset)
                    except NbdError as exc:
                        if not exc.from_server:
                            raise
                        self.refused = exc
                        return
                    self.writes += 1
                    ahead = self.writes / self.per_second - (time.monotonic() - started)
                    if ahead > 0:                 # pacing the workload, not synchronising
                        self.stop.wait(ahead)
                client.flush()
        except BaseException as exc:
            self.error = exc

    def finish(self) -> None:
        self.stop.set()
        self.join(timeout=60)
        assert not self.is_alive(), "the writer did not stop"
        assert self.error is None, repr(self.error)
        assert self.writes > 0, "the writer wrote nothing"
