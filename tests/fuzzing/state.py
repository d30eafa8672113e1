"""Drivers for the state files: breqd's bitmap file (invariant 4: a file that cannot be
trusted is repaired or replaced by an all-dirty one, never read as fewer dirty chunks),
and the lineage and target records (bmig/lineage.py, bmig/identity.py: a damaged record
is never guessed at)."""

from __future__ import annotations

import json
import os
import zlib

from bitarray import bitarray

from bmig.errors import BmigError
from bmig.lineage import (ROLES, TARGET_STATES, SourceLineage, TargetRecord, load_source,
                          load_target, relation, save_source, save_target, source_path,
                          target_path)
from bmig.identity import TargetIdentity
from bmig.tracker.chunks import zeros
from bmig.tracker.store import (BITS_PER_PAGE, BLOCK, HEADER_SLOTS, PAGE_HEADER_SIZE,
                                PAGES_OFFSET, BitmapFile, Identity, _CRC, _HEADER,
                                _PAGE_HEADER, page_span)
from tests.fuzzing.engine import Driver, Field, Frame, Seed, Violation, normalize, seed

IDENTITIES = (Identity(0xA1, 3 * BITS_PER_PAGE * 4096 - 100, 4096),
              Identity(0xA2, 1 << 20, 65536))
MODES = ("as-is", "header-crc-fixed", "all-crc-fixed")


_TRUTH: dict[Identity, bitarray] = {}


