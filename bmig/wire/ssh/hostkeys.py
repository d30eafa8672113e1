"""The host-key policy: known_hosts (``[host]:port`` for a port other than 22); an unknown
key is refused unless ``accept_new_host_key`` (then appended, never rewritten), a
changed key always. paramiko asks ``KnownHostsPolicy`` (bmig.wire.ssh.inprocess, which
appends with ``append_known_host``); for the system ssh the same policy is its
StrictHostKeyChecking (bmig.wire.ssh.openssh), and the fingerprint read here tells
whether it saved a new key.

paramiko is imported only where it is used: the system ssh's path never loads it
(0.13 s of CPU at every start).
"""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING

from bmig.errors import ConfigError
from bmig.wire.ssh.target import SshTarget

if TYPE_CHECKING:
    import paramiko

log = logging.getLogger("bmig.wire.ssh")       # one name for the whole package


def warn_accepted_key(target: SshTarget, key: str) -> None:
    log.warning("accepted the new host key %s of %s and saved it to %s", key,
                target.address, target.known_hosts_file)


def append_known_host(path: str, hostname: str, key: "paramiko.PKey") -> None:
    """Append one line, as ssh does: never rewrite the user's file."""
    directory = os.path.dirname(path)
    if directory:
        os.makedirs(directory, mode=0o700, exist_ok=True)
    line = f"{hostname} {key.get_name()} {key.get_base64()}\n"
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o600)
    except OSError as exc:
        raise ConfigError(f"cannot save the host key to {path}: {exc.strerror}") from None
    with os.fdopen(fd, "r+b") as f:
        size = f.seek(0, os.SEEK_END)
        if size:
            f.seek(size - 1)
            if f.read(1) != b"\n":
                line = "\n" + line
        f.write(line.encode())


def known_host_fingerprint(target: SshTarget) -> str | None:
    """Type and fingerprint of the keys known_hosts has for the target (hashed names
    too), if any."""
    import paramiko

    try:
        keys = paramiko.HostKeys(target.known_hosts_file).lookup(target.known_hosts_name)
    except (OSError, paramiko.SSHException):
        return None
    if not keys:
        return None
    return ", ".join(f"{name} {keys[name].fingerprint}" for name in keys.keys())
