"""bmigrate's settings: what sync, run, cutover, status, verify and replicate share.

A migration is described by a dict of values with the flags' long names ("_" for "-"):
from a migration file (``SCHEMA``, one migration per TOML file) with the flags given on
top (``settings_from``). ``build`` checks them and makes the ``Migration``;
``apply_reloadable`` and ``reload`` are what SIGHUP changes in a running one;
``replica_options`` is what a ``replicate`` request to bmig-nbd carries. No click and
no printing here (bmig.cli parses and prints), and nothing connects.
"""

from __future__ import annotations

import os
import re
from typing import Any, Callable, Mapping

from bmig import log as bmig_log
from bmig.config import Key, Schema, load_settings, parse_size
from bmig.constants import DEFAULT_CONTROL_SOCKET, DEFAULT_STATUS_DIR, MiB
from bmig.dm import state as dm_state
from bmig.errors import ConfigError
from bmig.nbd.manage_client import DEFAULT_MANAGE_DIR
from bmig.sender.converge import Migration, Reporter, SyncSettings
from bmig.sender.pacing import COMPRESS_CHOICES
from bmig.sender.passes import PassSettings
from bmig.tracker.definitions import DEVICE_NAMES, device_name
from bmig.wire import codec
from bmig.wire.options import CONNECTION_KEYS, ConnectOptions
from bmig.limits import MAX_DATA
from bmig.wire.urls import parse_target_url

RELOADABLE = ("bwlimit", "level", "compress", "threshold", "interval", "hot_refresh")
# Connection settings that name files: made absolute before they go to bmig-nbd.
PATH_KEYS = ("secret_file", "tls_ca", "tls_cert", "tls_key", "known_hosts", "identity")
_SECONDS = re.compile(r"(\d+\.?\d*|\.\d+)s", re.ASCII)


def parse_threshold(value: str | int) -> tuple[int, float | None]:
    """``64M`` (bytes) or ``2s`` (seconds of shipping at the measured rate)."""
    text = str(value).strip()
    seconds = _SECONDS.fullmatch(text)
    if seconds:
        return 0, float(seconds.group(1))
    return parse_size(text), None


def parse_rate(value: str | int | None) -> int | None:
    """Bytes per second: ``100M``, ``1G``; 0 or none: unlimited."""
    if value in (None, "", 0, "0"):
        return None
    text = str(value)
    for suffix in ("/s", "ps"):
        if text.endswith(suffix):
            text = text[:-len(suffix)]
    return parse_size(text) or None


