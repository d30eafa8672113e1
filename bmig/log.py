"""Logging to stderr, with syslog priorities when stderr is the journal.

systemd connects a service's stderr to the journal and says so in JOURNAL_STREAM
("DEVICE:INODE" of that stream). Only when stderr is that very stream (a child whose
stderr was redirected elsewhere inherits the variable, and must not use it) does a line
start with its priority, ``<3>`` for an error, ``<4>`` for a warning, ``<5>`` for a
notice (sd-daemon(3)), so that ``journalctl -p err`` finds it; journald takes the
program's name and the time from the stream itself. Anywhere else a line reads
``bmigrate: WARNING: message``.

NOTICE (between INFO and WARNING) is for changes of state an operator wants in the
journal without being warned: connected, caught up, stopped.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import TextIO

from bmig.errors import ConfigError

LEVELS = ("debug", "info", "warning", "error")

NOTICE = 25
logging.addLevelName(NOTICE, "NOTICE")

# Python's levels as syslog priorities (sd-daemon(3)'s SD_ERR, SD_WARNING ...).
_PRIORITY = {logging.DEBUG: 7, logging.INFO: 6, NOTICE: 5, logging.WARNING: 4,
             logging.ERROR: 3, logging.CRITICAL: 2}


def priority(levelno: int) -> int:
    """The syslog priority of a logging level (a level between two takes the lower's)."""
    best = 7
    for level, prio in sorted(_PRIORITY.items()):
        if levelno >= level:
            best = prio
    return best


def is_journal(stream: TextIO | None = None) -> bool:
    """Whether ``stream`` (stderr by default) is the journal stream JOURNAL_STREAM names:
    the same device and inode, not merely the variable set."""
    value = os.environ.get("JOURNAL_STREAM", "")
    device, sep, inode = value.partition(":")
    if not sep or not device.isdigit() or not inode.isdigit():
        return False
    try:
        st = os.fstat((stream or sys.stderr).fileno())
    except (OSError, ValueError, AttributeError):
        return False
    return st.st_dev == int(device) and st.st_ino == int(inode)


def with_priority(text: str, levelno: int, journal: bool) -> str:
    """``text`` as it goes to stderr: each line with its priority prefix when stderr is
    the journal (journald reads the prefix line by line)."""
    if not journal:
        return text
    prefix = f"<{priority(levelno)}>"
    return "\n".join(prefix + line for line in text.split("\n"))


def error_line(text: str, levelno: int = logging.ERROR) -> str:
    """A line written to stderr outside logging (the one-line error of a command that
    fails), with its priority when stderr is the journal."""
    return with_priority(text, levelno, is_journal())


class _JournalFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return with_priority(super().format(record), record.levelno, True)


def setup(level: str = "info") -> None:
    """Send log records to stderr: ``breqd: WARNING: message``, or ``<4>message`` when
    stderr is the journal."""
    if level.lower() not in LEVELS:
        raise ConfigError(f"log level {level!r} is not one of {', '.join(LEVELS)}")
    handler = logging.StreamHandler(sys.stderr)
    if is_journal(sys.stderr):
        handler.setFormatter(_JournalFormatter("%(message)s"))
    else:
        handler.setFormatter(logging.Formatter("%(name)s: %(levelname)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for noisy in ("watchdog", "asyncio"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
