"""Fixtures shared by the integration tests (see also tests/conftest.py)."""

from __future__ import annotations

import os
import subprocess
from typing import Iterator

import pytest

from tests.daemon import Daemon


def _run(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run(argv, capture_output=True, text=True, timeout=60)


class Mounts:
    """File systems mounted by one test; unmounted at teardown (after its daemons stop)."""

    def __init__(self) -> None:
        self.paths: list[str] = []
        self.loops: list[str] = []
        self.frozen: set[str] = set()

    def tmpfs(self, path: str, size: str) -> str:
        os.makedirs(path, exist_ok=True)
        done = _run("mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", path)
        if done.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs: {done.stderr.strip()}")
        self.paths.append(path)
        return path

    def ext4_loop(self, path: str, image: str, size_mib: int) -> str:
        """A fresh ext4 file system on a loop device over ``image``, mounted at ``path``."""
        os.makedirs(path, exist_ok=True)
        with open(image, "wb") as f:
            f.truncate(size_mib << 20)
        made = _run("mkfs.ext4", "-q", "-F", image)
        if made.returncode != 0:
            pytest.skip(f"cannot make an ext4 file system: {made.stderr.strip()}")
        loop = _run("losetup", "--find", "--show", image)
        if loop.returncode != 0:
            pytest.skip(f"cannot set up a loop device: {loop.stderr.strip()}")
        device = loop.stdout.strip()
        self.loops.append(device)
        done = _run("mount", device, path)
        if done.returncode != 0:
            pytest.skip(f"cannot mount {device}: {done.stderr.strip()}")
        self.paths.append(path)
        return path

    def freeze(self, path: str) -> None:
        """fsfreeze: writes to ``path`` block (in the kernel) until thaw()."""
        done = _run("fsfreeze", "--freeze", path)
        if done.returncode != 0:
            pytest.skip(f"cannot freeze {path}: {done.stderr.strip()}")
        self.frozen.add(path)

    def thaw(self, path: str) -> None:
        if path in self.frozen:
            subprocess.run(["fsfreeze", "--unfreeze", path], check=True, capture_output=True,
                           timeout=60)
            self.frozen.discard(path)

    def thaw_all(self) -> None:
        for path in list(self.frozen):
            self.thaw(path)

    def remount(self, path: str, option: str) -> None:
        subprocess.run(["mount", "-o", f"remount,{option}", path], check=True,
                       capture_output=True, timeout=60)

    def unmount_all(self) -> None:
        self.thaw_all()
        for path in reversed(self.paths):
            if _run("umount", path).returncode != 0:  # still busy: detach, do not leak it
                _run("umount", "-l", path)
        self.paths.clear()
        for device in reversed(self.loops):
            _run("losetup", "--detach", device)
        self.loops.clear()


@pytest.fixture
def mounts() -> Iterator[Mounts]:
    m = Mounts()
    try:
        yield m
    finally:
        m.unmount_all()


class Daemons:
    """Every daemon a test starts, stopped at teardown (before its mounts go)."""

    def __init__(self) -> None:
        self.started: list[Daemon] = []

    def start(self, daemon: Daemon) -> Daemon:
        self.started.append(daemon)
        return daemon.start()

    def restart(self, daemon: Daemon) -> Daemon:
        """Stop ``daemon`` if it still runs (it may be dead after kill9), start its twin."""
        daemon.stop()
        return self.start(Daemon(daemon.argv, daemon.log_path, env=dict(daemon.env)))

    def stop_all(self) -> None:
        for daemon in reversed(self.started):
            daemon.stop()
        self.started.clear()


@pytest.fixture
def daemons(mounts: Mounts) -> Iterator[Daemons]:
    registry = Daemons()
    try:
        yield registry
    finally:
        mounts.thaw_all()   # a daemon blocked on a frozen file system cannot even die
        registry.stop_all()
