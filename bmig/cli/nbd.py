"""The bmig-nbd command: its options, its configuration file, and nothing more.

Flags over file values become bmig.nbd.service's Settings, which assembles and runs the
server. This module may not build layers, contexts or servers, nor decide what is served
and how (which exports are writable, TLS rules): that is the service's.
"""

from __future__ import annotations

import os
import re
from typing import Any

import click

from bmig import __version__
from bmig import log as bmig_log
from bmig.cli.common import add_verbosity, host_port, run
from bmig.config import Key, Schema, load_settings
from bmig.constants import DEFAULT_CONTROL_SOCKET
from bmig.errors import ConfigError
from bmig.limits import DEFAULT_HOLD_LIMIT, MAX_NAME_LENGTH
from bmig.nbd import service
from bmig.nbd.manage_client import DEFAULT_MANAGE_DIR
from bmig.nbd.server import DEFAULT_UNIX_MODE, Listen
from bmig.nbd.service import TLS_MODES, ExportSettings, TlsSettings
from bmig.tracker.definitions import DEVICE_NAMES, device_name


def _nbd_string(value: str) -> str:
    """An export name or description: NBD carries at most 4096 bytes of one."""
    if len(value.encode()) > MAX_NAME_LENGTH:
        raise ValueError(value)
    return value


def _address(value: str) -> str:
    try:
        host_port(value, "tcp")
    except ConfigError:
        raise ValueError(value) from None
    return value


def _checked_mode(value: Any) -> Any:
    try:
        _unix_mode(value, "unix_mode")
    except ConfigError:
        raise ValueError(value) from None
    return value


# What --config may hold: the flags' long names ("_" for "-") and an [[export]] table
# per export.
EXPORT_SCHEMA = Schema(
    Key.string("device", f"a device name {DEVICE_NAMES}", device_name, required=True),
    Key.path("backing", required=True),
    Key.string("name", f"a string of at most {MAX_NAME_LENGTH} bytes", _nbd_string),
    Key.boolean("read_only", default=False),
    Key.string("description", f"a string of at most {MAX_NAME_LENGTH} bytes", _nbd_string,
               default=""),
)
SCHEMA = Schema(
    Key.path("control", default=DEFAULT_CONTROL_SOCKET),
    Key.path("unix"),
    Key.string("tcp", '"HOST:PORT", such as "127.0.0.1:10809"', _address),
    Key.boolean("read_only", default=False),
    Key.integer("max_connections", 1, 10000, default=64),
    Key.choice("log_level", bmig_log.LEVELS, default="info"),
    Key.boolean("track", default=True),
    Key.table_array("export", EXPORT_SCHEMA, default=[]),
    Key.choice("tls", TLS_MODES),
    Key.path("tls_cert"),
    Key.path("tls_key"),
    Key.path("manage_dir", default=DEFAULT_MANAGE_DIR),
    Key.integer("hold_chunks", 1, 1 << 20, default=DEFAULT_HOLD_LIMIT),
    Key.path("tls_certificates"),
    Key.boolean("tls_verify_peer", default=False),
    Key.path("tls_client_ca"),
    Key.path("tls_psk"),
    Key("unix_mode", 'an octal mode such as "0660" (in TOML also 0o660)', _checked_mode,
        default=DEFAULT_UNIX_MODE),
)
TOP_KEYS = SCHEMA.names
EXPORT_KEYS = EXPORT_SCHEMA.names


def _tls_settings(values: dict[str, Any], mode: str | None, cert: str | None,
                  key: str | None, certificates: str | None, verify_peer: bool | None,
                  client_ca: str | None, psk: str | None) -> TlsSettings:
    """TLS flags over file values."""
    if verify_peer is None:
        verify_peer = values["tls_verify_peer"]
    return TlsSettings(mode=mode or values.get("tls"), cert=cert or values.get("tls_cert"),
                       key=key or values.get("tls_key"),
                       certificates=certificates or values.get("tls_certificates"),
                       verify_peer=bool(verify_peer),
                       client_ca=client_ca or values.get("tls_client_ca"),
                       psk=psk or values.get("tls_psk"))


def _export(spec: dict[str, Any]) -> ExportSettings:
    """An [[export]] table or a --device/--backing/--export triple."""
    return ExportSettings(device=str(spec["device"]), backing=str(spec["backing"]),
                          name=str(spec.get("name") or spec["device"]),
                          read_only=bool(spec.get("read_only")),
                          description=str(spec.get("description", "")))


def _unix_mode(value: Any, source: str) -> int:
    """A socket mode in octal: "0660" or "660" (flag or file), 0o660 (TOML integer)."""
    if isinstance(value, str) and re.fullmatch(r"(0o?)?[0-7]{1,3}", value):
        mode = int(value.removeprefix("0o"), 8)
    elif isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= 0o777:
        mode = value
    else:
        raise ConfigError(f"{source} = {value!r}: expected an octal mode such as \"0660\" "
                          f"(in TOML also 0o660)")
    return mode


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--config", "config_file", metavar="FILE",
              help="TOML file with exports and settings; flags override it.")
@click.option("--device", "devices", multiple=True, metavar="NAME",
              help="Device name in breqd; repeat with --backing for several exports.")
@click.option("--backing", "backings", multiple=True, metavar="PATH",
              help="File or block device served for the --device in the same position.")
@click.option("--export", "export_names", multiple=True, metavar="NAME",
              help="Export name for the --device in the same position [default: the "
                   "device name].")
