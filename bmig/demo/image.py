"""The image maker: the source device of the demo, and the checks of its copy.

An ext4 image built with ``mkfs.ext4 -d`` from real files of this system and the writer's
"database" file (nothing is mounted), with ``debugfs`` telling where that file's blocks
are; without e2fsprogs, a file of mixed data. Then sha256 and ``e2fsck -fn`` say whether
the target is the source. It writes only inside the directory it is given and runs only
e2fsprogs' tools (through bmig/processes.py).
"""

from __future__ import annotations

import glob
import hashlib
import os
import random
import shutil
import stat
import subprocess
from dataclasses import dataclass
from typing import Iterator

from bmig.cli.common import human_bytes
from bmig.constants import KiB, MiB
from bmig.demo.output import Out
from bmig.demo.settings import BLOCK, STOP_TIMEOUT, DemoError, Profile
from bmig.processes import run as run_child

# Real files for the image, in this order, until the budget is spent.
# (Not /usr/share/man: mkfs.ext4 -d takes seconds per thousand small files.)
FILE_SOURCES = ("/usr/share/common-licenses", "/usr/share/doc", "/usr/lib/python3*",
                "/usr/share/locale", "/usr/lib/*-linux-gnu")
WORKLOAD_FILE = "srv/db/orders.db"  # what the writer changes inside the file system
SBIN = ("/usr/sbin", "/sbin")       # e2fsprogs lives here, often not in a user's PATH


@dataclass
class Image:
    """The source: an ext4 image of real files, or a file of mixed data without mkfs."""

    path: str
    size: int
    kind: str                                   # "ext4" or "mixed"
    extents: list[tuple[int, int]]              # byte ranges the writer may change
    files: int = 0
    file_bytes: int = 0


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
    done = run_child(argv, timeout=300, stop_timeout=STOP_TIMEOUT)
    if done.returncode != 0:
        raise DemoError(f"{what} failed with status {done.returncode}",
                        log=(done.stderr or done.stdout).strip())
    return done


def sha256(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def fsck(image: str) -> tuple[bool, str]:
    """e2fsck -fn: (clean, its last line)."""
    e2fsck = tool("e2fsck")
    if e2fsck is None:
        return False, "e2fsck is not installed"
    done = run_child([e2fsck, "-fn", image], timeout=300, stop_timeout=STOP_TIMEOUT)
    lines = (done.stdout.strip() or done.stderr.strip()).splitlines()
    return done.returncode == 0, lines[-1] if lines else ""
