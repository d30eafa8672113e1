"""Mutual authentication by HMAC challenge-response over a shared secret.

The receiver sends a random challenge in its HELLO; the sender answers with an HMAC of
both nonces and proves it knows the secret; the receiver answers with an HMAC of its own,
so the sender also knows it reached a receiver holding the secret. Digests are compared
in constant time. The secret never travels. Over TLS with client certificates, or over
SSH, the transport has already authenticated the peer.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import stat

from bmig.config import read_small_file
from bmig.errors import ConfigError

METHOD = "hmac-sha256"
NONCE_BYTES = 32
MAX_SECRET_FILE = 4096
MIN_SECRET_BYTES = 16


def new_nonce() -> str:
    return secrets.token_hex(NONCE_BYTES)


def _digest(secret: bytes, label: bytes, first: str, second: str) -> str:
    return hmac.new(secret, label + b"\0" + first.encode() + b"\0" + second.encode(),
                    hashlib.sha256).hexdigest()


def client_proof(secret: bytes, server_nonce: str, client_nonce: str) -> str:
    return _digest(secret, b"bmig-client-v1", server_nonce, client_nonce)


def server_proof(secret: bytes, server_nonce: str, client_nonce: str) -> str:
    return _digest(secret, b"bmig-server-v1", client_nonce, server_nonce)


def matches(expected: str, given: object) -> bool:
    return isinstance(given, str) and hmac.compare_digest(expected.encode(), given.encode())


def valid_nonce(value: object) -> bool:
    return (isinstance(value, str) and len(value) == 2 * NONCE_BYTES
            and all(c in "0123456789abcdef" for c in value))


def load_secret(path: str) -> bytes:
    """The shared secret: a file only its owner can read, of at least 16 bytes."""
    data, st = read_small_file(path, MAX_SECRET_FILE, "secret file")
    if st.st_mode & 0o077:
        raise ConfigError(f"secret file {path} can be read by others (mode "
                          f"{stat.S_IMODE(st.st_mode):04o}); chmod 600 {path}")
    secret = data.strip()
    if len(secret) < MIN_SECRET_BYTES:
        raise ConfigError(f"secret file {path} holds fewer than {MIN_SECRET_BYTES} bytes; "
                          f"make one with: head -c 32 /dev/urandom | base64 > {path}")
    return secret
