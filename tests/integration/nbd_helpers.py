"""Start bmig-nbd on a backing file next to a real breqd, for the NBD integration tests."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from typing import Iterator

import pytest

from tests.daemon import Daemon

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
    daemon = Daemon(nbd_argv("--device", "d1", "--backing", backing, "--unix", sock,
                             "--control", breqd.control, "--log-level", "debug", *extra),
                    str(tmp_path / "nbd.log")).start()
    return NbdServer(daemon, sock, backing, "d1")


@pytest.fixture
def nbd_server(breqd, tmp_path) -> Iterator[NbdServer]:
    server = start_nbd(breqd, tmp_path)
    yield server
    assert server.daemon.stop() == 0
    assert not os.path.exists(server.socket)