@click.option("--unix", metavar="SOCK", help="Listen on this Unix socket.")
@click.option("--unix-mode", metavar="MODE",
              help=f"Permissions of the --unix socket, in octal [default: "
                   f"{DEFAULT_UNIX_MODE:04o}].")
@click.option("--tcp", metavar="HOST:PORT", help="Listen on this TCP address.")
@click.option("--control", metavar="SOCK", envvar="BMIG_CONTROL",
              help=f"breqd's control socket (or BMIG_CONTROL, as for bmigrate) "
                   f"[default: {DEFAULT_CONTROL_SOCKET}].")
@click.option("--read-only", is_flag=True, default=None, help="Refuse every write.")
@click.option("--no-track", "no_track", is_flag=True, default=None,
              help="Do not report writes to breqd (for measurements; breaks migration).")
@click.option("--max-connections", type=click.IntRange(1, 10000), metavar="N",
              help="Connections served at once [default: 64].")
@click.option("--tls", "tls_mode", type=click.Choice(TLS_MODES),
              help="TLS: require it, offer it, or not [default: require with a certificate "
                   "or a PSK file, else off].")
@click.option("--tls-cert", metavar="FILE", help="Server certificate (PEM) for TLS.")
@click.option("--tls-key", metavar="FILE",
              help="Private key (PEM) of --tls-cert, if not in the same file.")
@click.option("--tls-certificates", metavar="DIR",
              help="Directory laid out as for nbdkit: server-cert.pem, server-key.pem, "
                   "ca-cert.pem (and ca-crl.pem) for --tls-verify-peer.")
@click.option("--tls-verify-peer", is_flag=True, default=None,
              help="Clients must present a certificate signed by the CA (--tls-client-ca "
                   "or ca-cert.pem of --tls-certificates).")
@click.option("--tls-client-ca", metavar="FILE",
              help="CA (PEM) that signs the client certificates; implies --tls-verify-peer.")
@click.option("--tls-psk", metavar="FILE",
              help="TLS with pre-shared keys instead of certificates: IDENTITY:HEXKEY lines "
                   "(psktool's format); clients must know one of them.")
@click.option("--manage-dir", metavar="DIR", envvar="BMIG_NBD_DIR",
              help=f"Where DEVICE.sock, bmig-nbd's own control socket, goes (bmigrate "
                   f"replicate and cutover use it; or BMIG_NBD_DIR, as for bmigrate) "
                   f"[default: {DEFAULT_MANAGE_DIR}].")
@click.option("--hold-chunks", type=click.IntRange(1, 1 << 20), metavar="N",
              help=f"Chunks held in breqd at once [default: {DEFAULT_HOLD_LIMIT}].")
@click.option("--log-level", type=click.Choice(bmig_log.LEVELS),
              help="Least severe message logged [default: info].")
@click.version_option(__version__, prog_name="bmig-nbd")
def nbd(config_file: str | None, devices: tuple[str, ...], backings: tuple[str, ...],
        export_names: tuple[str, ...], unix: str | None, unix_mode: str | None,
        tcp: str | None, control: str | None, read_only: bool | None, no_track: bool | None,
        max_connections: int | None, tls_mode: str | None, tls_cert: str | None,
        tls_key: str | None, tls_certificates: str | None, tls_verify_peer: bool | None,
        tls_client_ca: str | None, tls_psk: str | None, manage_dir: str | None,
        hold_chunks: int | None, log_level: str | None) -> None:
    """Serve devices over NBD and mark every write in breqd before it happens."""
    values = SCHEMA.defaults()
    if config_file:
        values.update(load_settings(config_file, SCHEMA))
    if len(devices) != len(backings):
        raise ConfigError("give one --backing per --device")
    if len(export_names) > len(devices):
        raise ConfigError("give at most one --export per --device")
    specs = list(values["export"])
    specs += [{"device": d, "backing": b,
               "name": export_names[i] if i < len(export_names) else d}
              for i, (d, b) in enumerate(zip(devices, backings))]
    if not specs:
        raise ConfigError("nothing to serve: give --device NAME --backing PATH or --config")
    unix = unix or values.get("unix")
    tcp = tcp or values.get("tcp")
    activated = service.activated_listeners()
    if not unix and not tcp and not activated:
        raise ConfigError("nowhere to listen: give --unix SOCK or --tcp HOST:PORT, or start "
                          "bmig-nbd from a systemd socket unit")
    mode = (_unix_mode(unix_mode, "--unix-mode") if unix_mode is not None
            else _unix_mode(values["unix_mode"], "unix_mode"))
    listen = activated + \
        ([Listen(unix=os.path.abspath(unix), unix_mode=mode)] if unix else []) + \
        ([Listen(tcp=host_port(str(tcp), "--tcp"))] if tcp else [])
    bmig_log.setup(str(log_level or values["log_level"]))
    track = not no_track if no_track is not None else values["track"]
    service.run(service.Settings(
        exports=[_export(spec) for spec in specs],
        listen=listen,
        control=str(control or values["control"]) if track else None,
        read_only=bool(read_only if read_only is not None else values["read_only"]),
        max_connections=int(max_connections or values["max_connections"]),
        tls=_tls_settings(values, tls_mode, tls_cert, tls_key, tls_certificates,
                          tls_verify_peer, tls_client_ca, tls_psk),
        manage_dir=os.path.abspath(str(manage_dir or values["manage_dir"])),
        hold_chunks=int(hold_chunks or values["hold_chunks"])))


add_verbosity(nbd, "info")


def main() -> None:
    run(nbd, "bmig-nbd")
