"""What every command shares: the error handler, the breqd connection, output helpers.

Nothing here does a command's work.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any, Callable

import click

from bmig.config import parse_size
from bmig.constants import DEFAULT_CONTROL_SOCKET
from bmig.errors import EXIT_ERROR, BmigError, ConfigError
from bmig.log import error_line
from bmig.tracker.blocking_client import TrackerClient


def run(command: click.BaseCommand, prog: str) -> None:
    """Run a click command; turn every BmigError into one line and its exit code."""
    try:
        rv = command.main(prog_name=prog, standalone_mode=False)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except click.exceptions.Abort:
        click.echo(f"{prog}: interrupted", err=True)
        sys.exit(130)
    except BmigError as exc:
        click.echo(error_line(f"{prog}: {exc.message}"), err=True)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        click.echo(f"{prog}: interrupted", err=True)
        sys.exit(130)
    except BrokenPipeError:
        sys.exit(EXIT_ERROR)
    sys.exit(rv if isinstance(rv, int) else 0)


def control_option(f: Callable) -> Callable:
    return click.option(
        "--control", metavar="SOCK", envvar="BMIG_CONTROL", default=DEFAULT_CONTROL_SOCKET,
        show_default=True, help="breqd's control socket (or BMIG_CONTROL).")(f)


def json_option(f: Callable) -> Callable:
    return click.option("--json", "as_json", is_flag=True,
                        help="Print JSON for scripts instead of text.")(f)


def connect(control: str) -> TrackerClient:
    """The one way a command reaches breqd."""
    return TrackerClient(control, client="bmigrate")


def print_json(value: Any) -> None:
    click.echo(json.dumps(value, indent=None, sort_keys=True))


class SizeType(click.ParamType):
    """Bytes, with optional binary units: 4096, 64K, 10G, 1TiB."""

    name = "BYTES"

    def convert(self, value: Any, param: Any, ctx: Any) -> int:
        try:
            return parse_size(value)
        except ConfigError as exc:
            self.fail(exc.message, param, ctx)


SIZE = SizeType()


def size_of(path: str) -> int:
    """The size of a file or block device, in bytes."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError as exc:
        raise ConfigError(f"cannot open {path}: {exc.strerror}") from None
    try:
        return os.lseek(fd, 0, os.SEEK_END)
    finally:
        os.close(fd)


def host_port(value: str, option: str, default_host: str = "0.0.0.0",
              any_port: bool = False) -> tuple[str, int]:
    """``HOST:PORT`` (``[::1]:PORT`` for IPv6; an empty host means every address);
    with ``any_port``, port 0 asks for any free one."""
    host, sep, port = str(value).rpartition(":")
    low = 0 if any_port else 1
    if not sep or not port.isdigit() or not low <= int(port) < 65536:
        raise ConfigError(f"{option} {value!r}: expected HOST:PORT, e.g. 127.0.0.1:10810")
    return host.strip("[]") or default_host, int(port)


def human_bytes(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if value < 1024 or unit == "PiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{n} B"
