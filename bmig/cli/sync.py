"""bmigrate sync and bmigrate run: ship a device's dirty chunks to a target.

Both take the same options, from flags or a TOML file (``--config``, one migration per
file; flags win). SIGHUP reloads the file: the bandwidth limit, compression level,
threshold and interval change at once. SIGTERM stops cleanly: what is in flight gets its
acknowledgement, what is not goes back to dirty. The first Ctrl-C does the same; a second
one stops at once.
"""

from __future__ import annotations

import logging
import re
import signal
import sys
import threading
from typing import Any, Callable

import click

from bmig import log as bmig_log
from bmig.cli.common import SIZE, json_option
from bmig.cli.report import JsonReporter, TextReporter
from bmig.config import Key, Schema, load_settings, parse_size
from bmig.constants import DEFAULT_CONTROL_SOCKET, MiB
from bmig.errors import EXIT_LIVE, EXIT_OK, ConfigError
from bmig.nbd.manage_client import DEFAULT_MANAGE_DIR
from bmig.sender.converge import Migration, SyncSettings
from bmig.sender.passes import PassSettings
from bmig.sender.targets import ConnectOptions
from bmig.sender.urls import parse_target_url
from bmig.tracker.devices import DEVICE_NAMES, device_name
from bmig.wire import codec
from bmig.wire.auth import load_secret
from bmig.wire.protocol import MAX_DATA

log = logging.getLogger("bmigrate")

RELOADABLE = ("bwlimit", "level", "threshold", "interval")
EXIT_INTERRUPTED = 130
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
    Key.size("window", MAX_DATA, default=256 * MiB),
    Key.boolean("direct", default=False),
    Key.boolean("checksum", default=False),
    Key("threshold", 'bytes (an integer, or a string such as "64M") or seconds (a string '
                     'such as "2s")', _parsed_by(parse_threshold), default="1s"),
    Key.string("discard_target_data", "an export name (a non-empty string)", _nonempty),
    Key.number("interval", 0.05, 3600, default=1.0),
    Key.choice("log_level", bmig_log.LEVELS, default="warning"),
    Key.path("manage_dir", default=DEFAULT_MANAGE_DIR),
)
KEYS = SCHEMA.names


CONNECTION_KEYS = ("secret_file", "tls_ca", "tls_cert", "tls_key", "trust_tls_server",
                   "ssh_command", "ssh_program", "known_hosts", "accept_new_host_key",
                   "identity", "ssh_cipher")


def connection_options(f: Callable) -> Callable:
    """How to reach and authenticate a target: every command that connects to one."""
    options = [
        click.option("--secret-file", metavar="FILE",
                     help="Shared secret for tcp:// and tls:// (mode 0600)."),
        click.option("--tls-ca", metavar="FILE",
                     help="CA that signed the receiver's certificate [default: the system's]."),
        click.option("--tls-cert", metavar="FILE", help="Client certificate for tls://."),
        click.option("--tls-key", metavar="FILE", help="Its private key."),
        click.option("--trust-tls-server", is_flag=True, default=None,
                     help="Over tls://, the receiver's verified certificate authenticates "
                          "it: no shared secret needed."),
        click.option("--ssh-command", metavar="CMD",
                     help="Command run on the SSH host [default: breceive --stdio]."),
        click.option("--ssh-program", type=click.Choice(["paramiko", "openssh"]),
                     help="SSH in this process, or the system ssh [default: paramiko]."),
        click.option("--known-hosts", metavar="FILE",
                     help="Host keys [default: ~/.ssh/known_hosts]."),
        click.option("--accept-new-host-key", is_flag=True, default=None,
                     help="Accept and save an unknown SSH host key (never a changed one)."),
        click.option("--identity", metavar="FILE", help="SSH private key."),
        click.option("--ssh-cipher", metavar="NAME",
                     help="SSH cipher, e.g. aes128-gcm@openssh.com."),
    ]
    for option in reversed(options):
        f = option(f)
    return f


def connect_options(values: dict[str, Any]) -> ConnectOptions:
    secret = load_secret(str(values["secret_file"])) if values.get("secret_file") else None
    return ConnectOptions(
        secret=secret, tls_ca=values.get("tls_ca"), tls_cert=values.get("tls_cert"),
        tls_key=values.get("tls_key"), trust_tls_server=bool(values.get("trust_tls_server")),
        ssh_command=str(values.get("ssh_command") or "breceive --stdio"),
        ssh_program=str(values.get("ssh_program") or "paramiko"),
        known_hosts=values.get("known_hosts"),
        accept_new_host_key=bool(values.get("accept_new_host_key")),
        identity=values.get("identity"), ssh_cipher=values.get("ssh_cipher"))


