"""The installed ``bmigrate`` command.

Python's cyclic garbage collector runs about sixty times while bmigrate's modules and
their libraries are imported, and finds nothing to free: imports make no cyclic garbage.
It sleeps until the command's module is loaded (4-8 ms of a sync with nothing to ship,
which takes about a tenth of a second), then runs as usual for the command's work.
"""

from __future__ import annotations

import gc
import sys


def main() -> None:
    gc.disable()
    try:
        from bmig.cli import main as bmigrate
        bmigrate.load_named_command(sys.argv[1:])
    finally:
        gc.enable()
    bmigrate.main()
