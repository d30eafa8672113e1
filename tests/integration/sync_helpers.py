"""A real breceive on 127.0.0.1 and the images and commands the sync tests use."""

from __future__ import annotations

import hashlib
import os
import random
import re
import subprocess
import sys
from dataclasses import dataclass, field
from typing import Iterator

import pytest

from tests.daemon import Daemon

SYNC_TIMEOUT = 300
MiB = 1 << 20
CHUNK = 64 << 10


def breceive_argv(*args: str) -> list[str]:
    return [sys.executable, "-c", "from bmig.cli.breceive import main; main()", *args]


def bmigrate_argv(*args: str) -> list[str]:
    return [sys.executable, "-c", "from bmig.cli.main import main; main()", *args]


@dataclass
class ReceiverInstance:
    daemon: Daemon
    port: int
    state_dir: str
    secret_file: str
    targets: dict[str, str] = field(default_factory=dict)

    def url(self, export: str, scheme: str = "tcp", port: int | None = None) -> str:
        return f"{scheme}://127.0.0.1:{port or self.port}/{export}"

    def record(self, export: str) -> dict:
        import json
        with open(os.path.join(self.state_dir, export + ".target")) as f:
            return json.load(f)


def write_secret(path: str, text: str = "a shared secret of thirty-two bytes!") -> str:
    with open(path, "w") as f:
        f.write(text)
    os.chmod(path, 0o600)
    return path


def start_receiver(tmp_path, targets: dict[str, str], *extra: str,
                   name: str = "breceive") -> ReceiverInstance:
    """breceive on an ephemeral 127.0.0.1 port; the port comes from its READY status."""
    state = str(tmp_path / f"{name}-state")
    secret = str(tmp_path / "secret")
    if not os.path.exists(secret):
        write_secret(secret)
    argv = ["--listen", "127.0.0.1:0", "--state-dir", state, "--secret-file", secret,
            "--log-level", "debug"]
    for export, path in targets.items():
        argv += ["--target", f"{export}={path}"]
    daemon = Daemon(breceive_argv(*argv, *extra), str(tmp_path / f"{name}.log")).start()
    port = None
    for note in daemon.notifications:
        match = re.search(r"STATUS=listening on 127\.0\.0\.1:(\d+)", note)
        if match:
            port = int(match.group(1))
    assert port, daemon.notifications
    return ReceiverInstance(daemon, port, state, secret, dict(targets))


@pytest.fixture
def receivers(tmp_path) -> Iterator[list[ReceiverInstance]]:
    """Receivers a test starts with ``start_receiver``; stopped at teardown."""
    started: list[ReceiverInstance] = []
    yield started
    for r in started:
        r.daemon.stop()


def make_image(path: str, size: int, kind: str, seed: int = 1) -> str:
    """zeros (sparse), random, text (compressible), or mixed (all three and holes)."""
    rng = random.Random(seed)
    with open(path, "wb") as f:
        if kind == "zeros":
            f.truncate(size)
        elif kind == "random":
            f.write(rng.randbytes(size))
        elif kind == "text":
            words = [rng.choice(["block", "device", "migrate", "chunk", "dirty", "target",
                                 "lineage", "\n"]) for _ in range(4096)]
            line = " ".join(words).encode()
            while f.tell() < size:
                f.write(line[:size - f.tell()])
        elif kind == "mixed":
            f.truncate(size)
            pos = 0
            while pos < size:
                n = min(rng.choice([4096, CHUNK, 3 * CHUNK + 100, MiB]), size - pos)
                what = rng.choice(["hole", "random", "text", "zero"])
                f.seek(pos)
                if what == "random":
                    f.write(rng.randbytes(n))
                elif what == "text":
                    f.write((b"mixed content %d " % pos * (n // 16 + 1))[:n])
                elif what == "zero":
                    f.write(bytes(n))
                pos += n
        else:
            raise ValueError(kind)
    return path


def digest(path: str, size: int | None = None) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        left = size if size is not None else os.fstat(f.fileno()).st_size
        while left:
            block = f.read(min(8 * MiB, left))
            if not block:
                break
            h.update(block)
            left -= len(block)
    return h.hexdigest()


def same_bytes(a: str, b: str) -> bool:
    size = os.path.getsize(a)
    return os.path.getsize(b) >= size and digest(a) == digest(b, size)


def sync(breqd, *args: str, timeout: float = SYNC_TIMEOUT, check: bool = True,
         **kw) -> subprocess.CompletedProcess:
    """bmigrate sync ... against the test's breqd."""
    env = dict(os.environ, BMIG_CONTROL=breqd.control)
    done = subprocess.run(bmigrate_argv("sync", *args), env=env, capture_output=True,
                          text=True, timeout=timeout, stdin=subprocess.DEVNULL, **kw)
    if check and done.returncode != 0:
        raise AssertionError(f"bmigrate sync failed ({done.returncode}):\n{done.stderr}")
    return done


def track(breqd, name: str, path: str, chunk_size: int = CHUNK) -> None:
    client = breqd.client()
    client.add_device(name, os.path.getsize(path), chunk_size=chunk_size)
    client.close()
