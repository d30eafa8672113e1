"""sd_notify without libsystemd: READY=1, STATUS=, WATCHDOG=1, STOPPING=1.

Does nothing when NOTIFY_SOCKET is unset, so daemons call it unconditionally.
"""

from __future__ import annotations

import os
import socket


def _address() -> str | None:
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return None
    if address.startswith("@"):  # abstract namespace
        return "\0" + address[1:]
    return address


def notify(*lines: str) -> bool:
    """Send ``lines`` (e.g. "READY=1", "STATUS=...") to the service manager.

    Never waits: a daemon's event loop calls this, and a manager that does not read its
    socket (its queue full) must not stop the daemon; the message is dropped instead."""
    address = _address()
    if address is None:
        return False
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
        try:
            sock.sendto("\n".join(lines).encode(), socket.MSG_DONTWAIT, address)
        except OSError:
            return False
    return True


def watchdog_interval() -> float | None:
    """Seconds between WATCHDOG=1 pings (half of WATCHDOG_USEC), or None."""
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or (pid and pid != str(os.getpid())):
        return None
    try:
        value = int(usec)
    except ValueError:
        return None
    return value / 2e6 if value > 0 else None


SD_LISTEN_FDS_START = 3


def listen_sockets() -> list[socket.socket]:
    """Listening sockets handed over by systemd (LISTEN_FDS, LISTEN_PID), or none.

    The variables are removed so that children do not take the sockets for theirs.
    """
    pid = os.environ.get("LISTEN_PID")
    count = os.environ.get("LISTEN_FDS")
    if not count or (pid and pid != str(os.getpid())):
        return []
    for name in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        os.environ.pop(name, None)
    try:
        n = int(count)
    except ValueError:
        return []
    sockets = []
    for fd in range(SD_LISTEN_FDS_START, SD_LISTEN_FDS_START + n):
        os.set_inheritable(fd, False)
        sockets.append(socket.socket(fileno=fd))
    return sockets
