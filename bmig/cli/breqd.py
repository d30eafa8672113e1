"""breqd: the daemon that keeps a durable dirty bitmap per tracked device.

The command only turns ``--config`` and flags into Settings and runs ``Breqd``; breqd's
rooms are put together in bmig/tracker/service.py, not here.
"""

from __future__ import annotations

import asyncio
import os

import click

from bmig import __version__
from bmig import log as bmig_log
from bmig.cli.common import add_verbosity, run
from bmig.config import Key, Schema, load_settings, merge
from bmig.constants import DEFAULT_CONFIG_DIR, DEFAULT_CONTROL_SOCKET, DEFAULT_STATE_DIR
from bmig.errors import ConfigError
from bmig.limits import DEFAULT_ACTIVITY_LOG, MAX_ACTIVITY_LOG
from bmig.tracker.service import Breqd, Settings


def _octal(value: str | int) -> int:
    try:
        mode = int(str(value), 8)
    except ValueError:
        raise ConfigError(f"socket mode {value!r} is not an octal mode like 0600") from None
    if not 0 <= mode <= 0o777:
        raise ConfigError(f"socket mode {value!r} is out of range")
    return mode


def _mode_text(value: str) -> str:
    """A mode as the file must write it: a string of octal digits, "0600"."""
    if not value.isascii() or not value.isdigit():
        raise ValueError(value)
    try:
        _octal(value)
    except ConfigError:
        raise ValueError(value) from None
    return value


# What --config may hold (the flags' long names, "_" for "-").
SCHEMA = Schema(
    Key.path("state_dir", default=DEFAULT_STATE_DIR),
    Key.path("config_dir", default=DEFAULT_CONFIG_DIR),
    Key.path("control", default=DEFAULT_CONTROL_SOCKET),
    Key.string("socket_mode", 'an octal mode from "0000" to "0777", as a string',
               _mode_text, default="0600"),
    Key.choice("log_level", bmig_log.LEVELS, default="info"),
    Key.integer("activity_log_chunks", 0, MAX_ACTIVITY_LOG, default=DEFAULT_ACTIVITY_LOG),
)
KEYS = SCHEMA.names


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--config", "config_file", metavar="FILE",
              help="TOML file with any of the settings below; flags override it.")
@click.option("--state-dir", metavar="DIR",
              help=f"Where bitmaps live [default: {DEFAULT_STATE_DIR}].")
@click.option("--config-dir", metavar="DIR",
              help=f"Device definitions, one TOML file each [default: {DEFAULT_CONFIG_DIR}].")
@click.option("--control", metavar="SOCK", envvar="BMIG_CONTROL",
              help=f"Control socket path (or BMIG_CONTROL, as for its clients) "
                   f"[default: {DEFAULT_CONTROL_SOCKET}].")
@click.option("--socket-mode", metavar="MODE", help="Control socket mode [default: 0600].")
@click.option("--log-level", type=click.Choice(bmig_log.LEVELS),
              help="Least severe message logged [default: info].")
@click.version_option(__version__, prog_name="breqd")
def breqd(config_file: str | None, **flags: str | None) -> None:
    """Keep a durable dirty bitmap for every tracked device."""
    values = SCHEMA.defaults()
    if config_file:
        values.update(load_settings(config_file, SCHEMA))
    values = merge(values, flags)
    bmig_log.setup(str(values["log_level"]))
    settings = Settings(state_dir=os.path.abspath(str(values["state_dir"])),
                        config_dir=os.path.abspath(str(values["config_dir"])),
                        control=os.path.abspath(str(values["control"])),
                        socket_mode=_octal(values["socket_mode"]),
                        activity_log_chunks=int(values["activity_log_chunks"]))
    asyncio.run(Breqd(settings).run())


add_verbosity(breqd, "info")


def main() -> None:
    run(breqd, "breqd")
