"""What the benchmark scripts share: provenance of a run (tool versions, the commit and a
digest of the bmig sources as run, the load), the processes they start and the files they
make (all stopped and removed at the end, also on a signal), file systems.

Imported by the scripts in this directory, which run as ``python bench/NAME.py``, so this
directory is first on ``sys.path``."""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
START_TIMEOUT = 60.0         # seconds a daemon gets to say READY=1
STOP_TIMEOUT = 15.0          # seconds a process gets after SIGTERM, then SIGKILL
CLK_TCK = os.sysconf("SC_CLK_TCK")

BREQD = [sys.executable, "-c", "from bmig.cli.breqd import main; main()"]
BMIGRATE = [sys.executable, "-c", "from bmig.cli.main import main; main()"]

RUNNING: list["Proc"] = []   # started and not stopped yet, oldest first
PATHS: list[str] = []        # files and directories to remove at the end

_starting = False            # a Popen is under way: a signal waits until it is listed
_pending: int | None = None


class Interrupted(Exception):
    """SIGTERM or SIGHUP (SIGINT raises KeyboardInterrupt): stop, clean up."""


def on_signal(signum, frame) -> None:
    global _pending
    if _starting:
        _pending = signum
        return
    _raise_for(signum)


def _raise_for(signum: int) -> None:
    if signum == signal.SIGINT:
        raise KeyboardInterrupt
    raise Interrupted(f"signal {signum}")


def install_signal_handlers() -> None:
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, on_signal)


@dataclass
class Proc:
    """A process started by a script, in its own session (pgid == pid)."""

    label: str
    argv: list[str]
    log_path: str
    proc: subprocess.Popen | None = None

    def start(self, env: dict[str, str] | None = None) -> "Proc":
        """stdout and stderr to the log."""
        with open(self.log_path, "ab") as log:
            return self._popen(stdout=log, stderr=log, stdin=subprocess.DEVNULL, env=env)

    def _popen(self, **kwargs) -> "Proc":
        """Start it and put it on RUNNING; a signal that comes meanwhile is acted on once
        it is there, so that cleanup() stops it too."""
        global _starting, _pending
        _starting = True
        try:
            self.proc = subprocess.Popen(self.argv, start_new_session=True, **kwargs)
            RUNNING.append(self)
        finally:
            _starting = False
        pending, _pending = _pending, None
        if pending is not None:
            _raise_for(pending)
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def cpu_seconds(self) -> float:
        """utime + stime of the whole process (all its threads) so far."""
        with open(f"/proc/{self.pid}/stat") as f:
            fields = f.read().rpartition(")")[2].split()
        return (int(fields[11]) + int(fields[12])) / CLK_TCK

    def before_stop(self) -> None:
        """What must go before the process itself (a subclass's)."""

    def stop(self) -> int | None:
        """SIGTERM to its process group, SIGKILL if it will not go; then SIGKILL to
        whatever it left in its group."""
        if self.proc is None:
            return None
        if self not in RUNNING:                # stopped already
            return self.proc.returncode
        if self.proc.poll() is None:
            self.before_stop()
            signal_group(self.pid, signal.SIGTERM)
            try:
                self.proc.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                signal_group(self.pid, signal.SIGKILL)
                self.proc.wait(STOP_TIMEOUT)
        signal_group(self.pid, signal.SIGKILL)
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        RUNNING.remove(self)
        return self.proc.returncode

    def log_tail(self, n: int = 20) -> str:
        try:
            with open(self.log_path, errors="replace") as f:
                return "".join(f.readlines()[-n:])
        except OSError:
            return ""


def child_env(**extra: str) -> dict[str, str]:
    """Our environment without our own service manager's variables, bmig importable."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("NOTIFY_SOCKET", "LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES",
                        "WATCHDOG_USEC", "WATCHDOG_PID", "BMIG_CONTROL", "BMIG_NBD_DIR")}
    env.update(PYTHONUNBUFFERED="1", **extra)
    env["PYTHONPATH"] = os.pathsep.join([ROOT, *filter(None, [os.environ.get("PYTHONPATH")])])
    return env


def start_notified(p: Proc, tmp: str, env: dict[str, str],
                   want: str | None = None) -> list[str]:
    """Start a bmig daemon with ``env`` and wait for READY=1 (and a notification matching
    ``want``) on a private NOTIFY_SOCKET in ``tmp``; returns the notifications."""
    notify_path = os.path.join(tmp, "notify-" + re.sub(r"[^\w.-]", "_", p.label))
    with contextlib.suppress(FileNotFoundError):
        os.unlink(notify_path)
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(notify_path)
    notes: list[str] = []
    try:
        p.start(dict(env, NOTIFY_SOCKET=notify_path))
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            text = "\n".join(notes)
            if "READY=1" in text.split("\n") and (want is None or re.search(want, text)):
                return notes
            if not p.alive():
                code = p.proc.returncode if p.proc is not None else None
                raise RuntimeError(f"{p.label} exited with {code}:\n{p.log_tail()}")
            left = deadline - time.monotonic()
            if left <= 0:
                raise RuntimeError(f"{p.label}: not ready in {START_TIMEOUT:.0f} s:\n"
                                   f"{p.log_tail()}")
            notify.settimeout(min(left, 0.2))
            with contextlib.suppress(socket.timeout):
                notes.append(notify.recv(4096).decode(errors="replace"))
    finally:
        notify.close()
        os.unlink(notify_path)


def start_breqd(directory: str, control: str) -> Proc:
    """A breqd with its state, config directory and log in ``directory``, ready."""
    p = Proc("breqd", [*BREQD, "--state-dir", os.path.join(directory, "breqd-state"),
                       "--config-dir", os.path.join(directory, "devices.d"),
                       "--control", control], os.path.join(directory, "breqd.log"))
    start_notified(p, directory, child_env())
    return p


def run_bmigrate(env: dict[str, str], *args: str, timeout: float = 120.0) -> str:
    """A short bmigrate command (track, replicate, set-dirty); its stdout."""
    done = subprocess.run([*BMIGRATE, *args], env=env, capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL, start_new_session=True)
    if done.returncode != 0:
        raise RuntimeError(f"bmigrate {' '.join(args)} failed ({done.returncode}): "
                           f"{done.stderr.strip()}")
    return done.stdout


def table(headers: list[str], rows: list[list], fmt: Callable[[Any], str] = str,
          left: int = 1) -> str:
    """Columns padded to their widest cell, the first ``left`` of them left-justified,
    a rule under the headers; ``fmt`` renders each cell."""
    cells = [[str(h) for h in headers]] + [[fmt(v) for v in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = []
    for n, r in enumerate(cells):
        lines.append("  ".join(v.ljust(w) if i < left else v.rjust(w)
                               for i, (v, w) in enumerate(zip(r, widths))))
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def cleanup() -> None:
    """Stop every process still running, newest first, and remove PATHS, newest first."""
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):   # a second Ctrl-C must not
        signal.signal(sig, signal.SIG_IGN)                      # leave things behind
    for p in reversed(list(RUNNING)):
        try:
            p.stop()
        except Exception as exc:              # keep going: the rest must still be stopped
            print(f"cleanup: {p.label}: {exc}", file=sys.stderr)
    for path in reversed(PATHS):
        remove(path)
    PATHS.clear()


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
