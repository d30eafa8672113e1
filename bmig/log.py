"""Logging to stderr, with syslog priorities when stderr is the journal."""

from __future__ import annotations

import logging
import os
import sys

from bmig.errors import ConfigError

LEVELS = ("debug", "info", "warning", "error")

_PRIORITY = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3,
             logging.CRITICAL: 2}


class _JournalFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return f"<{_PRIORITY.get(record.levelno, 6)}>{super().format(record)}"


def setup(level: str = "info") -> None:
    """Send log records to stderr: ``breqd: warning: message``."""
    handler = logging.StreamHandler(sys.stderr)
    if os.environ.get("JOURNAL_STREAM"):
        handler.setFormatter(_JournalFormatter("%(message)s"))
    else:
        handler.setFormatter(logging.Formatter("%(name)s: %(levelname)s: %(message)s"))
    if level.lower() not in LEVELS:
        raise ConfigError(f"log level {level!r} is not one of {', '.join(LEVELS)}")
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for noisy in ("watchdog", "asyncio"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
