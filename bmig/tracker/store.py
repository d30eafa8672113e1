"""The on-disk bitmap of one device: format, crash-safe page updates, all-dirty fallback.

Layout (all integers little-endian; docs/state-format.md is the reference):

    offset 0      header slot 0   (4096 bytes)
    offset 4096   header slot 1   (4096 bytes)
    offset 8192   page 0 slot 0, page 0 slot 1, page 1 slot 0, ...   (4096 bytes each)

Every header and every page is written to the slot that does not hold its newest valid
copy, then fdatasync'd. Each copy carries a sequence number and a CRC32, so a write torn
by a power loss never destroys the previous copy. Both slots of every page are valid
from creation on, so a page with a damaged copy (a torn write, or a media error that
may have hit the newest acknowledged copy) cannot be trusted either way: its chunks
all become dirty, and the other pages keep their bits. A bit set on disk means the chunk
is dirty or in flight.

Anything else that does not validate (no file, a header with no valid copy, a file too
short, a size or identity that is not the device's) replaces the whole bitmap by an
all-dirty one, and the reason is returned for the caller to log: never an empty one
(invariant 4).

The room owns the file format and its reading and writing; it may not decide what the
bits are (chunks.py) or when they are written (committer.py).
"""

from __future__ import annotations

import errno
import os
import struct
import time
import zlib
from dataclasses import dataclass

from bitarray import bitarray

from bmig.chunkmath import ceil_div, chunk_count
from bmig.errors import StateError, StateWriteError
from bmig.tracker.chunks import ENDIAN, zeros

MAGIC = b"BMIGBMAP"
PAGE_MAGIC = b"BPG1"
FORMAT_VERSION = 1
BLOCK = 4096
HEADER_SLOTS = 2
PAGES_OFFSET = HEADER_SLOTS * BLOCK

# magic, version, seq, device_id, size, chunk_size, nchunks, generation, flags, crc
_HEADER = struct.Struct("<8sIQQQIQQI")
_CRC = struct.Struct("<I")
# magic, page index, seq, payload crc, header crc
_PAGE_HEADER = struct.Struct("<4sIQI")
PAGE_HEADER_SIZE = 32
PAGE_PAYLOAD = BLOCK - PAGE_HEADER_SIZE
BITS_PER_PAGE = PAGE_PAYLOAD * 8

FLAG_CLEAN = 1  # written at clean shutdown, cleared when breqd opens the file
NO_SAVED_BITMAP = "no saved bitmap"


@dataclass(frozen=True)
class Identity:
    """What a bitmap file must match to be trusted for a device."""

    device_id: int
    size: int
    chunk_size: int

    @property
    def nchunks(self) -> int:
        return chunk_count(self.size, self.chunk_size)

    @property
    def npages(self) -> int:
        return page_count(self.nchunks)


@dataclass
class Header:
    identity: Identity
    seq: int
    generation: int
    flags: int

    def pack(self) -> bytes:
        ident = self.identity
        body = _HEADER.pack(MAGIC, FORMAT_VERSION, self.seq, ident.device_id, ident.size,
                            ident.chunk_size, ident.nchunks, self.generation, self.flags)
        block = body + _CRC.pack(zlib.crc32(body))
        return block.ljust(BLOCK, b"\0")

    @classmethod
    def unpack(cls, block: bytes) -> "Header | None":
        if len(block) < _HEADER.size + _CRC.size:
            return None
        body = block[:_HEADER.size]
        (crc,) = _CRC.unpack_from(block, _HEADER.size)
        if zlib.crc32(body) != crc:
            return None
        magic, version, seq, device_id, size, chunk_size, nchunks, generation, flags = \
            _HEADER.unpack(body)
        if magic != MAGIC or version != FORMAT_VERSION or chunk_size == 0:
            return None
        ident = Identity(device_id, size, chunk_size)
        if ident.nchunks != nchunks:
            return None
        return cls(ident, seq, generation, flags)


def pack_page(index: int, seq: int, payload: bytes) -> bytes:
    payload = payload.ljust(PAGE_PAYLOAD, b"\0")
    head = _PAGE_HEADER.pack(PAGE_MAGIC, index, seq, zlib.crc32(payload))
    head += _CRC.pack(zlib.crc32(head))
    return head.ljust(PAGE_HEADER_SIZE, b"\0") + payload


def unpack_page(block: bytes, index: int) -> tuple[int, bytes] | None:
    """(seq, payload) of a valid page copy, or None."""
    if len(block) != BLOCK:
        return None
    head = block[:_PAGE_HEADER.size]
    (head_crc,) = _CRC.unpack_from(block, _PAGE_HEADER.size)
    if zlib.crc32(head) != head_crc:
        return None
    magic, stored_index, seq, payload_crc = _PAGE_HEADER.unpack(head)
    payload = block[PAGE_HEADER_SIZE:]
    if magic != PAGE_MAGIC or stored_index != index or zlib.crc32(payload) != payload_crc:
        return None
    return seq, payload


