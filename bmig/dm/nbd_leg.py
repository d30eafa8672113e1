"""The NBD leg of a dm-tracked device: bmig-nbd on the era device, behind /dev/nbdX.

For a cutover with synchronous replication (protocol C) every write must pass through
bmig-nbd. bmig/dm/via_nbd.py switches the device's table from the era device onto
the kernel's NBD client, connected to a bmig-nbd whose backing is the era device::

    DEVICE            the user's device, still mounted; its table: linear onto /dev/nbdX
      |
    /dev/nbdX         the kernel's NBD client (nbd-client, netlink)
      |  Unix socket
    bmig-nbd          marks each write in breqd before writing it; replicates on request
      |
    bmig-NAME-era     dm-era still records every write: the chain of eras goes on
    bmig-NAME-origin

This module only runs the pieces: a free /dev/nbdX, bmig-nbd started in a session of its
own (it outlives bmigrate, since the device's I/O depends on it from the switch until the
way back), nbd-client, and bmig-nbd stopped by its pid and start time (never a process
that merely reuses the pid). The table switches and the record are DmIntercept's.
"""

from __future__ import annotations

import glob
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Callable

from bmig.dm import dmsetup
from bmig.errors import InterceptError
from bmig.procinfo import start_time

START_TIMEOUT = 30.0         # seconds for bmig-nbd's READY=1
STOP_TIMEOUT = 30.0          # seconds between SIGTERM and SIGKILL
EXIT_POLL = 0.05
NBD_MODULE_DEVICES = 16      # nbds_max when bmig loads the nbd module itself
# Variables of our own service manager that bmig-nbd must not take for its own.
MANAGER_VARIABLES = ("NOTIFY_SOCKET", "LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES",
                     "WATCHDOG_USEC", "WATCHDOG_PID")


@dataclass(frozen=True)
class Server:
    pid: int
    started: int                 # its start time in clock ticks after boot (/proc/PID/stat)
    socket: str                  # the NBD Unix socket nbd-client connects to
    manage_dir: str              # where its control socket NAME.sock is


def leg_dir(directory: str, name: str) -> str:
    """Where NAME's bmig-nbd keeps its sockets and its log (in the dm state directory)."""
    return os.path.join(directory, f"{name}.nbd")


def free_device() -> str:
    """The first /dev/nbdX that is not connected, loading the nbd module if need be."""
    if not glob.glob("/sys/block/nbd*"):
        try:
            dmsetup.run("modprobe", "nbd", f"nbds_max={NBD_MODULE_DEVICES}")
        except InterceptError as exc:
            raise InterceptError(f"the kernel's NBD client is missing ({exc.message}): a "
                                 "kernel built with CONFIG_BLK_DEV_NBD is needed") from None
    found = sorted(glob.glob("/sys/block/nbd*"), key=lambda p: int(p[len("/sys/block/nbd"):]))
    for path in found:
        if not connected(path) and _read(os.path.join(path, "size")) == "0":
            return f"/dev/{os.path.basename(path)}"
    raise InterceptError(f"every NBD device is in use ({len(found)}): free one, or load the "
                         "nbd module with a larger nbds_max")


def connected(device: str) -> bool:
    """/dev/nbdX (or its /sys/block path) has a server connected."""
    base = os.path.basename(device)
    return os.path.exists(f"/sys/block/{base}/pid")


def _read(path: str) -> str:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return ""


def start_server(name: str, backing: str, directory: str, control: str,
                 on_started: Callable[[int, int], None]) -> Server:
    """bmig-nbd serving NAME (tracked by breqd at ``control``) from ``backing``, ready.
    ``on_started(pid, start time)`` is called as soon as it runs, before it is ready, so
    that a caller killed meanwhile has it on record."""
    here = leg_dir(directory, name)
    os.makedirs(here, mode=0o700, exist_ok=True)
    sock, notify = os.path.join(here, "nbd.sock"), os.path.join(here, "notify")
    for stale in (sock, notify, os.path.join(here, f"{name}.sock")):
        if os.path.exists(stale):
            os.unlink(stale)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
    try:
        listener.bind(notify)
        env = {k: v for k, v in os.environ.items() if k not in MANAGER_VARIABLES}
        env.update(NOTIFY_SOCKET=notify, PYTHONUNBUFFERED="1")
        argv = [sys.executable, "-c", "from bmig.cli.nbd import main; main()",
                "--device", name, "--backing", backing, "--unix", sock, "--unix-mode", "0600",
                "--control", control, "--manage-dir", here, "--log-level", "info"]
        with open(os.path.join(here, "bmig-nbd.log"), "ab") as log:
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                    env=env, start_new_session=True, close_fds=True)
        started = start_time(proc.pid)
        try:
            on_started(proc.pid, started)
        except BaseException:
            stop_server(proc.pid, started)
            raise
        _wait_ready(listener, proc, here)
    finally:
        listener.close()
        if os.path.exists(notify):
            os.unlink(notify)
    return Server(proc.pid, started, sock, here)


def _wait_ready(listener: socket.socket, proc: subprocess.Popen, here: str) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            stop_server(proc.pid, start_time(proc.pid))
            raise InterceptError(f"bmig-nbd did not get ready within {START_TIMEOUT:g} s "
                                 f"(its log: {here}/bmig-nbd.log)")
        listener.settimeout(min(left, 0.5))
        try:
            message = listener.recv(4096).decode(errors="replace")
        except socket.timeout:
            message = ""
        if "READY=1" in message.splitlines():
            return
        if proc.poll() is not None:
            raise InterceptError(f"bmig-nbd exited with status {proc.returncode}: "
                                 f"{_last_line(os.path.join(here, 'bmig-nbd.log'))}")


def _last_line(path: str) -> str:
    lines = [line for line in _read(path).splitlines() if line.strip()]
    return lines[-1] if lines else "(no log)"


def stop_server(pid: int, started: int) -> None:
    """SIGTERM (bmig-nbd flushes and exits), SIGKILL after STOP_TIMEOUT. Nothing if the
    process is gone or the pid now belongs to another process."""
    if not pid or not started or start_time(pid) != started:
        return
    os.kill(pid, signal.SIGTERM)
    if _wait_gone(pid, started, STOP_TIMEOUT):
        return
    os.kill(pid, signal.SIGKILL)
    if not _wait_gone(pid, started, STOP_TIMEOUT):
        raise InterceptError(f"bmig-nbd (pid {pid}) did not exit")


def _wait_gone(pid: int, started: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            done, _ = os.waitpid(pid, os.WNOHANG)      # our own child: reap it
            if done == pid:
                return True
        except ChildProcessError:
            pass                                       # another's: look at /proc
        if start_time(pid) != started:
            return True
        time.sleep(EXIT_POLL)
    return False


def server_alive(pid: int, started: int) -> bool:
    return bool(pid) and bool(started) and start_time(pid) == started


def connect(device: str, server: Server, export: str, block_size: int) -> None:
    """/dev/nbdX connected to the server's ``export`` (nbd-client over netlink)."""
    dmsetup.run("nbd-client", "-unix", server.socket, device, "-N", export,
                "-b", str(block_size))
    if not connected(device):
        raise InterceptError(f"nbd-client did not connect {device}")


def disconnect(device: str) -> None:
    dmsetup.run("nbd-client", "-d", device)


def logical_block_size(dm_devno: str) -> int:
    """The device's logical block size: the NBD device gets the same, so the table onto
    it does not change what the file system above sees."""
    value = _read(f"/sys/dev/block/{dm_devno}/queue/logical_block_size")
    return int(value) if value.isdigit() else 512
