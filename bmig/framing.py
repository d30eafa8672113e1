"""Length-prefixed frames with a cap, for stream sockets (sync and asyncio).

A frame is a 32-bit little-endian length followed by that many bytes. The length is
checked against the cap before anything is allocated.
"""

from __future__ import annotations

import socket
import struct
from typing import TYPE_CHECKING

from bmig.errors import FrameTooLarge, ProtocolError

if TYPE_CHECKING:
    import asyncio

LENGTH = struct.Struct("<I")


class ConnectionClosed(ProtocolError):
    """The peer closed the connection."""

    wire_code = "closed"


def _check(length: int, cap: int) -> None:
    if length > cap:
        raise FrameTooLarge(f"frame of {length} bytes exceeds the limit of {cap}")


async def read_frame(reader: asyncio.StreamReader, cap: int) -> bytes:
    """Read one frame body; ConnectionClosed at a clean end of stream."""
    import asyncio      # here: the command-line tools use only the blocking half (~14 ms)

    try:
        head = await reader.readexactly(LENGTH.size)
    except asyncio.IncompleteReadError as exc:
        if exc.partial:
            raise ProtocolError("connection closed inside a frame header") from exc
        raise ConnectionClosed("connection closed") from exc
    (length,) = LENGTH.unpack(head)
    _check(length, cap)
    try:
        return await reader.readexactly(length)
    except asyncio.IncompleteReadError as exc:
        raise ProtocolError(
            f"connection closed inside a frame ({len(exc.partial)} of {length} bytes)") from exc


def recv_exactly(sock: socket.socket, n: int) -> bytes:
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        k = sock.recv_into(view[got:])
        if k == 0:
            if got == 0:
                raise ConnectionClosed("connection closed")
            raise ProtocolError(f"connection closed after {got} of {n} bytes")
        got += k
    return bytes(buf)


def recv_frame(sock: socket.socket, cap: int) -> bytes:
    (length,) = LENGTH.unpack(recv_exactly(sock, LENGTH.size))
    _check(length, cap)
    try:
        return recv_exactly(sock, length)
    except ConnectionClosed as exc:
        raise ProtocolError(f"connection closed before a {length}-byte frame") from exc


def pack_frame(body: bytes) -> bytes:
    return LENGTH.pack(len(body)) + body


def write_frame(writer: "asyncio.StreamWriter", body: bytes) -> bool:
    """Queue one frame on an asyncio stream; False when its connection is closed
    already (the peer reset it and the reader has not heard yet): uvloop's transport
    raises RuntimeError on such a write, asyncio's drops the bytes."""
    if writer.is_closing():
        return False
    try:
        writer.write(pack_frame(body))
    except RuntimeError:
        return False
    return True
