"""Sealed frames: AES-256-GCM with a key per direction and the frame's number as nonce.

Once the shared secret has authenticated both sides (bmig.wire.auth), every frame in
either direction is sealed. The keys come from HKDF-SHA256 over the secret, salted with
both sides' nonces and bound to the hellos both sides saw (the transcript), so they are
new for every session and a relay that passed the handshake through learns nothing it
can use. Each direction counts its frames from 0; frame n is sealed with nonce n (96
bits: 4 zero bytes, then n as u64 little-endian) and its length prefix as associated
data. The receiving side opens frame n with the n it counted itself, never a number from
the wire, so a frame that was altered, dropped, replayed or moved fails its tag, and the
session ends. A nonce never repeats under one key: keys live for one session, and the
counter stops the session before it could wrap.

Small frames are sealed and opened in one call. A large frame (DATA) goes through the
streaming interface in pieces, so the header and payload are never joined and no frame
sized buffer is needed for the ciphertext; its plaintext is handed on only after the tag
has been checked.

Cryptography on buffers only: framing and I/O are bmig.wire.channel's.
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers import Cipher, CipherContext, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from bmig.errors import IntegrityError, ProtocolError

KEY_BYTES = 32                   # AES-256
TAG_BYTES = 16
NONCE = struct.Struct("<4xQ")    # 12 bytes: 4 zero bytes, the frame number
MAX_FRAMES = (1 << 64) - 1       # frames one key may seal
SENDER_TO_RECEIVER = b"bmig-wire-v2 sender-to-receiver"
RECEIVER_TO_SENDER = b"bmig-wire-v2 receiver-to-sender"


@dataclass(frozen=True)
class SessionKeys:
    sender_to_receiver: bytes
    receiver_to_sender: bytes


def transcript(sender_hello: bytes, receiver_hello: bytes) -> bytes:
    """SHA-256 over both hello bodies as they crossed the wire, each length-prefixed: what
    the proofs and keys are bound to, so a hello changed on the way fails authentication."""
    h = hashlib.sha256()
    for body in (sender_hello, receiver_hello):
        h.update(struct.pack("<I", len(body)))
        h.update(body)
    return h.digest()


def derive_keys(secret: bytes, challenge: bytes, nonce: bytes, hellos: bytes) -> SessionKeys:
    """One key per direction: HKDF-SHA256(secret, salt = challenge || nonce,
    info = direction label || 0 || transcript)."""
    def key(label: bytes) -> bytes:
        return HKDF(algorithm=hashes.SHA256(), length=KEY_BYTES, salt=challenge + nonce,
                    info=label + b"\0" + hellos).derive(secret)

    return SessionKeys(key(SENDER_TO_RECEIVER), key(RECEIVER_TO_SENDER))


class _Direction:
    def __init__(self, key: bytes):
        if len(key) != KEY_BYTES:
            raise ValueError("AES-256-GCM needs a 32-byte key")
        self._key = key
        self._aead = AESGCM(key)
        self.frames = 0              # frames sealed or opened so far: the next nonce

    def _next_nonce(self) -> bytes:
        if self.frames >= MAX_FRAMES:
            raise ProtocolError("the session sealed as many frames as one key allows; "
                                "reconnect")
        nonce = NONCE.pack(self.frames)
        self.frames += 1
        return nonce

    def _context(self, decrypt: bool, prefix: bytes) -> tuple[int, CipherContext]:
        """(frame number, a streaming AES-GCM context for it, with the prefix as
        associated data)."""
        number = self.frames
        cipher = Cipher(algorithms.AES(self._key), modes.GCM(self._next_nonce()))
        context = cipher.decryptor() if decrypt else cipher.encryptor()
        context.authenticate_additional_data(prefix)
        return number, context


class Sealer(_Direction):
    """The sending half of one direction."""

    def seal(self, prefix: bytes, body: bytes | bytearray | memoryview) -> bytes:
        """Ciphertext and tag of a whole (small) body."""
        return self._aead.encrypt(self._next_nonce(), body, prefix)

    def start(self, prefix: bytes) -> CipherContext:
        """A streaming encryptor for the next frame: ``update_into`` piece by piece, then
        ``finalize``; its ``tag`` follows the ciphertext."""
        return self._context(False, prefix)[1]


class Opener(_Direction):
    """The receiving half of one direction; ``description`` names the peer in errors."""

    def __init__(self, key: bytes, description: str):
        super().__init__(key)
        self.description = description

    def failed(self, number: int) -> IntegrityError:
        return IntegrityError(f"frame {number} from {self.description} failed its integrity "
                              "check: it was altered, dropped, replayed or reordered on the "
                              "way; the session ends")

    def open(self, prefix: bytes, sealed: bytes | bytearray | memoryview) -> bytes:
        """The body of a whole (small) sealed frame; IntegrityError if it does not check."""
        number = self.frames
        nonce = self._next_nonce()
        if len(sealed) < TAG_BYTES:
            raise self.failed(number)
        try:
            return self._aead.decrypt(nonce, sealed, prefix)
        except InvalidTag:
            raise self.failed(number) from None

    def start(self, prefix: bytes) -> "Opening":
        """The next frame, opened in pieces (a large one)."""
        number, context = self._context(True, prefix)
        return Opening(self, number, context)


class Opening:
    """A large frame deciphered piece by piece; ``finish(tag)`` checks the tag over all of
    it. The plaintext written meanwhile must not be used before ``finish`` returns."""

    def __init__(self, opener: Opener, number: int, context: CipherContext):
        self._opener = opener
        self._number = number
        self._context = context

    def update_into(self, data: memoryview, out: memoryview) -> int:
        return self._context.update_into(data, out)

    def finish(self, tag: bytes | memoryview) -> None:
        try:
            self._context.finalize_with_tag(bytes(tag))
        except (InvalidTag, ValueError):
            raise self._opener.failed(self._number) from None
