"""The replication protocol's messages: types, layouts and the bounded decoder.

Every message is one frame (bmig.wire.channel: u32 little-endian length, then the body;
after authentication the body is sealed, bmig.wire.seal). The body's first byte is the
type. Control messages carry a JSON object of named fields
(unknown fields are ignored, so either side can grow); the data path is binary:

    JSON types   u8 type, u8 0, u16 0, then JSON (UTF-8, an object, at most MAX_JSON)
    DATA         u8 type, u8 codec, u16 flags, u32 raw length, u64 seq, u64 offset,
                 u64 xxh3-64 of the raw bytes; then the payload (encoded by ``codec``)
    ZERO         u8 type, u8 0, u16 flags, u32 0, u64 seq, u64 offset, u64 length
    FLUSH, RECEIVED, DURABLE
                 u8 type, u8 0, u16 0, u32 0, u64 seq
    HASHES       u8 type, u8 0, u16 0, u32 count, u64 offset, then count u64 hashes

docs/wire-protocol.md is the reference. Everything read from a peer is checked here before
anything is allocated or written: lengths against caps, offsets against the target.

Layouts and checks only: no I/O, no state.
"""

from __future__ import annotations

import enum
import json
import math
import struct
from dataclasses import dataclass, field
from typing import Any

from bmig.errors import BmigError, ProtocolError, from_wire
from bmig.limits import MAX_DATA, MAX_HASHES, MAX_JSON

WIRE_VERSION = 2                   # 2: sender-chosen authentication, sealed frames
OLDEST_WIRE_VERSION = 2            # what this side still speaks (the newer side decides)


class T(enum.IntEnum):
    HELLO = 1
    AUTH = 2
    AUTH_OK = 3
    OPEN = 4
    OPENED = 5
    PASS_BEGIN = 6
    PASS_END = 7
    PASS_DONE = 8
    DATA = 9
    ZERO = 10
    FLUSH = 11
    RECEIVED = 12
    DURABLE = 13
    HASHES_REQ = 14
    HASHES = 15
    ERROR = 16
    STATUS_REQ = 17
    STATUS = 18
    BYE = 19
    WRITTEN = 20
    PROMOTE = 21
    PROMOTED = 22
    RESYNC_REQ = 23
    RESYNC = 24


JSON_TYPES = frozenset({T.HELLO, T.AUTH, T.AUTH_OK, T.OPEN, T.OPENED, T.PASS_BEGIN,
                        T.PASS_END, T.PASS_DONE, T.HASHES_REQ, T.ERROR, T.STATUS_REQ,
                        T.STATUS, T.BYE, T.PROMOTE, T.PROMOTED, T.RESYNC_REQ,
                        T.RESYNC})

JSON_HEAD = struct.Struct("<BBH")
DATA_HEAD = struct.Struct("<BBHIQQQ")      # 32 bytes
ZERO_HEAD = struct.Struct("<BBHIQQQ")      # 32 bytes
SEQ_HEAD = struct.Struct("<BBHIQ")         # 16 bytes: FLUSH, RECEIVED, WRITTEN, DURABLE
HASHES_HEAD = struct.Struct("<BBHIQ")      # 16 bytes, then count * u64
HASH = struct.Struct("<Q")

# DATA and ZERO flags, for synchronous replication (protocols A, B, C): which
# acknowledgement the writer waits for, besides FLUSH's DURABLE.
FLAG_FUA = 1 << 0          # durable before acknowledged: DURABLE(seq) after fdatasync
FLAG_ACK_RECEIVED = 1 << 1  # RECEIVED(seq) as soon as it is read and checked (protocol B)
FLAG_ACK_WRITTEN = 1 << 2   # WRITTEN(seq) once written to the target (protocol C)
KNOWN_FLAGS = FLAG_FUA | FLAG_ACK_RECEIVED | FLAG_ACK_WRITTEN


# Every type by its byte: ``T(byte)`` costs ~0.7 us, and both ends take the type of
# every frame and acknowledgement (the receiver's busiest loop, bmig-nbd's replica).
_TYPE_OF_BYTE: dict[int, T] = {t.value: t for t in T}


def type_of(body: memoryview | bytes) -> T:
    if len(body) < 1:
        raise ProtocolError("empty message")
    kind = _TYPE_OF_BYTE.get(body[0])
    if kind is None:
        raise ProtocolError(f"unknown message type {body[0]}")
    return kind


# -- JSON messages ---------------------------------------------------------------------

@dataclass
class Message:
    type: T
    fields: dict[str, Any] = field(default_factory=dict)

    def encode(self) -> bytes:
        doc = json.dumps(self.fields, separators=(",", ":")).encode()
        if len(doc) > MAX_JSON:
            raise ProtocolError(f"{self.type.name} fields too large ({len(doc)} bytes)")
        return JSON_HEAD.pack(self.type, 0, 0) + doc

    def str(self, name: str, default: str | None = None) -> str:
        value = self.fields.get(name, default)
        if not isinstance(value, str):
            raise ProtocolError(f"{self.type.name}: field {name!r} must be a string")
        return value

    def int(self, name: str, default: int | None = None, low: int = 0,
            high: int = (1 << 64) - 1) -> int:
        value = self.fields.get(name, default)
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise ProtocolError(f"{self.type.name}: field {name!r} must be an integer "
                                f"from {low} to {high}")
        return value

    def bool(self, name: str, default: bool = False) -> bool:
        value = self.fields.get(name, default)
        if not isinstance(value, bool):
            raise ProtocolError(f"{self.type.name}: field {name!r} must be true or false")
        return value

    def list(self, name: str) -> list:
        value = self.fields.get(name, [])
        if not isinstance(value, list):
            raise ProtocolError(f"{self.type.name}: field {name!r} must be a list")
        return value