def _parsed_by(parse: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """A check for a key whose value, an integer or a string, ``parse`` reads later
    (as it reads the flag): the value as it is if ``parse`` takes it."""
    def check(value: Any) -> Any:
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            raise TypeError(value)
        try:
            parse(value)
        except ConfigError:
            raise ValueError(value) from None
        return value
    return check


def _url(value: str) -> str:
    parse_target_url(value)      # its ConfigError says what is wrong with the URL
    return value


def _nonempty(value: str) -> str:
    if not value.strip():
        raise ValueError(value)
    return value


# What a migration file may hold: the flags' long names ("_" for "-"), and their defaults.
SCHEMA = Schema(
    Key.string("name", f"a device name {DEVICE_NAMES}", device_name),
    Key.path("source"),
    Key.string("to", "a target URL", _url),
    Key.path("control", default=DEFAULT_CONTROL_SOCKET),
    Key.path("secret_file"),
    Key.path("tls_ca"),
    Key.path("tls_cert"),
    Key.path("tls_key"),
    Key.boolean("trust_tls_server", default=False),
    Key.string("ssh_command", "a command (a non-empty string)", _nonempty,
               default="breceive --stdio"),
    Key.choice("ssh_program", ("paramiko", "openssh"), default="paramiko"),
    Key.path("known_hosts"),
    Key.boolean("accept_new_host_key", default=False),
    Key.path("identity"),
    Key.string("ssh_cipher", 'a cipher name such as "aes128-gcm@openssh.com"', _nonempty),
    Key("bwlimit", 'a rate in bytes per second (an integer, or a string such as "100M"; '
                   '0 for no limit)', _parsed_by(parse_rate)),
    Key.integer("level", 0, 22, default=codec.DEFAULT_LEVEL),
    Key.choice("compress", COMPRESS_CHOICES, default="auto"),
    Key.size("window", MAX_DATA, default=256 * MiB),
    Key.boolean("direct", default=False),
    Key.boolean("checksum", default=False),
    Key("threshold", 'bytes (an integer, or a string such as "64M") or seconds (a string '
                     'such as "2s")', _parsed_by(parse_threshold), default="1s"),
    Key.string("discard_target_data", "an export name (a non-empty string)", _nonempty),
    Key.number("interval", 0.05, 3600, default=1.0),
    Key.number("hot_refresh", 1, 86400, default=30.0),
    Key.choice("log_level", bmig_log.LEVELS, default="warning"),
    Key.path("manage_dir", default=DEFAULT_MANAGE_DIR),
    Key.path("status_dir", default=DEFAULT_STATUS_DIR),
)
KEYS = SCHEMA.names


def settings_from(config_file: str | None, flags: Mapping[str, Any]) -> dict[str, Any]:
    """The defaults, then the migration file's values, then the flags given (not None)."""
    values = SCHEMA.defaults()
    if config_file:
        values.update(load_settings(config_file, SCHEMA))
    for key, value in flags.items():
        if value is not None and key in KEYS:
            values[key] = value
    return values


def build(values: Mapping[str, Any],
          reporter_for: Callable[[str], Reporter] = lambda name: Reporter()) -> Migration:
    """The migration the settings describe, told to report to ``reporter_for(name)``;
    ConfigError for what is missing or wrong."""
    name = values.get("name")
    if not name:
        raise ConfigError("which device? give NAME (as tracked by breqd) or name = in --config")
    if not values.get("source"):
        raise ConfigError("give --source PATH: the device or file bmig-nbd serves")
    if not values.get("to"):
        raise ConfigError("give --to URL, e.g. tcp://backup:10810/vm1")
    url = parse_target_url(str(values["to"]))
    options = ConnectOptions.from_dict(values)
    settings = SyncSettings(passes=PassSettings(), discard_export=values.get("discard_target_data"),
                            manage_dir=str(values.get("manage_dir") or DEFAULT_MANAGE_DIR))
    apply_reloadable(settings, values)
    settings.passes.window = parse_size(values.get("window", 256 * MiB))
    if settings.passes.window < MAX_DATA:
        raise ConfigError(f"--window must be at least {MAX_DATA // MiB}M")
    settings.passes.direct = bool(values.get("direct"))
    settings.passes.checksum = bool(values.get("checksum"))
    reporter = reporter_for(str(name))
    control = str(values.get("control") or DEFAULT_CONTROL_SOCKET)   # BMIG_CONTROL: a flag
    migration = Migration(str(name), str(values["source"]), url, options, settings, control,
                          reporter)
    if dm_state.load(dm_state.state_dir(), str(name)) is not None:
        # dm-era: attached, or lost or detached (an import then says why the copy cannot
        # be trusted). Imported here: the dm code is a third of a plain sync's start-up.
        from bmig.dm.intercept import DmIntercept
        migration.intercept = DmIntercept(str(name), control)
        migration.source_path = migration.intercept.read_path()
    return migration


def apply_reloadable(settings: SyncSettings, values: Mapping[str, Any]) -> None:
    """The settings a running migration takes at once (RELOADABLE), checked."""
    level = values.get("level", codec.DEFAULT_LEVEL)
    if isinstance(level, bool) or not isinstance(level, int) or not 0 <= level <= 22:
        raise ConfigError(f"level = {level!r}: a zstd level from 0 (raw) to 22")
    compress = values.get("compress", "auto")
    if compress not in COMPRESS_CHOICES:
        raise ConfigError(f"compress = {compress!r}: one of {', '.join(COMPRESS_CHOICES)}")
    settings.passes.level = level or None
    settings.passes.compress_all = compress == "always"
    settings.bwlimit = parse_rate(values.get("bwlimit"))
    settings.threshold_bytes, settings.threshold_seconds = parse_threshold(
        values.get("threshold", "1s"))
    interval = values.get("interval", 1.0)
    try:
        settings.interval = max(0.05, float(interval))
    except (TypeError, ValueError):
        raise ConfigError(f"interval = {interval!r}: seconds") from None
    settings.hot_refresh = float(values.get("hot_refresh", 30.0))    # checked by SCHEMA


def reload(migration: Migration, values: Mapping[str, Any]) -> None:
    """SIGHUP: the RELOADABLE settings of ``values`` take effect in ``migration`` now."""
    apply_reloadable(migration.settings, values)
    migration.limit.rate = migration.settings.bwlimit


def replica_options(values: Mapping[str, Any]) -> dict[str, Any]:
    """Connection settings as bmig-nbd takes them in a ``replicate`` request (its
    ConnectOptions.from_dict reads them there): paths made absolute, since bmig-nbd runs
    elsewhere."""
    options = {k: values[k] for k in CONNECTION_KEYS if values.get(k) is not None}
    for key in PATH_KEYS:
        if key in options:
            options[key] = os.path.abspath(str(options[key]))
    return options
