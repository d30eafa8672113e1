"""dm-era as bmig uses it: its table, its status line, its metadata, era_invalidate.

dm-era (drivers/md/dm-era-target.c) splits the origin into blocks and keeps, per block,
the era in which it was last written; ``era_invalidate --written-since E`` lists the
blocks written in era E or later. Era 0 means "never written", so the first era a table
starts in is 1 or more.
"""

from __future__ import annotations

import subprocess
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from typing import Iterator

from bmig.constants import MiB
from bmig.dm import dmsetup
from bmig.errors import InterceptError

SECTOR = 512
MIN_BLOCK_SECTORS = 8               # dm-era: a block is a multiple of 4 KiB
INVALIDATE_TIMEOUT = 600.0


def table_line(sectors: int, metadata: str, origin: str, block_sectors: int) -> str:
    return f"0 {sectors} era {metadata} {origin} {block_sectors}"


@dataclass(frozen=True)
class EraStatus:
    metadata_block_sectors: int
    used_blocks: int
    total_blocks: int
    era: int
    held_root: str | None           # a metadata snapshot being held, or None


def parse_status(line: str) -> EraStatus:
    """``0 LEN era <md block size> <used>/<total> <current era> <held root or ->``."""
    fields = line.split()
    if len(fields) < 7 or fields[2] != "era":
        raise InterceptError(f"not a dm-era status line: {line!r}")
    used, _, total = fields[4].partition("/")
    return EraStatus(int(fields[3]), int(used), int(total), int(fields[5]),
                     None if fields[6] == "-" else fields[6])


def status(name: str) -> EraStatus:
    lines = dmsetup.status(name)
    if len(lines) != 1:
        raise InterceptError(f"{name}: expected one dm-era target, got {len(lines)} lines")
    return parse_status(lines[0])


def nr_blocks(size: int, block_sectors: int) -> int:
    """dm-era counts a last, partial block as a block (dm_sector_div_up)."""
    block = block_sectors * SECTOR
    return (size + block - 1) // block


def metadata_bytes(size: int, block_sectors: int) -> int:
    """What the metadata device needs: 4 MiB for the superblock, space maps and btrees,
    and per block its era (4 bytes in the era array) and its bits in the current and
    archived writesets, doubled for the copies a metadata snapshot keeps alive while
    an import reads it. Rounded up to a MiB."""
    need = 4 * MiB + 16 * nr_blocks(size, block_sectors)
    return -(-need // MiB) * MiB


def written_since(era: int, metadata: str, snapshot: bool = True) -> Iterator[tuple[int, int]]:
    """Runs [begin, end) of blocks written in ``era`` or later, read from the metadata
    snapshot (``snapshot``) or, when no table uses the metadata, from its live roots.
    Streamed: memory does not grow with the number of blocks."""
    argv = ["era_invalidate", "--written-since", str(era)]
    if snapshot:
        argv.append("--metadata-snapshot")
    argv.append(metadata)
    try:
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                stdin=subprocess.DEVNULL)
    except FileNotFoundError:
        raise InterceptError("era_invalidate is not installed (Debian: apt-get install "
                             "thin-provisioning-tools)") from None
    assert proc.stdout is not None and proc.stderr is not None
    finished = False
    try:
        try:
            for _, element in ET.iterparse(proc.stdout, events=("end",)):
                if element.tag == "block":
                    block = int(element.get("block", ""))
                    yield block, block + 1
                elif element.tag == "range":
                    begin, end = int(element.get("begin", "")), int(element.get("end", ""))
                    if not 0 <= begin < end:
                        raise InterceptError(f"era_invalidate: bad range {begin}-{end}")
                    yield begin, end
                element.clear()
        except (ET.ParseError, ValueError) as exc:
            error = proc.stderr.read().decode(errors="replace").strip()
            raise InterceptError(f"era_invalidate on {metadata} failed: "
                                 f"{error.splitlines()[-1] if error else exc}") from None
        finished = True
    finally:
        if not finished:
            proc.kill()
        try:
            rc = proc.wait(timeout=INVALIDATE_TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            rc = proc.wait()
        error = proc.stderr.read().decode(errors="replace").strip()
        proc.stdout.close()
        proc.stderr.close()
    if rc != 0:
        raise InterceptError(f"era_invalidate on {metadata} failed: "
                             f"{error.splitlines()[-1] if error else f'exit status {rc}'}")


def block_runs_to_bytes(runs: Iterator[tuple[int, int]], block_sectors: int,
                        size: int) -> Iterator[tuple[int, int]]:
    """(offset, length) byte ranges of block runs, merged where they touch, clipped to
    the device (the last block may be partial)."""
    block = block_sectors * SECTOR
    pending: tuple[int, int] | None = None
    for begin, end in runs:
        start, stop = begin * block, min(end * block, size)
        if start >= size:
            continue
        if pending is not None and pending[1] == start:
            pending = (pending[0], stop)
            continue
        if pending is not None:
            yield pending[0], pending[1] - pending[0]
        pending = (start, stop)
    if pending is not None:
        yield pending[0], pending[1] - pending[0]
