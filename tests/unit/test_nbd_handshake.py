"""Fixed newstyle negotiation over an in-memory socket pair."""

from __future__ import annotations

import asyncio
import socket
import struct

import pytest

from bmig.errors import ProtocolError
from bmig.nbd import protocol as p
from bmig.nbd.handshake import ExportInfo, Handshake

EXPORTS = {"a": ExportInfo("a", 1 << 20, p.FLAG_HAS_FLAGS | p.FLAG_SEND_FLUSH, "disk a"),
           "b": ExportInfo("b", 2 << 20, p.FLAG_HAS_FLAGS)}


def option(opt: int, data: bytes = b"") -> bytes:
    return p.OPTION_HEADER.pack(p.IHAVEOPT, opt, len(data)) + data


def negotiate(client_bytes: bytes):
    """Run the server side on ``client_bytes``; return (result or exception, server bytes)."""
    async def main():
        a, b = socket.socketpair()
        reader, writer = await asyncio.open_connection(sock=a)
        b.sendall(client_bytes)
        b.shutdown(socket.SHUT_WR)
        try:
            result = await asyncio.wait_for(Handshake(reader, writer, EXPORTS).run(), 5)
        except Exception as exc:      # the test inspects it
            result = exc
        writer.close()
        await writer.wait_closed()
        out = b""
        b.settimeout(5)
        while chunk := b.recv(65536):
            out += chunk
        b.close()
        return result, out
    return asyncio.run(main())


def replies(out: bytes) -> list[tuple[int, int, bytes]]:
    """(option, reply type, payload) of each option reply after the greeting."""
    out = out[p.SERVER_GREETING.size:]
    found = []
    while len(out) >= p.OPTION_REPLY.size:
        magic, opt, rep, length = p.OPTION_REPLY.unpack_from(out)
        assert magic == p.REPLY_MAGIC_OPT
        found.append((opt, rep, out[20:20 + length]))
        out = out[20 + length:]
    return found


FLAGS = struct.pack(">I", p.FLAG_C_FIXED_NEWSTYLE | p.FLAG_C_NO_ZEROES)


def go(name: bytes, *infos: int) -> bytes:
    return option(p.Opt.GO, struct.pack(">I", len(name)) + name
                  + struct.pack(">H", len(infos)) + b"".join(struct.pack(">H", i) for i in infos))


def test_unknown_option_is_unsupported_and_the_handshake_goes_on():
    result, out = negotiate(FLAGS + option(99, b"xyz") + option(p.Opt.EXTENDED_HEADERS)
                            + go(b"a"))
    assert result.export.name == "a"
    kinds = [(o, r) for o, r, _ in replies(out)]
    assert kinds[:2] == [(99, p.Rep.ERR_UNSUP), (p.Opt.EXTENDED_HEADERS, p.Rep.ERR_UNSUP)]
    assert kinds[-1] == (p.Opt.GO, p.Rep.ACK)


def test_go_sends_export_block_size_name_and_description():
    result, out = negotiate(FLAGS + go(b"a", p.Info.NAME, p.Info.DESCRIPTION))
    infos = [data for _, rep, data in replies(out) if rep == p.Rep.INFO]
    assert struct.pack(">HQH", p.Info.EXPORT, 1 << 20, EXPORTS["a"].flags) in infos
    assert struct.pack(">HIII", p.Info.BLOCK_SIZE, 1, 4096, p.MAX_PAYLOAD) in infos
    assert struct.pack(">H", p.Info.NAME) + b"a" in infos
    assert struct.pack(">H", p.Info.DESCRIPTION) + b"disk a" in infos


def test_empty_name_is_the_default_export_and_unknown_names_are_refused():
    result, out = negotiate(FLAGS + go(b"nope") + go(b""))
    assert result.export.name == "a"
    assert replies(out)[0][:2] == (p.Opt.GO, p.Rep.ERR_UNKNOWN)


def test_list_then_abort():
    result, out = negotiate(FLAGS + option(p.Opt.LIST) + option(p.Opt.ABORT))
    assert result is None
    servers = [d[4:] for o, r, d in replies(out) if r == p.Rep.SERVER]
    assert servers == [b"a", b"b"]


def test_malformed_info_request_is_invalid_not_fatal():
    bad = option(p.Opt.GO, struct.pack(">I", 1000) + b"a")      # name length past the data
    result, out = negotiate(FLAGS + bad + go(b"b"))
    assert replies(out)[0][:2] == (p.Opt.GO, p.Rep.ERR_INVALID)
    assert result.export.name == "b"


def test_meta_context_needs_structured_replies_and_names_base_allocation():
    query = struct.pack(">I", 1) + b"a" + struct.pack(">I", 1) \
        + struct.pack(">I", 15) + b"base:allocation"
    result, out = negotiate(FLAGS + option(p.Opt.SET_META_CONTEXT, query)
                            + option(p.Opt.STRUCTURED_REPLY)
                            + option(p.Opt.SET_META_CONTEXT, query) + go(b"a"))
    kinds = [(o, r) for o, r, _ in replies(out)]
    assert kinds[0] == (p.Opt.SET_META_CONTEXT, p.Rep.ERR_INVALID)
    assert (p.Opt.SET_META_CONTEXT, p.Rep.META_CONTEXT) in kinds
    assert result.structured and result.contexts == {1: "base:allocation"}


@pytest.mark.parametrize("data", [
    FLAGS + p.OPTION_HEADER.pack(0x1234, p.Opt.GO, 0),                 # bad magic
    FLAGS + p.OPTION_HEADER.pack(p.IHAVEOPT, 99, p.MAX_OPTION_LENGTH + 1),   # oversize
    FLAGS + option(99) * (p.MAX_OPTIONS + 1),                         # too many options
    struct.pack(">I", 0x80),                                           # unknown client flag
])
def test_broken_framing_ends_the_handshake(data):
    result, _ = negotiate(data)
    assert isinstance(result, ProtocolError)
