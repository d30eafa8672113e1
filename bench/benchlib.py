"""What the benchmark scripts share: the provenance of a run (tool versions, the commit
and a digest of the bmig sources as run, the load), the processes they start and the files
they make (all stopped and removed at the end, also on a signal), file systems, tables.

The processes are bmig/processes.py's, as for the demo and the tests: each script's
children run in sessions of their own, listed before a signal can stop the script, their
notify sockets read until they stop. Imported by the scripts in this directory, which run
as ``python bench/NAME.py``, so this directory is first on ``sys.path``. It measures
nothing itself and touches nothing outside the paths a script gives it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from typing import Any, Callable

from bmig import __version__ as BMIG_VERSION
from bmig import processes
from bmig.processes import CHILDREN, Child, Group, NotReady

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
START_TIMEOUT = 60.0         # seconds a daemon gets to say READY=1
STOP_TIMEOUT = 15.0          # seconds a process gets after SIGTERM, then SIGKILL
CLK_TCK = os.sysconf("SC_CLK_TCK")

BREQD = [sys.executable, "-c", "from bmig.cli.breqd import main; main()"]
BMIGRATE = [sys.executable, "-c", "from bmig.cli.bmigrate import main; main()"]   # as installed
BRECEIVE = [sys.executable, "-c", "from bmig.cli.breceive import main; main()"]

PATHS: list[str] = []        # files and directories to remove at the end


def install_signal_handlers() -> None:
    """SIGINT, SIGTERM and SIGHUP stop the script (KeyboardInterrupt, Stopped), never
    between a child's start and its listing, so cleanup() stops it too."""
    CHILDREN.install_signal_handlers()


class Proc(Child):
    """A process started by a script, in a session of its own (Ctrl-C reaches only the
    script, and ssh finds no terminal to prompt on); stdout and stderr to its log."""

    def __init__(self, label: str, argv: list[str], log_path: str):
        super().__init__(argv, name=label, log_path=log_path, group=Group.SESSION)

    @property
    def label(self) -> str:
        return self.name

    def alive(self) -> bool:
        return self.running()

    def cpu_seconds(self) -> float:
        """utime + stime of the whole process (all its threads) so far."""
        with open(f"/proc/{self.pid}/stat") as f:
            fields = f.read().rpartition(")")[2].split()
        return (int(fields[11]) + int(fields[12])) / CLK_TCK

    def memory(self) -> dict[str, int]:
        """VmRSS and VmHWM in bytes."""
        out = {}
        with open(f"/proc/{self.pid}/status") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key in ("VmRSS", "VmHWM"):
                    out[key] = int(value.split()[0]) * 1024
        return out

    def before_stop(self) -> None:
        """What must go before the process itself (a subclass's)."""

    def stop(self, timeout: float = STOP_TIMEOUT) -> int | None:
        """SIGTERM to its process group, SIGKILL if it will not go; then SIGKILL to
        whatever it left in its group."""
        if self.running():
            self.before_stop()
        return super().stop(timeout)


def child_env(**extra: str) -> dict[str, str]:
    """Our environment without our own service manager's variables, bmig importable."""
    return processes.child_env(extra, import_path=ROOT)


def start_notified(p: Proc, tmp: str, env: dict[str, str],
                   want: str | None = None) -> list[str]:
    """Start a bmig daemon with ``env`` and wait for READY=1 (and a notification matching
    ``want``) on a private NOTIFY_SOCKET in ``tmp``; returns the notifications."""
    def ready(notes: list[str]) -> bool:
        text = "\n".join(notes)
        return "READY=1" in text.split("\n") and (want is None or bool(re.search(want, text)))

    p.start(env, notify=True, notify_dir=tmp)
    try:
        p.wait_notified(ready, "READY=1", START_TIMEOUT)
    except NotReady as exc:
        if exc.returncode is None:
            raise RuntimeError(f"{p.label}: not ready in {START_TIMEOUT:.0f} s:\n"
                               f"{p.log_tail()}") from None
        raise RuntimeError(f"{p.label} exited with {exc.returncode}:\n{p.log_tail()}") \
            from None
    return list(p.notifications)


def start_breqd(directory: str, control: str) -> Proc:
    """A breqd with its state, config directory and log in ``directory``, ready."""
    p = Proc("breqd", [*BREQD, "--state-dir", os.path.join(directory, "breqd-state"),
                       "--config-dir", os.path.join(directory, "devices.d"),
                       "--control", control], os.path.join(directory, "breqd.log"))
    start_notified(p, directory, child_env())
    return p


