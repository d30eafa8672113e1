"""How a sender reaches and authenticates a target: ``ConnectOptions``.

Built in one place from a dict of settings (``from_dict``): bmigrate's flags and
migration files (bmig.sender.settings) and the ``options`` of a ``replicate`` request
to bmig-nbd (bmig.nbd.manage) give the same keys, so both get the same defaults.
Nothing here connects (bmig.wire.connect does).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

from bmig.wire.auth import load_secret

DEFAULT_SSH_COMMAND = "breceive --stdio"
DEFAULT_SSH_PROGRAM = "paramiko"

# The keys from_dict reads: the long names of the connection flags ("_" for "-").
CONNECTION_KEYS = ("secret_file", "tls_ca", "tls_cert", "tls_key", "trust_tls_server",
                   "ssh_command", "ssh_program", "known_hosts", "accept_new_host_key",
                   "identity", "ssh_cipher")


@dataclass(frozen=True)
class ConnectOptions:
    """How to reach and authenticate a target (from flags and the config file)."""

    secret: bytes | None = None
    tls_ca: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    ssh_command: str = DEFAULT_SSH_COMMAND
    ssh_program: str = DEFAULT_SSH_PROGRAM     # or "openssh"
    known_hosts: str | None = None
    accept_new_host_key: bool = False
    identity: str | None = None
    ssh_cipher: str | None = None
    trust_tls_server: bool = False         # a verified certificate authenticates tls://
    timeout: float = 30.0

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "ConnectOptions":
        """From CONNECTION_KEYS (others are ignored); a missing or empty value takes its
        default. The secret file is read here, with its checks (bmig.wire.auth)."""
        secret = load_secret(str(values["secret_file"])) if values.get("secret_file") \
            else None
        return cls(
            secret=secret, tls_ca=values.get("tls_ca"), tls_cert=values.get("tls_cert"),
            tls_key=values.get("tls_key"),
            trust_tls_server=bool(values.get("trust_tls_server")),
            ssh_command=str(values.get("ssh_command") or DEFAULT_SSH_COMMAND),
            ssh_program=str(values.get("ssh_program") or DEFAULT_SSH_PROGRAM),
            known_hosts=values.get("known_hosts"),
            accept_new_host_key=bool(values.get("accept_new_host_key")),
            identity=values.get("identity"), ssh_cipher=values.get("ssh_cipher"))