def file_size(ident: Identity) -> int:
    return PAGES_OFFSET + ident.npages * HEADER_SLOTS * BLOCK


def page_count(nchunks: int) -> int:
    """Pages of the bitmap file for ``nchunks`` chunks (at least one)."""
    return max(1, ceil_div(nchunks, BITS_PER_PAGE))


def page_span(index: int, nchunks: int) -> tuple[int, int]:
    """Chunks [first, end) kept in page ``index``."""
    first = index * BITS_PER_PAGE
    return first, min(first + BITS_PER_PAGE, nchunks)


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class BitmapFile:
    """An open bitmap file. Not thread safe: one writer at a time (the device's committer)."""

    def __init__(self, path: str, fd: int, header: Header, current_slots: list[int],
                 header_slot: int):
        self.path = path
        self._fd = fd
        self.header = header
        self._slots = current_slots    # per page: slot holding the newest valid copy
        self._header_slot = header_slot
        self._seq = header.seq
        self._staged: dict[int, int] = {}   # page -> spare slot written, not yet synced
        self.was_clean = bool(header.flags & FLAG_CLEAN)

    # -- opening ---------------------------------------------------------------------

    @classmethod
    def open(cls, path: str, ident: Identity,
             generation: int | None = None) -> tuple["BitmapFile", bitarray, str | None]:
        """Open or create the bitmap at ``path`` for a device of identity ``ident``.

        Returns the file, the bits it holds (dirty or in flight) and, when the saved
        bitmap could not be trusted, the reason it was replaced by an all-dirty one.
        The file is left marked unclean until ``close(clean=True)``.
        """
        reason = None
        try:
            loaded = cls._load(path, ident)
        except FileNotFoundError:
            loaded, reason = None, NO_SAVED_BITMAP
        except _Invalid as exc:
            loaded, reason = None, str(exc)
        except OSError as exc:
            raise StateError(f"cannot read bitmap {path}: {exc.strerror}") from exc
        if loaded is None:
            if reason != NO_SAVED_BITMAP and os.path.exists(path):
                _keep_bad_copy(path)
            bits = zeros(ident.nchunks)
            bits.setall(1)
            cls.create(path, ident, bits, generation or 0)
            loaded = cls._load(path, ident)
        bitmap, bits, damaged = loaded
        if damaged:
            reason = (f"page(s) {', '.join(map(str, damaged))} damaged (torn write or media "
                      f"error): their chunks were set dirty")
            for index in damaged:  # twice: both copies valid again
                first, end = page_span(index, ident.nchunks)
                bitmap.write_pages({index: bits[first:end].tobytes()})
                bitmap.write_pages({index: bits[first:end].tobytes()})
        bitmap._write_header(flags=bitmap.header.flags & ~FLAG_CLEAN)
        return bitmap, bits, reason

    @classmethod
    def create(cls, path: str, ident: Identity, bits: bitarray, generation: int) -> None:
        """Write a complete new file holding ``bits``: temp file, fsync, rename, dir fsync."""
        directory = os.path.dirname(path) or "."
        tmp = f"{path}.tmp"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                header = Header(ident, 1, generation, 0)
                _pwrite_all(fd, header.pack(), 0)
                _pwrite_all(fd, Header(ident, 0, generation, 0).pack(), BLOCK)
                for index in range(ident.npages):
                    first, end = page_span(index, ident.nchunks)
                    payload = bits[first:end].tobytes()
                    base = PAGES_OFFSET + index * HEADER_SLOTS * BLOCK
                    _pwrite_all(fd, pack_page(index, 1, payload) + pack_page(index, 0, payload),
                                base)
                os.fsync(fd)
            finally:
                os.close(fd)
            os.rename(tmp, path)
            _fsync_dir(directory)
        except OSError as exc:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise StateWriteError(f"cannot create bitmap {path}: {exc.strerror}") from exc

    @classmethod
    def _load(cls, path: str, ident: Identity) -> tuple["BitmapFile", bitarray, list[int]]:
        fd = os.open(path, os.O_RDWR)
        try:
            return cls._load_fd(path, fd, ident)
        except BaseException:
            os.close(fd)
            raise

    @classmethod
    def _load_fd(cls, path: str, fd: int,
                 ident: Identity) -> tuple["BitmapFile", bitarray, list[int]]:
        actual = os.fstat(fd).st_size
        candidates = [Header.unpack(os.pread(fd, BLOCK, slot * BLOCK))
                      for slot in range(HEADER_SLOTS)]
        valid = [(h.seq, slot, h) for slot, h in enumerate(candidates) if h is not None]
        if not valid:
            if actual < PAGES_OFFSET:
                raise _Invalid(f"file is truncated ({actual} bytes)")
            raise _Invalid("header is corrupt (bad magic, version or checksum)")
        _, header_slot, header = max(valid)
        saved = header.identity
        if saved.device_id != ident.device_id:
            raise _Invalid(f"bitmap belongs to device id {saved.device_id:016x}, "
                           f"not {ident.device_id:016x}")
        if saved.size != ident.size:
            raise _Invalid(f"bitmap is for a device of {saved.size} bytes, "
                           f"the device has {ident.size}")
        if saved.chunk_size != ident.chunk_size:
            raise _Invalid(f"bitmap uses {saved.chunk_size}-byte chunks, "
                           f"the device {ident.chunk_size}")
        if actual < file_size(ident):
            raise _Invalid(f"file is truncated ({actual} of {file_size(ident)} bytes)")
        bits = bitarray(endian=ENDIAN)
        slots = []
        damaged = []
        newest = header.seq
        for index in range(ident.npages):
            base = PAGES_OFFSET + index * HEADER_SLOTS * BLOCK
            raw = os.pread(fd, HEADER_SLOTS * BLOCK, base)
            copies = [unpack_page(raw[s * BLOCK:(s + 1) * BLOCK], index)
                      for s in range(HEADER_SLOTS)]
            good = [(c[0], s, c[1]) for s, c in enumerate(copies) if c is not None]
            first, end = page_span(index, ident.nchunks)
            page_bits = bitarray(endian=ENDIAN)
            if len(good) == HEADER_SLOTS:
                seq, slot, payload = max(good)
                newest = max(newest, seq)
                page_bits.frombytes(payload)
            else:
                damaged.append(index)
                page_bits = zeros(end - first)
                page_bits.setall(1)
                slot = good[0][1] if good else 0
                newest = max([newest] + [g[0] for g in good])
            bits.extend(page_bits[:end - first])
            slots.append(slot)
        bitmap = cls(path, fd, header, slots, header_slot)
        bitmap._seq = newest
        return bitmap, bits, damaged

    # -- writing ---------------------------------------------------------------------

    def write_pages(self, pages: dict[int, bytes]) -> None:
        """Make ``pages`` (index -> payload) durable: one write each, one fdatasync."""
        self.stage_pages(pages)
        self.sync_staged()

    def stage_pages(self, pages: dict[int, bytes]) -> None:
        """Write ``pages`` to their spare slots; ``sync_staged`` makes them durable.

        Until then the previous copies stay the ones this object trusts. A page staged
        twice before a sync goes to the same spare slot, so the trusted copy is never
        overwritten. On error everything staged is dropped.
        """
        seq = self._seq + 1
        try:
            for index, payload in sorted(pages.items()):
                slot = 1 - self._slots[index]
                offset = PAGES_OFFSET + (index * HEADER_SLOTS + slot) * BLOCK
                _pwrite_all(self._fd, pack_page(index, seq, payload), offset)
                self._staged[index] = slot
        except OSError as exc:
            self._staged.clear()
            raise StateWriteError(
                f"cannot write bitmap {self.path}: {exc.strerror or exc}") from exc

    def sync_staged(self) -> None:
        try:
            os.fdatasync(self._fd)
        except OSError as exc:
            self._staged.clear()
            raise StateWriteError(
                f"cannot write bitmap {self.path}: {exc.strerror or exc}") from exc
        self._seq += 1
        for index, slot in self._staged.items():
            self._slots[index] = slot
        self._staged.clear()

    def set_generation(self, generation: int) -> None:
        self._write_header(generation=generation)

    def _write_header(self, flags: int | None = None, generation: int | None = None) -> None:
        self._seq += 1
        header = Header(self.header.identity, self._seq,
                        self.header.generation if generation is None else generation,
                        self.header.flags if flags is None else flags)
        slot = 1 - self._header_slot
        try:
            _pwrite_all(self._fd, header.pack(), slot * BLOCK)
            os.fdatasync(self._fd)
        except OSError as exc:
            raise StateWriteError(
                f"cannot write bitmap header {self.path}: {exc.strerror}") from exc
        self.header = header
        self._header_slot = slot

    def close(self, clean: bool) -> None:
        """Close; with ``clean`` the header records a clean shutdown."""
        try:
            if clean:
                self._write_header(flags=self.header.flags | FLAG_CLEAN)
        finally:
            os.close(self._fd)
            self._fd = -1


class _Invalid(Exception):
    """The saved bitmap cannot be trusted; the message says why."""


def _pwrite_all(fd: int, data: bytes, offset: int) -> None:
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, offset)
        if n <= 0:
            raise OSError(errno.EIO, "short write")
        view = view[n:]
        offset += n


def _keep_bad_copy(path: str) -> None:
    """Keep an untrusted bitmap beside the new one for inspection."""
    try:
        os.replace(path, f"{path}.bad-{time.strftime('%Y%m%dT%H%M%S')}")
    except OSError:
        pass