def run_bmigrate(env: dict[str, str], *args: str, timeout: float = 120.0) -> str:
    """A short bmigrate command (track, replicate, set-dirty); its stdout."""
    done = processes.run([*BMIGRATE, *args], timeout=timeout, env=env, group=Group.SESSION,
                         name=f"bmigrate {args[0] if args else ''}", stop_timeout=STOP_TIMEOUT)
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
    CHILDREN.ignore_signals()               # a second Ctrl-C must not leave things behind
    for p in reversed(list(CHILDREN.running)):
        try:
            p.stop(STOP_TIMEOUT)
        except Exception as exc:            # keep going: the rest must still be stopped
            print(f"cleanup: {p.name}: {exc}", file=sys.stderr)
    for path in reversed(PATHS):
        remove(path)
    PATHS.clear()


# -- provenance: what a run's figures depend on besides the code ----------------------

def provenance(**tools: list[str]) -> dict[str, Any]:
    """The facts of a run, taken at its start, for the top of its JSON: the date, the CPUs,
    Python, bmig's version, the commit and a digest of bmig/ as run, the version of each
    tool (``name=argv`` that prints it: ``fio=["fio", "--version"]``), the load average."""
    facts: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %z"), "cpus": os.cpu_count(),
        "python": sys.version.split()[0], "bmig": BMIG_VERSION, "git": git_head(),
        "bmig_source_sha256": source_digest()}
    facts.update({name: tool_version(argv) for name, argv in tools.items()})
    facts["loadavg_before"] = loadavg()
    return facts


def provenance_line(facts: dict[str, Any]) -> str:
    """``provenance()`` as the second line of a report."""
    tools = [str(v) for k, v in facts.items() if k not in _FACTS]
    return "; ".join([f"{facts['date']}: bmig {facts['bmig']} at {facts['git']}, sources "
                      f"{facts['bmig_source_sha256']}", f"Python {facts['python']}",
                      f"{facts['cpus']} CPUs, load {facts['loadavg_before']}", *tools])


_FACTS = ("date", "cpus", "python", "bmig", "git", "bmig_source_sha256", "loadavg_before")


def provenance_end(out: dict[str, Any]) -> str | None:
    """At the end of a run: the load average and the digest of bmig/ again, into ``out``;
    the warning to print when bmig/ changed meanwhile, else None."""
    out["loadavg_after"] = loadavg()
    out["bmig_source_sha256_after"] = source_digest()
    if out["bmig_source_sha256_after"] == out.get("bmig_source_sha256"):
        return None
    return (f"warning: bmig/ changed during the run (source {out.get('bmig_source_sha256')} "
            f"at the start, {out['bmig_source_sha256_after']} at the end): each process ran "
            "the tree as it was when it started")


def tool_version(argv: list[str]) -> str:
    """The first line with a digit that ``argv`` prints (a tool's --version), or "?"."""
    try:
        r = subprocess.run(argv, capture_output=True, text=True, timeout=10,
                           stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired):
        return "?"
    lines = (r.stdout + "\n" + r.stderr).strip().splitlines()
    return next((line.strip() for line in lines if re.search(r"\d", line)), "?")


def git_head() -> str:
    """The commit, short, and whether bmig/ differs from it; "?" outside a git tree."""
    def git(*args: str) -> str:
        try:
            return subprocess.run(["git", "-C", ROOT, *args], capture_output=True, text=True,
                                  timeout=10, stdin=subprocess.DEVNULL).stdout.strip()
        except (OSError, subprocess.TimeoutExpired):
            return ""
    head = git("rev-parse", "--short", "HEAD") or "?"
    return head + (" (bmig/ modified)" if git("status", "--porcelain", "--", "bmig") else "")


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


# -- files -------------------------------------------------------------------------------

def save_json(path: str, out: dict[str, Any]) -> None:
    """A run's results, indented, where ``path`` says (its directory made if need be)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(out, f, indent=2)
        f.write("\n")


def evict(*paths: str) -> None:
    """Drop these files' pages from the page cache (made clean first: fdatasync)."""
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fdatasync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def fio_nbd_problem() -> str | None:
    """Why fio cannot drive an NBD server here (not installed, no nbd engine), or None."""
    if shutil.which("fio") is None:
        return "fio is not installed (Debian: apt-get install fio)"
    r = subprocess.run(["fio", "--enghelp=nbd"], capture_output=True, text=True,
                       stdin=subprocess.DEVNULL)
    if r.returncode != 0 or "uri" not in r.stdout:
        return ("this fio has no nbd ioengine (fio --enghelp=nbd fails); use a fio built "
                "with libnbd")
    return None


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
