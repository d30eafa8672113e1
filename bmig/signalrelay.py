"""Signals acted on by a thread of their own, never by a handler that takes a lock.

Python runs a signal's handler in the main thread between two of its bytecodes, which
may be inside ``threading.Event.wait`` or ``set`` on the very event the handler would
set. Event's lock is not reentrant: a handler that sets the event there waits for the
main thread, which waits for the handler, for ever (a SIGTERM that never stops the
command; the service manager kills it in the end). So the handler installed here does
nothing: ``signal.set_wakeup_fd`` writes the signal's number into a pipe (in C, with no
lock), and a daemon thread reads the pipe and runs the action for it, where taking a
lock is as safe as anywhere.

One relay per process (the wake-up fd is the process's). A handler that must act in
the main thread (raise KeyboardInterrupt to stop at once) is given as ``in_main``: it
runs in the handler and may only read plain attributes.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from typing import Any, Callable

log = logging.getLogger("bmig")


def relay(actions: dict[int, Callable[[], None]],
          in_main: dict[int, Callable[[], None]] | None = None) -> None:
    """From now on, each signal of ``actions`` runs its action in the relay thread (and
    first, in the handler, its ``in_main`` callable, if any)."""
    reader, writer = os.pipe2(os.O_CLOEXEC)
    os.set_blocking(writer, False)
    signal.set_wakeup_fd(writer, warn_on_full_buffer=False)
    in_main = in_main or {}
    for signum in actions:
        signal.signal(signum, _handler(in_main.get(signum)))
    threading.Thread(target=_run, args=(reader, actions), name="signals",
                     daemon=True).start()


def _handler(in_main: Callable[[], None] | None) -> Callable[[int, Any], None]:
    def handler(signum: int, frame: Any) -> None:
        if in_main is not None:
            in_main()
    return handler


def _run(reader: int, actions: dict[int, Callable[[], None]]) -> None:
    while True:
        for signum in os.read(reader, 64):
            action = actions.get(signum)
            if action is None:
                continue
            try:
                action()
            except Exception:       # noqa: BLE001 - the next signal must still be heard
                log.exception("acting on signal %d failed", signum)