def migration_options(f: Callable) -> Callable:
    """The options sync and run share."""
    options = [
        click.argument("name", required=False),
        click.option("--config", "config_file", metavar="FILE",
                     help="TOML file with this migration's settings; flags override it; "
                          "SIGHUP reloads it."),
        click.option("--source", metavar="PATH",
                     help="The device or file to read (the one bmig-nbd serves)."),
        click.option("--to", "to", metavar="URL",
                     help="tcp://HOST:PORT/EXPORT, tls://..., ssh://[USER@]HOST[:PORT]/EXPORT, "
                          "nbd://... or nbd+unix:///EXPORT?socket=PATH."),
        # No default here: a flag's default would win over control = in --config.
        click.option("--control", metavar="SOCK", envvar="BMIG_CONTROL",
                     help="breqd's control socket (or BMIG_CONTROL, or control = in --config) "
                          f"[default: {DEFAULT_CONTROL_SOCKET}]."),
        connection_options,
        click.option("--bwlimit", metavar="RATE",
                     help="Most bytes per second on the wire, e.g. 100M [default: none]."),
        click.option("--level", type=click.IntRange(0, 22), metavar="N",
                     help=f"zstd level; 0 sends raw [default: {codec.DEFAULT_LEVEL}]."),
        click.option("--window", type=SIZE, metavar="SIZE",
                     help="Checked out and not yet durable at once [default: 256M]."),
        click.option("--direct", is_flag=True, default=None,
                     help="Read the source with O_DIRECT (no page cache)."),
        click.option("--checksum", is_flag=True, default=None,
                     help="Compare per-chunk hashes with the target and send what differs."),
        click.option("--threshold", metavar="SIZE|Ns",
                     help="Converged when less than this is dirty: bytes, or seconds of "
                          "shipping [default: 1s]."),
        click.option("--discard-target-data", metavar="EXPORT",
                     help="Overwrite EXPORT even if it holds another lineage's data."),
        click.option("--manage-dir", metavar="DIR", envvar="BMIG_NBD_DIR",
                     help="Where bmig-nbd's control sockets are, to learn the write rate "
                          "[default: /run/bmig/nbd, or BMIG_NBD_DIR]."),
        click.option("--log-level", type=click.Choice(bmig_log.LEVELS),
                     help="Least severe message logged [default: warning]."),
        json_option,
    ]
    for option in reversed(options):
        f = option(f)
    return f


def settings_from(config_file: str | None, flags: dict[str, Any]) -> dict[str, Any]:
    values = SCHEMA.defaults()
    if config_file:
        values.update(load_settings(config_file, SCHEMA))
    for key, value in flags.items():
        if value is not None and key in KEYS:
            values[key] = value
    return values


def build(values: dict[str, Any], as_json: bool) -> tuple[Migration, Any]:
    name = values.get("name")
    if not name:
        raise ConfigError("which device? give NAME (as tracked by breqd) or name = in --config")
    if not values.get("source"):
        raise ConfigError("give --source PATH: the device or file bmig-nbd serves")
    if not values.get("to"):
        raise ConfigError("give --to URL, e.g. tcp://backup:10810/vm1")
    url = parse_target_url(str(values["to"]))
    options = connect_options(values)
    settings = SyncSettings(passes=PassSettings(), discard_export=values.get("discard_target_data"),
                            manage_dir=str(values.get("manage_dir") or DEFAULT_MANAGE_DIR))
    apply_reloadable(settings, values)
    settings.passes.window = parse_size(values.get("window", 256 * MiB))
    if settings.passes.window < MAX_DATA:
        raise ConfigError(f"--window must be at least {MAX_DATA // MiB}M")
    settings.passes.direct = bool(values.get("direct"))
    settings.passes.checksum = bool(values.get("checksum"))
    reporter = JsonReporter(str(name)) if as_json else TextReporter(str(name))
    control = str(values.get("control") or DEFAULT_CONTROL_SOCKET)   # BMIG_CONTROL: a flag
    migration = Migration(str(name), str(values["source"]), url, options, settings, control,
                          reporter)
    from bmig.dm.intercept import intercept_for       # the dm intercept, if attached

    migration.intercept = intercept_for(str(name), control)
    if migration.intercept is not None:
        migration.source_path = migration.intercept.read_path()
    return migration, reporter


