"""The host-key policy: known_hosts (``[host]:port`` for a port other than 22); an unknown
key is refused unless ``accept_new_host_key`` (then appended, never rewritten), a
changed key always. paramiko asks ``KnownHostsPolicy``; for the system ssh the same
policy is its StrictHostKeyChecking (bmig.wire.ssh.openssh), and the fingerprint read
here tells whether it saved a new key.
"""

from __future__ import annotations

import logging
import os

import paramiko

from bmig.errors import AuthError, ConfigError
from bmig.wire.ssh.hints import unknown_host_key_message
from bmig.wire.ssh.target import SshTarget

log = logging.getLogger("bmig.wire.ssh")       # one name for the whole package


class KnownHostsPolicy(paramiko.MissingHostKeyPolicy):
    """Called by paramiko for a host known_hosts does not list (a changed key never gets
    here: SSHClient raises BadHostKeyException). Refuses, or accepts and appends it.

    Like OpenSSH, a host on a port other than 22 is also known if known_hosts has this
    very key under the bare host name (another key there does not count either way)."""

    def __init__(self, target: SshTarget):
        self.target = target

    def missing_host_key(self, client: paramiko.SSHClient, hostname: str,
                         key: paramiko.PKey) -> None:
        if hostname != self.target.host and \
                client.get_host_keys().check(self.target.host, key):
            return
        if not self.target.accept_new_host_key:
            raise AuthError(unknown_host_key_message(self.target))
        append_known_host(self.target.known_hosts_file, hostname, key)
        warn_accepted_key(self.target, f"{key.get_name()} {key.fingerprint}")


def warn_accepted_key(target: SshTarget, key: str) -> None:
    log.warning("accepted the new host key %s of %s and saved it to %s", key,
                target.address, target.known_hosts_file)


def append_known_host(path: str, hostname: str, key: paramiko.PKey) -> None:
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
    try:
        keys = paramiko.HostKeys(target.known_hosts_file).lookup(target.known_hosts_name)
    except (OSError, paramiko.SSHException):
        return None
    if not keys:
        return None
    return ", ".join(f"{name} {keys[name].fingerprint}" for name in keys.keys())
