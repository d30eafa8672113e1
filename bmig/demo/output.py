"""What the demo prints: headed steps and indented details (commands shown as typed),
the last lines of a log, an error's reason, one line per pass of a sync.

It writes to the stream it is given and reads only logs; it starts nothing.
"""

from __future__ import annotations

import os
import shlex
from typing import Any, TextIO

from bmig.cli.common import human_bytes
from bmig.demo.settings import DEVICE, STEPS, bin_dir
from bmig.errors import BmigError


class Out:
    """Headed step lines and details, on stdout (or stderr when stdout carries JSON)."""

    def __init__(self, stream: TextIO):
        self.stream = stream

    def step(self, number: int, title: str) -> None:
        self.line(f"\n[{number}/{STEPS}] {title}")

    def detail(self, text: str) -> None:
        self.line(f"      {text}")

    def command(self, argv: list[str]) -> None:
        self.detail("$ " + shlex.join([_short(argv[0]), *argv[1:]]))

    def line(self, text: str) -> None:
        self.stream.write(text + "\n")
        self.stream.flush()


def _short(program: str) -> str:
    """The venv's ``.../bin/bmigrate`` as ``bmigrate``."""
    return os.path.basename(program) if os.path.dirname(program) == bin_dir() else program


def tail(path: str, lines: int = 20) -> str:
    try:
        with open(path, errors="replace") as f:
            return "".join(f.readlines()[-lines:])
    except OSError:
        return ""


def reason(exc: BaseException) -> str:
    return exc.message if isinstance(exc, BmigError) else f"{type(exc).__name__}: {exc}"


def pass_line(e: dict[str, Any]) -> str:
    return (f"{DEVICE}: pass {e['passes']}: {human_bytes(e['bytes_committed'])} in "
            f"{e['seconds']:.1f} s, sent {human_bytes(e['bytes_sent'])}, zeros "
            f"{human_bytes(e['bytes_zero'])}; {human_bytes(e['dirty_bytes'])} dirty")
