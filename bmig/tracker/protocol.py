"""breqd's control protocol: message types and their encoding.

Every message is one frame (bmig.framing) whose body is:

    u8  type        u8 flags (0)   u16 reserved (0)
    u32 json_len    u64 request id
    json_len bytes  a JSON object of named fields (UTF-8)
    n * 16 bytes    byte ranges, each u64 offset + u64 length (little-endian)

Named fields keep the protocol self-describing and extensible (unknown fields are
ignored); ranges travel in binary because the mark path carries thousands of them.
The first message on a connection is HELLO, which negotiates the version. Replies echo
the request id and may come out of order: a mark is answered when it is durable.
docs/control-protocol.md is the reference.

Both ends share this module: the codec (``Message``, ``decode``), the checks a handler
makes of a request's fields (``field_*``), and the shape of a handler's answer
(``Reply``: a reply now, or one that waits, ``reply_after``). It may not know what a
request does (breqd's rooms do) nor touch a socket (bmig.framing, control.py and the
clients do).
"""

from __future__ import annotations

import enum
import json
import struct
import sys
from array import array
from dataclasses import dataclass, field
from typing import Any, Awaitable, Sequence, Union

from bmig.errors import ProtocolError
from bmig.limits import MAX_CONTROL_FRAME, MAX_CONTROL_JSON, MAX_RANGES_PER_FRAME

_HEAD = struct.Struct("<BBHIQ")


class Op(enum.IntEnum):
    HELLO = 1
    MARK = 2
    MARK_COMPLETED = 3
    CHECKOUT = 4
    COMMIT = 5
    ABORT = 6
    STATS = 7
    SET_ALL_DIRTY = 8
    CLEAR_ALL = 9
    LIST = 10
    ADD_DEVICE = 11
    REMOVE_DEVICE = 12
    QUERY = 13
    SET_LINEAGE = 14
    CLAIM = 15
    REPLY_OK = 0x80
    REPLY_ERROR = 0x81


class RangeList(Sequence[tuple[int, int]]):
    """The (offset, length) pairs of a message, read from its flat array on demand.

    A MARK of 65536 ranges is 1 MiB as an array, and about 8 MiB as a list of tuples.
    """

    __slots__ = ("_flat",)

    def __init__(self, flat: array):
        self._flat = flat

    def __len__(self) -> int:
        return len(self._flat) // 2

    def __getitem__(self, index):  # type: ignore[override]
        if isinstance(index, slice):
            return list(self)[index]
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(index)
        return self._flat[2 * index], self._flat[2 * index + 1]

    def __iter__(self):
        values = iter(self._flat)
        return zip(values, values)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, (list, tuple, RangeList)):
            return list(self) == list(other)
        return NotImplemented

    def __repr__(self) -> str:
        return f"RangeList({list(self)!r})"


@dataclass
class Message:
    op: Op
    request_id: int = 0
    fields: dict[str, Any] = field(default_factory=dict)
    ranges: Sequence[tuple[int, int]] = ()
    session: int = 0      # set by AsyncTrackerClient: the connection that answered

    def encode(self) -> bytes:
        """The frame body (without the length prefix)."""
        doc = json.dumps(self.fields, separators=(",", ":")).encode()
        if len(doc) > MAX_CONTROL_JSON:
            raise ProtocolError(f"message fields too large ({len(doc)} bytes)")
        if len(self.ranges) > MAX_RANGES_PER_FRAME:
            raise ProtocolError(f"too many ranges in one message ({len(self.ranges)})")
        flat = array("Q", [v for pair in self.ranges for v in pair])
        if sys.byteorder != "little":
            flat.byteswap()
        return _HEAD.pack(self.op, 0, 0, len(doc), self.request_id) + doc + flat.tobytes()


def decode(body: bytes) -> Message:
    """Parse a frame body; ProtocolError says what is wrong with a malformed one."""
    if len(body) < _HEAD.size:
        raise ProtocolError(f"message of {len(body)} bytes is shorter than its header")
    if len(body) > MAX_CONTROL_FRAME:
        raise ProtocolError(f"message of {len(body)} bytes is too large")
    op_value, flags, reserved, json_len, request_id = _HEAD.unpack_from(body)
    try:
        op = Op(op_value)
    except ValueError:
        raise ProtocolError(f"unknown message type {op_value}") from None
    if json_len > MAX_CONTROL_JSON or _HEAD.size + json_len > len(body):
        raise ProtocolError(f"field block of {json_len} bytes does not fit the message")
    rest = len(body) - _HEAD.size - json_len
    if rest % 16:
        raise ProtocolError(f"range block of {rest} bytes is not a multiple of 16")
    if rest // 16 > MAX_RANGES_PER_FRAME:
        raise ProtocolError(f"too many ranges in one message ({rest // 16})")
    fields: Any = {}
    if json_len:
        try:
            fields = json.loads(body[_HEAD.size:_HEAD.size + json_len])
        except (UnicodeDecodeError, ValueError) as exc:
            raise ProtocolError(f"fields are not valid JSON: {exc}") from None
        except RecursionError:
            raise ProtocolError("fields are nested too deeply") from None
        if not isinstance(fields, dict):
            raise ProtocolError("fields must be a JSON object")
    flat = array("Q")
    flat.frombytes(body[_HEAD.size + json_len:])
    if sys.byteorder != "little":
        flat.byteswap()
    return Message(op, request_id, fields, RangeList(flat))


def field_str(msg: Message, name: str) -> str:
    value = msg.fields.get(name)
    if not isinstance(value, str) or not value:
        raise ProtocolError(f"field {name!r} must be a non-empty string")
    return value


def field_int(msg: Message, name: str, default: int | None = None) -> int:
    value = msg.fields.get(name, default)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ProtocolError(f"field {name!r} must be an integer")
    return value


def field_bool(msg: Message, name: str, default: bool = False) -> bool:
    value = msg.fields.get(name, default)
    if not isinstance(value, bool):
        raise ProtocolError(f"field {name!r} must be true or false")
    return value


# -- replies ---------------------------------------------------------------------------

# What a request handler returns: the reply, or an awaitable of it (a reply that waits
# for a bitmap flush). Replies that wait may overtake each other: clients match by id.
Reply = Union[Message, Awaitable[Message]]


async def reply_after(pending: Awaitable, reply: Message) -> Message:
    """``reply`` once ``pending`` is done; if it fails, its error is answered instead."""
    await pending
    return reply
