"""What the dm intercept's kernel tests share: a dm device over a loop device, commands."""

from __future__ import annotations

import json
import os
import subprocess
import sys

MiB = 1 << 20
CHUNK = 64 << 10


def run(*argv: str, check: bool = True, timeout: float = 120,
        env: dict | None = None) -> subprocess.CompletedProcess:
    done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL, env=env)
    if check and done.returncode != 0:
        raise AssertionError(f"{' '.join(argv)} failed ({done.returncode}): "
                             f"{done.stdout}{done.stderr}")
    return done


def bmigrate(breqd, dm_state: str, *args: str, check: bool = True,
             timeout: float = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ, BMIG_CONTROL=breqd.control, BMIG_DM_STATE=dm_state)
    return run(sys.executable, "-c", "from bmig.cli.main import main; main()", *args,
               check=check, timeout=timeout, env=env)


def bmig_dm_argv(breqd, dm_state: str, *args: str) -> list[str]:
    return [sys.executable, "-c", "from bmig.cli.dm import main; main()", "--control",
            breqd.control, "--dm-state", dm_state, *args]


def table(name: str) -> list[str]:
    return [line for line in run("dmsetup", "table", name).stdout.splitlines() if line]


def exists(name: str) -> bool:
    return run("dmsetup", "info", name, check=False).returncode == 0


class Volume:
    """/dev/mapper/NAME: a linear table over a loop device over a file, as an LVM volume
    on one physical volume looks."""

    def __init__(self, name: str, image: str, size: int, fresh: bool = True):
        """``fresh``: a new, zeroed image; else the one there (after a reboot)."""
        self.name, self.image, self.size = name, image, size
        if fresh:
            with open(image, "wb") as f:
                f.truncate(size)
        self.loop = run("losetup", "--find", "--show", image).stdout.strip()
        self.sectors = size // 512
        run("dmsetup", "create", name, "--table", f"0 {self.sectors} linear {self.loop} 0")
        self.path = f"/dev/mapper/{name}"
        self.original = table(name)

    def close(self) -> None:
        """Whatever a failed test left: the device, bmig's layers, the loop devices."""
        listed = run("dmsetup", "ls", check=False).stdout.split()
        layers = [n for n in listed if n.startswith("bmig-") and n.endswith("-era")]
        layers += [n for n in listed if n.startswith("bmig-") and n.endswith("-origin")]
        for name in [self.name] + layers:
            if exists(name):
                run("dmsetup", "resume", name, check=False)
                run("dmsetup", "remove", name, check=False)
        run("losetup", "-d", self.loop, check=False)


def write_at(path: str, offset: int, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_DIRECT)
    try:
        import mmap
        buf = mmap.mmap(-1, len(data))
        buf.write(data)
        os.pwrite(fd, buf, offset)
        buf.close()
    finally:
        os.close(fd)


def dirty_chunks(breqd, name: str, size: int, chunk: int = CHUNK) -> set[int]:
    client = breqd.client()
    try:
        runs, _ = client.query(name, 0, size)
    finally:
        client.close()
    out: set[int] = set()
    for offset, length in runs:
        out.update(range(offset // chunk, (offset + length - 1) // chunk + 1))
    return out


def record(dm_state: str, name: str) -> dict:
    with open(os.path.join(dm_state, f"{name}.json")) as f:
        return json.load(f)


def detach_metadata_loops(dm_state: str) -> None:
    """The loop devices bmig made for its metadata files (a failed test leaves them)."""
    if not os.path.isdir(dm_state):
        return
    for entry in os.listdir(dm_state):
        if entry.endswith(".era-metadata"):
            out = run("losetup", "-j", os.path.join(dm_state, entry), check=False).stdout
            for line in out.splitlines():
                run("losetup", "-d", line.split(":", 1)[0], check=False)


def same_content(a: str, b: str, size: int) -> bool:
    import hashlib

    def digest(path: str) -> str:
        h = hashlib.sha256()
        fd = os.open(path, os.O_RDONLY)
        try:
            left = size
            while left:
                block = os.read(fd, min(MiB, left))
                if not block:
                    break
                h.update(block)
                left -= len(block)
        finally:
            os.close(fd)
        return h.hexdigest()

    return digest(a) == digest(b)