def truth(ident: Identity) -> bitarray:
    """The dirty bits every seed of ``ident`` ends with (not to be changed)."""
    if ident not in _TRUTH:
        bits = zeros(ident.nchunks)
        bits[::7] = 1
        bits[ident.nchunks // 3:ident.nchunks // 3 + 50] = 1
        _TRUTH[ident] = bits
    return _TRUTH[ident]


def _fix_crcs(data: bytearray, pages: bool) -> None:
    """Recompute the checksums a mutation broke, so that the checks behind them run."""
    for slot in range(HEADER_SLOTS):
        at = slot * BLOCK
        if at + _HEADER.size + _CRC.size <= len(data):
            _CRC.pack_into(data, at + _HEADER.size, zlib.crc32(data[at:at + _HEADER.size]))
    if not pages:
        return
    at = PAGES_OFFSET
    while at + BLOCK <= len(data):
        payload_crc = zlib.crc32(data[at + PAGE_HEADER_SIZE:at + BLOCK])
        head = bytearray(data[at:at + _PAGE_HEADER.size])
        head[-4:] = payload_crc.to_bytes(4, "little")
        data[at:at + _PAGE_HEADER.size] = head
        _CRC.pack_into(data, at + _PAGE_HEADER.size, zlib.crc32(head))
        at += BLOCK


class Bitmap(Driver):
    name = "bitmap"
    what = "breqd's bitmap file opened after damage: repaired or all dirty (bmig/tracker/store.py)"
    allowed = (BmigError,)
    dictionary = [b"BMIGBMAP", b"BPG1", b"\x01\x00\x00\x00", b"\xff" * 8, b"\x00" * 8,
                  b"\x00" * 4096]
    max_size = 64 * 1024

    def __init__(self, workdir: str):
        super().__init__(workdir)
        self.dir = os.path.join(workdir, "bitmaps")
        os.makedirs(self.dir, exist_ok=True)
        self.path = os.path.join(self.dir, "d.bitmap")

    def _clear(self) -> None:
        for name in os.listdir(self.dir):
            os.unlink(os.path.join(self.dir, name))

    def seeds(self) -> list[Seed]:
        out = []
        for which, ident in enumerate(IDENTITIES):
            final = truth(ident)
            for history, more in ((0, True), (1, True), (2, True), (1, False), (2, False)):
                for clean in (True, False):
                    self._clear()
                    bitmap, bits, _ = BitmapFile.open(self.path, ident)
                    # Every page is written towards ``final`` from states that held more
                    # dirty bits (``more``) or fewer: then the older copy of a page, still
                    # in the file, holds fewer than the newest, and trusting it when the
                    # newest is damaged would be reading fewer dirty chunks than there are.
                    for step in range(history + 1):
                        bits = final.copy()      # truth() is shared: never change it
                        if step < history:
                            bits[step::3 if more else 5] = more
                        for index in range(ident.npages):
                            if (index + step) % 2 or step == history:
                                first, end = page_span(index, ident.nchunks)
                                bitmap.write_pages({index: bits[first:end].tobytes()})
                    bitmap.close(clean)
                    with open(self.path, "rb") as f:
                        data = f.read()
                    fields = tuple(Field(slot * BLOCK + off, width) for slot in range(2)
                                   for off, width in ((8, 4), (12, 8), (20, 8), (28, 8),
                                                      (36, 4), (40, 8), (56, 4)))
                    out.append(seed(f"{which}-{history}-{more}-{clean}",
                                    Frame(bytes([which])), Frame(data, fields)))
        self._clear()
        return out

    def run(self, data: bytes) -> str | None:
        config = data[0] if data else 0
        ident = IDENTITIES[config % len(IDENTITIES)]
        mode = MODES[config // len(IDENTITIES) % len(MODES)]
        body = bytearray(data[1:])
        if mode != "as-is":
            _fix_crcs(body, pages=mode == "all-crc-fixed")
        self._clear()
        with open(self.path, "wb") as f:
            f.write(body)
        bitmap, bits, reason = BitmapFile.open(self.path, ident)
        bitmap.close(clean=False)
        if len(bits) != ident.nchunks:
            raise Violation(f"{len(bits)} bits for {ident.nchunks} chunks")
        if mode == "as-is" and (truth(ident) & ~bits).any():
            raise Violation(f"a damaged file was read as fewer dirty chunks (reason: {reason})")
        again, bits2, reason2 = BitmapFile.open(self.path, ident)
        again.close(clean=False)
        if reason2 is not None or bits2 != bits:
            raise Violation(f"the file was not repaired: reopened, {reason2}")
        return normalize(reason) if reason else None


# -- lineage and target records --------------------------------------------------------------

RECORD_TOKENS = [b"1e999", b"-1e999", b"NaN", b"-Infinity", b"null", b"true", b"[]", b"{}",
                 b'"0000000000000000"', b'"00000000000000a1"', b'"zzzzzzzzzzzzzzzz"',
                 b'"primary"', b'"handed-over"', b'"secondary"', b'"consistent"',
                 b'"in-sync"', b"18446744073709551616", b"-5", b"[" * 40, b"[" * 20000, b"\"\\ud800\"",
                 b'{"kind": "file", "size": 1, "dev": 1, "ino": 1}',
                 b'{"kind": "block", "size": 1, "rdev": "8:0", "stable_id": "x"}',
                 b'"previous": 5', b'"previous": "abc"', b'"identity": 7', b'"size": "x"']


class Records(Driver):
    name = "records"
    what = "lineage (NAME.lineage) and target (EXPORT.target) records (bmig/lineage.py, identity.py)"
    allowed = (BmigError,)
    dictionary = RECORD_TOKENS
    max_size = 64 * 1024

    def __init__(self, workdir: str):
        super().__init__(workdir)
        self.dir = os.path.join(workdir, "records")
        os.makedirs(self.dir, exist_ok=True)

    def _clear(self) -> None:
        for name in os.listdir(self.dir):
            os.unlink(os.path.join(self.dir, name))

    def seeds(self) -> list[Seed]:
        out = []
        self._clear()
        save_source(self.dir, "vm1", SourceLineage(0xA1, 0xB1))
        save_source(self.dir, "vm2", SourceLineage(0xA1, 0xB2, "handed-over",
                                                   ["00000000000000b0"], 0xB3))
        for name in ("vm1", "vm2"):
            with open(source_path(self.dir, name), "rb") as f:
                out.append(seed(f"lineage-{name}", b"\x00", f.read()))
        identity = TargetIdentity("file", 4096, dev=2049, ino=12, inode_generation=77)
        block = TargetIdentity("block", 1 << 30, rdev="253:1", stable_id="dm-uuid:LVM-x")
        for i, record in enumerate((
                TargetRecord("a"),
                TargetRecord("a", 0xA1, 0xB1, "consistent", "secondary", 4096, 1.5e9, 3,
                             ["00000000000000b0"], 0, None, identity),
                TargetRecord("a", 0xA1, 0xB1, "in-sync", "primary", 1 << 30, None, 0, [],
                             0, 1.7e9, block),
                TargetRecord("a", 0xA1, 0xB1, "consistent", "handed-over", 4096, 1.0, 1,
                             [], 0xB4, None, identity))):
            save_target(self.dir, record)
            with open(target_path(self.dir, "a"), "rb") as f:
                out.append(seed(f"target-{i}", b"\x01", f.read()))
        self._clear()
        return out

    def run(self, data: bytes) -> None:
        self._clear()
        target = bool(data[0] & 1) if data else False
        path = target_path(self.dir, "a") if target else source_path(self.dir, "vm1")
        with open(path, "wb") as f:
            f.write(data[1:])
        if target:
            self._target()
        else:
            self._source()

    def _source(self) -> None:
        record, why = load_source(self.dir, "vm1", 0xA1)
        if why is None:
            if record.device_id != 0xA1 or record.role not in ROLES:
                raise Violation(f"trusted a lineage record with device id "
                                f"{record.device_id:#x}, role {record.role!r}")
            _ids(record.previous)
        again, why2 = load_source(self.dir, "vm1", 0xA1)
        if why2 is not None or again != record:
            raise Violation(f"the lineage record was not replaced by a good one: {why2}")

    def _target(self) -> None:
        record = load_target(self.dir, "a")
        if record.state not in TARGET_STATES or record.role not in ROLES:
            raise Violation(f"trusted a target record in state {record.state!r}, role "
                            f"{record.role!r}")
        if record.size < 0 or record.passes < 0:
            raise Violation(f"trusted a target record of {record.size} bytes, "
                            f"{record.passes} passes")
        _ids(record.previous)
        relation(record, 0xA1, 0xB1, [0xB0])
        record.not_bound_to(TargetIdentity("file", 4096, dev=2049, ino=12))
        json.loads(json.dumps(record.to_json()))
        save_target(self.dir, record)
        if json.dumps(load_target(self.dir, "a").to_json()) != json.dumps(record.to_json()):
            raise Violation("a target record does not read back as it was saved")


def _ids(values: list[str]) -> None:
    for value in values:
        if not (isinstance(value, str) and len(value) == 16
                and all(c in "0123456789abcdefABCDEF" for c in value)):
            raise Violation(f"trusted a generation {value!r} in previous")


DRIVERS = (Bitmap, Records)