def _no_constant(word: str) -> Any:
    raise ValueError(f"{word} is not a JSON number")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"{text[:40]} is beyond every finite number")
    return value


def loads_strict(data: bytes | str) -> Any:
    """JSON as RFC 8259 has it: NaN, Infinity and numbers beyond a finite float (1e999)
    are refused (ValueError), so no non-finite number reaches a caller."""
    return json.loads(data, parse_constant=_no_constant, parse_float=_finite_float)


def decode_json(body: memoryview | bytes) -> Message:
    kind = type_of(body)
    if kind not in JSON_TYPES:
        raise ProtocolError(f"{kind.name} is not a JSON message")
    if len(body) - JSON_HEAD.size > MAX_JSON:
        raise ProtocolError(f"{kind.name} of {len(body)} bytes is too large")
    try:
        fields = loads_strict(bytes(body[JSON_HEAD.size:]) or b"{}")
    except (UnicodeDecodeError, ValueError) as exc:
        raise ProtocolError(f"{kind.name}: fields are not valid JSON: {exc}") from None
    except RecursionError:
        raise ProtocolError(f"{kind.name}: fields are nested too deeply") from None
    if not isinstance(fields, dict):
        raise ProtocolError(f"{kind.name}: fields must be a JSON object")
    return Message(kind, fields)


# -- binary messages -------------------------------------------------------------------

@dataclass(frozen=True)
class DataHeader:
    codec: int
    flags: int
    raw_length: int
    seq: int
    offset: int
    checksum: int


def pack_data(codec: int, flags: int, raw_length: int, seq: int, offset: int,
              checksum: int) -> bytes:
    return DATA_HEAD.pack(T.DATA, codec, flags, raw_length, seq, offset, checksum)


def unpack_data(body: memoryview) -> tuple[DataHeader, memoryview]:
    if len(body) < DATA_HEAD.size:
        raise ProtocolError(f"DATA of {len(body)} bytes is shorter than its header")
    _, codec, flags, raw_length, seq, offset, checksum = DATA_HEAD.unpack_from(body)
    if not 0 < raw_length <= MAX_DATA:
        raise ProtocolError(f"DATA seq {seq}: raw length {raw_length} is not between 1 and "
                            f"{MAX_DATA}")
    return DataHeader(codec, flags, raw_length, seq, offset, checksum), body[DATA_HEAD.size:]


def pack_zero(seq: int, offset: int, length: int, flags: int = 0) -> bytes:
    return ZERO_HEAD.pack(T.ZERO, 0, flags, 0, seq, offset, length)


def unpack_zero(body: memoryview) -> tuple[int, int, int, int]:
    """(seq, offset, length, flags) of a ZERO."""
    if len(body) != ZERO_HEAD.size:
        raise ProtocolError(f"ZERO of {len(body)} bytes, expected {ZERO_HEAD.size}")
    _, _, flags, _, seq, offset, length = ZERO_HEAD.unpack_from(body)
    if length == 0:
        raise ProtocolError(f"ZERO seq {seq} of length 0")
    return seq, offset, length, flags


def pack_seq(kind: T, seq: int) -> bytes:
    return SEQ_HEAD.pack(kind, 0, 0, 0, seq)


def unpack_seq(body: memoryview) -> int:
    if len(body) != SEQ_HEAD.size:
        raise ProtocolError(f"{type_of(body).name} of {len(body)} bytes, expected "
                            f"{SEQ_HEAD.size}")
    return SEQ_HEAD.unpack_from(body)[4]


def pack_hashes(offset: int, hashes: list[int]) -> bytes:
    return HASHES_HEAD.pack(T.HASHES, 0, 0, len(hashes), offset) + b"".join(
        HASH.pack(h) for h in hashes)


def unpack_hashes(body: memoryview) -> tuple[int, list[int]]:
    if len(body) < HASHES_HEAD.size:
        raise ProtocolError("HASHES shorter than its header")
    _, _, _, count, offset = HASHES_HEAD.unpack_from(body)
    if count > MAX_HASHES or len(body) != HASHES_HEAD.size + 8 * count:
        raise ProtocolError(f"HASHES with {count} hashes does not match its "
                            f"{len(body)} bytes")
    return offset, [HASH.unpack_from(body, HASHES_HEAD.size + 8 * i)[0] for i in range(count)]


def error_message(exc: Exception, seq: int | None = None, fatal: bool = False) -> Message:
    """An ERROR naming the problem, from one of the toolkit's errors."""
    code = exc.wire_code if isinstance(exc, BmigError) else "error"
    text = exc.message if isinstance(exc, BmigError) else str(exc)
    fields: dict[str, Any] = {"code": code, "message": text, "fatal": fatal}
    if seq is not None:
        fields["seq"] = seq
    return Message(T.ERROR, fields)


def error_from(message: Message) -> BmigError:
    """The error an ERROR from the receiver stands for, as the same class (its exit code)."""
    code = str(message.fields.get("code", "error"))
    text = str(message.fields.get("message", "unknown error"))
    return from_wire(code, f"receiver: {text}")
