"""What the benchmark scripts share: provenance of a run (tool versions, the commit and a
digest of the bmig sources as run, the load), process groups, files and file systems.

Imported by the scripts in this directory, which run as ``python bench/NAME.py``, so this
directory is first on ``sys.path``."""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import subprocess

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class Interrupted(Exception):
    """Raised by a script's signal handler: Ctrl-C, SIGTERM or SIGHUP, to clean up."""


def tool_version(argv: list[str]) -> str:
    """The first line ``argv`` prints (a tool's --version), or "?"."""
    try:
        r = subprocess.run(argv, capture_output=True, text=True, timeout=10)
        return (r.stdout or r.stderr).strip().splitlines()[0]
    except (OSError, IndexError, subprocess.TimeoutExpired):
        return "?"


def git_head() -> str:
    head = tool_version(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"])
    dirty = subprocess.run(["git", "-C", ROOT, "status", "--porcelain", "--", "bmig"],
                           capture_output=True, text=True).stdout.strip()
    return head + (" (bmig/ modified)" if dirty else "")


def source_digest() -> str:
    """Digest of bmig/**/*.py as run: ties results to a working tree that has no commit."""
    h = hashlib.sha256()
    for dirpath, dirnames, files in sorted(os.walk(os.path.join(ROOT, "bmig"))):
        dirnames.sort()
        for name in sorted(f for f in files if f.endswith(".py")):
            path = os.path.join(dirpath, name)
            h.update(os.path.relpath(path, ROOT).encode() + b"\0")
            with open(path, "rb") as f:
                h.update(f.read())
    return h.hexdigest()[:12]


def loadavg() -> str:
    try:
        with open("/proc/loadavg") as f:
            return " ".join(f.read().split()[:3])
    except OSError:
        return "?"


def signal_group(pgid: int, sig: int) -> None:
    """Signal a process group that may be gone already."""
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def remove(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


def fs_type(path: str) -> str:
    """File system type of the mount holding ``path`` (from /proc/self/mountinfo)."""
    path = os.path.realpath(path)
    best, kind = "", "?"
    with contextlib.suppress(OSError), open("/proc/self/mountinfo") as f:
        for line in f:
            parts = line.split()
            mount_point = parts[4].replace("\\040", " ")
            fstype = parts[parts.index("-") + 1]
            if (path == mount_point or path.startswith(mount_point.rstrip("/") + "/")) \
                    and len(mount_point) >= len(best):
                best, kind = mount_point, fstype
    return kind
