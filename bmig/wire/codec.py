"""Chunk payloads: compression codecs with stable ids, checksums, zero detection.

Each codec has a one-byte id that travels with the data (borg's way); decoding dispatches
on it and checks the decoded size before trusting it. Compression is tried on a sample
first: when the sample does not shrink, the data goes raw, so incompressible data costs
almost nothing. The checksum is xxh3-64 of the raw bytes.

Pure functions on buffers: no I/O, no frames.
"""

from __future__ import annotations

import threading

import xxhash
import zstandard

from bmig.errors import ProtocolError

RAW = 0
ZSTD = 1
NAMES = {RAW: "raw", ZSTD: "zstd"}

SAMPLE = 64 * 1024              # compressed first to see whether compression pays
PAYS = 0.90                     # compress when the sample shrinks below this fraction
DEFAULT_LEVEL = 1

_ZEROS = bytes(4 * 1024 * 1024)
_local = threading.local()


def checksum(data: memoryview | bytes) -> int:
    return xxhash.xxh3_64_intdigest(data)


def is_zero(data: memoryview | bytes) -> bool:
    """True when every byte is zero (a memcmp against a zero buffer)."""
    n = len(data)
    if n <= len(_ZEROS):
        return data == memoryview(_ZEROS)[:n]
    step = len(_ZEROS)
    view = memoryview(data)
    return all(view[i:i + step] == memoryview(_ZEROS)[:len(view[i:i + step])]
               for i in range(0, n, step))


def _compressor(level: int) -> zstandard.ZstdCompressor:
    cache = getattr(_local, "compressors", None)
    if cache is None:
        cache = _local.compressors = {}
    compressor = cache.get(level)
    if compressor is None:
        compressor = cache[level] = zstandard.ZstdCompressor(level=level)
    return compressor


def _decompressor() -> zstandard.ZstdDecompressor:
    d = getattr(_local, "decompressor", None)
    if d is None:
        d = _local.decompressor = zstandard.ZstdDecompressor()
    return d


def encode(data: memoryview | bytes, level: int | None) -> tuple[int, bytes | memoryview]:
    """(codec, payload): zstd when it pays, else the raw bytes. ``level`` None: raw."""
    if level is None or len(data) < 512:
        return RAW, data
    compressor = _compressor(level)
    if len(data) > 2 * SAMPLE:
        sample = compressor.compress(data[:SAMPLE])
        if len(sample) > PAYS * SAMPLE:
            return RAW, data
    packed = compressor.compress(data)
    if len(packed) > PAYS * len(data):
        return RAW, data
    return ZSTD, packed


def decode(codec: int, payload: memoryview, raw_length: int) -> memoryview | bytes:
    """The raw bytes; ProtocolError for an unknown codec or a payload that does not decode
    to exactly ``raw_length`` bytes (checked before more than that is allocated)."""
    if codec == RAW:
        if len(payload) != raw_length:
            raise ProtocolError(f"raw payload of {len(payload)} bytes, expected {raw_length}")
        return payload
    if codec == ZSTD:
        try:
            # A frame that states its size is decoded into that much memory whatever
            # max_output_size says: check the stated size first.
            stated = zstandard.frame_content_size(payload)
            if stated not in (-1, raw_length):
                raise ProtocolError(f"compressed payload states {stated} bytes, expected "
                                    f"{raw_length}")
            out = _decompressor().decompress(payload, max_output_size=raw_length)
        except zstandard.ZstdError as exc:
            raise ProtocolError(f"payload does not decompress: {exc}") from None
        if len(out) != raw_length:
            raise ProtocolError(f"payload decompresses to {len(out)} bytes, expected "
                                f"{raw_length}")
        return out
    raise ProtocolError(f"unknown codec {codec}")