def apply_reloadable(settings: SyncSettings, values: dict[str, Any]) -> None:
    level = values.get("level", codec.DEFAULT_LEVEL)
    if isinstance(level, bool) or not isinstance(level, int) or not 0 <= level <= 22:
        raise ConfigError(f"level = {level!r}: a zstd level from 0 (raw) to 22")
    settings.passes.level = level or None
    settings.bwlimit = parse_rate(values.get("bwlimit"))
    settings.threshold_bytes, settings.threshold_seconds = parse_threshold(
        values.get("threshold", "1s"))
    interval = values.get("interval", 1.0)
    try:
        settings.interval = max(0.05, float(interval))
    except (TypeError, ValueError):
        raise ConfigError(f"interval = {interval!r}: seconds") from None


class Signals:
    """SIGTERM and the first Ctrl-C stop cleanly; the second Ctrl-C stops at once;
    SIGHUP reloads the migration file."""

    def __init__(self, migration: Migration, reload: Callable[[], None] | None):
        self.migration = migration
        self.reload = reload
        self.interrupted = False

    def install(self) -> None:
        signal.signal(signal.SIGTERM, self._stop)
        signal.signal(signal.SIGINT, self._interrupt)
        signal.signal(signal.SIGHUP, self._hup)

    def _stop(self, signum: int, frame: Any) -> None:
        self.migration.stop.set()

    def _interrupt(self, signum: int, frame: Any) -> None:
        if self.migration.stop.is_set():
            raise KeyboardInterrupt
        self.interrupted = True
        sys.stderr.write("bmigrate: stopping after what is in flight (Ctrl-C again to stop "
                         "at once)\n")
        self.migration.stop.set()

    def _hup(self, signum: int, frame: Any) -> None:
        threading.Thread(target=self._reload, daemon=True).start()

    def _reload(self) -> None:
        if self.reload is None:
            log.warning("SIGHUP: nothing to reload without --config")
            return
        try:
            self.reload()
        except ConfigError as exc:
            log.error("reload refused: %s", exc.message)


def prepare(config_file: str | None, flags: dict[str, Any], as_json: bool):
    values = settings_from(config_file, flags)
    bmig_log.setup(str(values.get("log_level", "warning")))
    migration, reporter = build(values, as_json)

    def reload() -> None:
        fresh = settings_from(config_file, flags)
        apply_reloadable(migration.settings, fresh)
        migration.limit.rate = migration.settings.bwlimit
        reporter.note(f"{migration.name}: settings reloaded (bwlimit "
                      f"{migration.settings.bwlimit or 'none'})", reloaded=RELOADABLE)

    signals = Signals(migration, reload if config_file else None)
    signals.install()
    return migration, reporter, signals


@click.command()
@migration_options
def sync(name: str | None, config_file: str | None, as_json: bool, **flags: Any) -> int:
    """Make passes until the copy has converged.

    Exit status 0 when the copy is identical (nothing dirty), 15 when it converged while
    the device is being written (what is still dirty ships in less than --threshold),
    10 when it does not converge (writes outpace shipping).
    """
    migration, reporter, signals = prepare(config_file, {"name": name, **flags}, as_json)
    try:
        migration.connect()
        summary = migration.sync()
    finally:
        migration.close()
    reporter.summary(summary)
    if signals.interrupted or (migration.stop.is_set() and not summary.converged):
        return EXIT_INTERRUPTED
    return EXIT_OK if summary.identical else EXIT_LIVE


@click.command("run")
@migration_options
@click.option("--interval", type=click.FloatRange(0.05, 3600), metavar="SECONDS",
              help="How often to look for new writes when idle [default: 1].")
def run_service(name: str | None, config_file: str | None, as_json: bool,
                **flags: Any) -> int:
    """Keep the target up to date until stopped (the catch-up service).

    Ships writes as they come, reconnects with backoff, reports its lag; SIGHUP reloads
    --config, SIGTERM stops cleanly.
    """
    from bmig import systemd

    migration, reporter, signals = prepare(config_file, {"name": name, **flags}, as_json)
    systemd.notify("READY=1", f"STATUS=shipping {migration.name} to {migration.url}")
    try:
        summary = migration.run_forever(
            on_idle=lambda: systemd.notify(f"STATUS={migration.name}: up to date"))
    finally:
        systemd.notify("STOPPING=1")
        migration.close()
    reporter.summary(summary)
    return EXIT_INTERRUPTED if signals.interrupted else EXIT_OK
