"""Mutual authentication by HMAC challenge-response over a shared secret.

The receiver sends a random challenge in its HELLO; the sender answers with a nonce of
its own and an HMAC that proves it knows the secret; the receiver answers with an HMAC of
its own, so the sender also knows it reached a receiver holding the secret. Both proofs
are bound to the two hellos as they crossed the wire (bmig.wire.seal.transcript), so a
hello changed on the way fails. Proofs are checked for shape (64 lowercase hex digits)
before they are compared, in constant time. The secret never travels; the session keys
of bmig.wire.seal are derived from it and both nonces.

Proofs and the secret file only: it neither reads nor sends frames (bmig.wire.handshake
does).
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import stat

from bmig.config import read_small_file
from bmig.errors import ConfigError
from bmig.limits import MAX_SECRET_FILE

METHOD = "hmac-sha256"
TRANSPORT = "transport"          # the transport authenticated the peer: no HMAC asked for
NONCE_BYTES = 32
PROOF_BYTES = 32
MIN_SECRET_BYTES = 16
_HEX = frozenset("0123456789abcdef")


def new_nonce() -> str:
    return secrets.token_hex(NONCE_BYTES)


def _digest(secret: bytes, label: bytes, first: str, second: str, hellos: bytes) -> str:
    return hmac.new(secret, label + b"\0" + first.encode() + b"\0" + second.encode()
                    + b"\0" + hellos, hashlib.sha256).hexdigest()


def client_proof(secret: bytes, challenge: str, nonce: str, hellos: bytes) -> str:
    return _digest(secret, b"bmig-client-v2", challenge, nonce, hellos)


def server_proof(secret: bytes, challenge: str, nonce: str, hellos: bytes) -> str:
    return _digest(secret, b"bmig-server-v2", nonce, challenge, hellos)


def is_hex(value: object, nbytes: int) -> bool:
    """``value`` is a string of exactly ``2 * nbytes`` lowercase hex digits."""
    return (isinstance(value, str) and len(value) == 2 * nbytes
            and all(c in _HEX for c in value))


def valid_nonce(value: object) -> bool:
    return is_hex(value, NONCE_BYTES)


def matches(expected: str, given: object) -> bool:
    """``given`` is a well-formed proof equal to ``expected`` (compared in constant time);
    anything else (not a string, not hex, another length) is simply a mismatch."""
    return is_hex(given, PROOF_BYTES) and hmac.compare_digest(expected.encode(),
                                                              str(given).encode())


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
