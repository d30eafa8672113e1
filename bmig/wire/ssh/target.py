"""Where and how to log in over SSH (``SshTarget``), and how long to wait for what.

Plain data, shared by both transports (bmig.wire.ssh.inprocess, bmig.wire.ssh.openssh)
and the messages (bmig.wire.ssh.hints); nothing here connects.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

CLOSE_TIMEOUT = 10.0          # for the remote end to finish once its input is closed
EXIT_STATUS_WAIT = 5.0        # the exit status follows end of stream by a few messages


@dataclass(frozen=True)
class SshTarget:
    host: str
    port: int = 22
    user: str | None = None
    command: str = "breceive --stdio"   # the caller appends arguments with shlex.quote
    known_hosts: str | None = None      # default ~/.ssh/known_hosts
    accept_new_host_key: bool = False   # only then is an unknown host key accepted (and saved)
    identity: str | None = None         # private key file; default: agent and ~/.ssh/id_*
    cipher: str | None = None           # e.g. "aes128-gcm@openssh.com", "aes128-ctr"
    connect_timeout: float = 30.0

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def login(self) -> str:
        return f"{self.user}@{self.address}" if self.user else self.address

    @property
    def known_hosts_file(self) -> str:
        return os.path.expanduser(self.known_hosts or "~/.ssh/known_hosts")

    @property
    def known_hosts_name(self) -> str:
        """The name known_hosts lists this host under."""
        return self.host if self.port == 22 else f"[{self.host}]:{self.port}"
