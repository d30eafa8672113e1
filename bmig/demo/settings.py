"""What the demo is given: its names, sizes and timeouts, its command line, and the
error a step raises.

Everything here is plain data and argument parsing; it starts nothing and prints nothing.
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass

from bmig.config import parse_size
from bmig.constants import KiB, MiB
from bmig.errors import BmigError
from bmig.processes import Child

DEVICE = "src"                      # the device's name in breqd and the export's in breceive
STEPS = 8
START_TIMEOUT = 30.0                # seconds for a daemon to say READY=1
STOP_TIMEOUT = 20.0                 # seconds between SIGTERM and SIGKILL
# bmigrate sync stopped in a pass waits for acknowledgements of frames it never sent,
# up to its 300 s ACK_TIMEOUT; the demo does not wait that long before SIGKILL.
SYNC_STOP_TIMEOUT = 5.0
SYNC_TIMEOUT = 600.0
BLOCK = 4 * KiB                     # the image's block size, and the writer's alignment
MAX_WRITE = 64 * KiB
MIN_SIZE = 32 * MiB
# The live sync's --bwlimit: a 20 MB/s link, so that its passes can be watched (on one
# machine it ships at hundreds of MB/s and would be over before a bar is drawn).
LINK = "20M"


class DemoError(Exception):
    """A step failed; ``daemon`` is the one whose log explains it, if any."""

    def __init__(self, message: str, daemon: Child | None = None, log: str | None = None):
        super().__init__(message)
        self.daemon = daemon
        self.log = log


@dataclass(frozen=True)
class Profile:
    """How big the demo is: the image, the real files in it, the writer's file and pace."""

    size: int
    file_budget: int
    workload: int
    write_rate: int                 # bytes per second
    bwlimit: str = LINK             # bmigrate sync --bwlimit while the writer runs


def profile(size: int | None, quick: bool) -> Profile:
    if quick and size is None:
        return Profile(64 * MiB, 20 * MiB, 8 * MiB, 1 * MiB)
    size = size or 768 * MiB
    if size < MIN_SIZE:
        raise DemoError(f"--size {size} is too small: give at least {MIN_SIZE // MiB}M")
    size -= size % BLOCK
    workload = max(4 * MiB, min(64 * MiB, size // 12 // MiB * MiB))
    return Profile(size, int(size * 0.45), workload, 1 * MiB if quick else 3 * MiB)


def _size(text: str) -> int:
    try:
        return parse_size(text)
    except BmigError as exc:
        raise argparse.ArgumentTypeError(exc.message) from None


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bmig.demo",
        description="Copy a live ext4 image to a local breceive with bmigrate sync while it "
                    "is written, then prove the copy identical.")
    parser.add_argument("--size", type=_size, metavar="SIZE",
                        help="image size, e.g. 512M or 1G [default: 768M; 64M with --quick]")
    parser.add_argument("--keep", action="store_true",
                        help="keep the temporary directory (images, state, logs)")
    parser.add_argument("--quick", action="store_true",
                        help="a small image and a slow writer: a few seconds")
    parser.add_argument("--json", action="store_true",
                        help="print the final summary as JSON on stdout (steps on stderr)")
    return parser.parse_args(argv)


def bin_dir() -> str:
    """Where the running Python's scripts are: the venv's bin, with bmig's commands."""
    return os.path.dirname(sys.executable)
