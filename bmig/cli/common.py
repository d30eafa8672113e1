"""What every command shares: the error handler, the breqd connection, output helpers,
-v and -q.

Nothing here does a command's work.
"""

from __future__ import annotations

import functools
import json
import os
import sys
import time
from typing import Any, Callable

import click

from bmig import log as bmig_log
from bmig.config import parse_size
from bmig.constants import DEFAULT_CONTROL_SOCKET
from bmig.errors import EXIT_ERROR, BmigError, ConfigError
from bmig.log import error_line
from bmig.tracker.blocking_client import TrackerClient


# Set by --json (``json_option``): errors are also an "error" event on stdout, unless the
# command printed its one JSON result already (``print_json``: verify's, say, whose exit
# status says the rest), so that such output stays one JSON document.
_json_errors = False
_result_printed = False


def run(command: click.BaseCommand, prog: str) -> None:
    """Run a click command; turn every BmigError into one line and its exit code (and,
    after --json, into an "error" event on stdout as well)."""
    try:
        rv = command.main(prog_name=prog, standalone_mode=False)
    except click.ClickException as exc:
        click.echo(usage_line(exc, prog), err=True)
        sys.exit(exc.exit_code)
    except click.exceptions.Abort:
        click.echo(f"{prog}: interrupted", err=True)
        sys.exit(130)
    except BmigError as exc:
        click.echo(error_line(f"{prog}: {exc.message}"), err=True)
        if _json_errors and not _result_printed:
            error_event(exc.message, exc.exit_code)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        click.echo(f"{prog}: interrupted", err=True)
        sys.exit(130)
    except BrokenPipeError:
        sys.exit(EXIT_ERROR)
    sys.exit(rv if isinstance(rv, int) else 0)


def usage_line(exc: click.ClickException, prog: str) -> str:
    """A usage error as one line: ``bmigrate: no such option: --x (see bmigrate sync
    --help)``."""
    message = " ".join(exc.format_message().split()).rstrip(".")
    message = message[:1].lower() + message[1:]
    ctx = getattr(exc, "ctx", None)
    where = ctx.command_path if ctx is not None else prog
    return f"{prog}: {message} (see {where} --help)"


def error_event(message: str, exit_code: int, **fields: Any) -> None:
    """The "error" event of --json: the message and the exit status, on stdout."""
    sys.stdout.write(json.dumps({"event": "error", "message": message,
                                 "exit_code": exit_code, "time": round(time.time(), 3),
                                 **fields}, sort_keys=True) + "\n")
    sys.stdout.flush()


def control_option(f: Callable) -> Callable:
    return click.option(
        "--control", metavar="SOCK", envvar="BMIG_CONTROL", default=DEFAULT_CONTROL_SOCKET,
        show_default=True, help="breqd's control socket (or BMIG_CONTROL).")(f)


def _json_given(ctx: click.Context, param: click.Parameter, value: bool) -> bool:
    global _json_errors
    if value:
        _json_errors = True
    return value


def json_option(f: Callable) -> Callable:
    return click.option("--json", "as_json", is_flag=True, callback=_json_given,
                        help="Print JSON for scripts instead of text; errors too.")(f)


def add_verbosity(command: click.Command, default: str = "warning") -> None:
    """-v/--verbose and -q/--quiet on ``command`` and every command below it that has
    no --log-level of its own (sync, run, cutover, replicate: the one way to say it
    there, as a migration file's log_level): each -v logs one level more than
    ``default`` (info, then debug), each -q one level less (warning, then error only).
    On a daemon, given to it directly, they stand in for its --log-level and may not be
    given with it."""
    if isinstance(command, click.Group):
        for sub in command.commands.values():
            if not any(p.name == "log_level" for p in sub.params):
                add_verbosity(sub, default)       # one way: its own --log-level
        return
    if any(p.name == "verbose" for p in command.params):
        return
    levels = bmig_log.LEVELS
    at = levels.index(default)
    more = " (-vv: ".join(levels[:at][::-1]) + ")" * (at > 1)
    worse = {"info": "info, warnings and errors", "warning": "warnings and errors",
             "error": "errors"}
    less = " (-qq: ".join(worse[name] for name in levels[at + 1:]) \
        + ")" * (len(levels) - at > 2)
    command.params += [
        click.Option(["-v", "--verbose"], count=True,
                     help=f"Log more: down to {more} [default: {default}]."),
        click.Option(["-q", "--quiet"], count=True, help=f"Log less: only {less}."),
    ]
    callback = command.callback
    assert callback is not None

    @functools.wraps(callback)
    def with_verbosity(*args: Any, verbose: int = 0, quiet: int = 0, **kwargs: Any) -> Any:
        if verbose or quiet:
            if kwargs.get("log_level") is not None:
                raise click.UsageError("give --log-level or -v/-q, not both")
            levels = bmig_log.LEVELS
            index = levels.index(default) - verbose + quiet
            level = levels[max(0, min(len(levels) - 1, index))]
            if "log_level" in kwargs:
                kwargs["log_level"] = level
            else:
                bmig_log.setup(level)
        return callback(*args, **kwargs)
    command.callback = with_verbosity


def connect(control: str) -> TrackerClient:
    """The one way a command reaches breqd."""
    return TrackerClient(control, client="bmigrate")


def print_json(value: Any) -> None:
    """A command's one JSON result."""
    global _result_printed
    _result_printed = True
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
