"""The installed ``bmigrate`` command.

Two costs of a short command that are the interpreter's, not bmig's, are skipped:

- Python's cyclic garbage collector runs about sixty times while bmigrate's modules and
  their libraries are imported, and finds nothing to free: imports make no cyclic
  garbage. It sleeps until the command's module is loaded (4-8 ms of a sync with nothing
  to ship), then runs as usual for the command's work.
- At exit, the interpreter frees every module's objects one by one (15-40 ms measured),
  which the kernel does at once. Once the command has returned and no thread is left to
  finish (daemon threads, which Python's exit does not wait for either, do not count),
  the exit handlers run (logging's flush), standard output and error are flushed, and
  the process ends with ``os._exit``. Anything else (a thread still running, an
  exit status that is not a number, a flush that fails) takes Python's usual way out.
"""

from __future__ import annotations

import atexit
import gc
import os
import sys
import threading
from typing import NoReturn


def main() -> None:
    gc.disable()
    try:
        from bmig.cli import main as bmigrate
        bmigrate.load_named_command(sys.argv[1:])
    finally:
        gc.enable()
    try:
        bmigrate.main()
    except SystemExit as done:
        leave(done.code)
    leave(0)


def leave(code: object) -> NoReturn:
    """End the process with ``code`` without the interpreter's teardown, when that is
    safe; otherwise as ``sys.exit`` would."""
    if code is None:
        code = 0
    if not isinstance(code, int) or _threads_with_work():
        raise SystemExit(code)
    atexit._run_exitfuncs()         # what the interpreter's exit would run first
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except Exception:               # a closed pipe, say: Python reports it as it would
        raise SystemExit(code) from None
    os._exit(code & 0xFF)


def _threads_with_work() -> bool:
    """Threads Python's exit would wait for: any but the main one and daemon threads
    (which it does not wait for: bmig.signalrelay's, a connection's reader)."""
    main = threading.main_thread()
    return any(t is not main and not t.daemon and t.is_alive() for t in threading.enumerate())
