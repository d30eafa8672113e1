"""breceive: the receiving daemon that writes what bmigrate ships to target devices.

Flags and the config file in, a running Receiver out: sessions are bmig.receiver's.
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
from bmig.constants import DEFAULT_RECEIVER_STATE_DIR
from bmig.errors import ConfigError
from bmig.limits import MAX_UNAUTHENTICATED
from bmig.receiver.policy import Policy, TargetConfig
from bmig.receiver.service import HANDSHAKE_TIMEOUT, Receiver, ReceiverSettings
from bmig.receiver.target import clashes_with_lock_files
from bmig.wire.auth import load_secret
from bmig.wire.transports import server_tls_context

_EXPORT = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}")
EXPORT_NAMES = ('of up to 64 letters, digits, "_", ".", "-", not starting with "." or "-" '
                'and not ending in ".replica", ".record" or ".record-intent"')
DEFAULT_PORT = 10810


def _valid_export(name: str) -> bool:
    """The name rule (EXPORT_NAMES): the endings are those of another export's lock
    files (bmig.receiver.target.LOCK_KINDS)."""
    return bool(_EXPORT.fullmatch(name)) and not clashes_with_lock_files(name)


def _export_name(name: str) -> str:
    if not _valid_export(name):
        raise ValueError(name)
    return name


def _address(value: str) -> str:
    try:
        host_port(value, "listen", any_port=True)
    except ConfigError:
        raise ValueError(value) from None
    return value


# What --config may hold: the flags' long names ("_" for "-") and a table per target.
TARGET_SCHEMA = Schema(
    Key.path("path", required=True),
    Key.boolean("allow_discard", default=False),
    Key.boolean("allow_discard_primary", default=False),
    Key.size("max_size", low=1),
)
SCHEMA = Schema(
    Key.array("listen", Key.string("listen", f'"HOST:PORT", such as "0.0.0.0:{DEFAULT_PORT}"',
                                   _address),
              f'an array of "HOST:PORT" strings, such as ["0.0.0.0:{DEFAULT_PORT}"]',
              default=[]),
    Key.path("state_dir", default=DEFAULT_RECEIVER_STATE_DIR),
    Key.path("secret_file"),
    Key.path("tls_cert"),
    Key.path("tls_key"),
    Key.path("tls_client_ca"),
    Key.integer("max_sessions", 1, 1024, default=16),
    Key.integer("max_unauthenticated", 1, 1024, default=MAX_UNAUTHENTICATED),
    Key.number("handshake_timeout", 0.1, 3600, default=HANDSHAKE_TIMEOUT),
    Key.choice("log_level", bmig_log.LEVELS, default="info"),
    Key.tables("targets", TARGET_SCHEMA, _export_name, EXPORT_NAMES, default={}),
)
KEYS = SCHEMA.names
TARGET_KEYS = TARGET_SCHEMA.names


def _targets(values: dict[str, Any], flags: tuple[str, ...],
             allow_discard: bool) -> dict[str, TargetConfig]:
    targets: dict[str, TargetConfig] = {}
    for export, spec in values.get("targets", {}).items():
        targets[export] = TargetConfig(export, spec["path"], spec["allow_discard"],
                                       spec.get("max_size"), spec["allow_discard_primary"])
    for item in flags:
        export, sep, path = item.partition("=")
        if not sep or not path:
            raise ConfigError(f"--target {item!r}: expected EXPORT=PATH")
        targets[export] = TargetConfig(export, path, allow_discard)
    for export in targets:
        if not _valid_export(export):
            raise ConfigError(f"export name {export!r} is invalid: use names {EXPORT_NAMES}")
    if not targets:
        raise ConfigError("no targets: give --target EXPORT=PATH or [targets] in --config")
    return targets


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--config", "config_file", metavar="FILE",
              help="TOML file with the settings below and a [targets] table; flags "
                   "override it.")
@click.option("--listen", "listen", multiple=True, metavar="HOST:PORT",
              help=f"Listen for senders here (repeatable) [port {DEFAULT_PORT} is usual].")
@click.option("--stdio", is_flag=True,
              help="Serve one session on stdin/stdout (what bmigrate runs over SSH).")
@click.option("--target", "target_flags", multiple=True, metavar="EXPORT=PATH",
              help="A target senders may write: its export name and file or device.")
@click.option("--allow-discard", is_flag=True, default=None,
              help="Let a sender overwrite --target targets of another lineage when it "
                   "asks to (--discard-target-data).")
@click.option("--secret-file", metavar="FILE",
              help="Shared secret (mode 0600) senders must prove they know.")
@click.option("--state-dir", metavar="DIR",
              help=f"Per-target lineage records [default: {DEFAULT_RECEIVER_STATE_DIR}].")
@click.option("--tls-cert", metavar="FILE", help="Certificate (PEM): senders connect with TLS.")
@click.option("--tls-key", metavar="FILE", help="Its private key, if not in --tls-cert.")
@click.option("--tls-client-ca", metavar="FILE",
              help="Senders must show a certificate signed by this CA (with --secret-file "
                   "too, they need both).")
@click.option("--max-sessions", type=click.IntRange(1, 1024), metavar="N",
              help="Authenticated sessions at once [default: 16].")
@click.option("--max-unauthenticated", type=click.IntRange(1, 1024), metavar="N",
              help=f"Connections still in their handshake at once; the oldest makes room "
                   f"[default: {MAX_UNAUTHENTICATED}].")
@click.option("--handshake-timeout", type=click.FloatRange(0.1, 3600), metavar="SECONDS",
              help=f"Time a connection has to authenticate, TLS included "
                   f"[default: {HANDSHAKE_TIMEOUT:g}].")
@click.option("--log-level", type=click.Choice(bmig_log.LEVELS),
              help="Least severe message logged [default: info].")
@click.version_option(__version__, prog_name="breceive")
def breceive(config_file: str | None, listen: tuple[str, ...], stdio: bool,
             target_flags: tuple[str, ...], allow_discard: bool | None,
             secret_file: str | None, state_dir: str | None, tls_cert: str | None,
             tls_key: str | None, tls_client_ca: str | None, max_sessions: int | None,
             max_unauthenticated: int | None, handshake_timeout: float | None,
             log_level: str | None) -> None:
    """Write what bmigrate ships to the configured target devices."""
    values = SCHEMA.defaults()
    if config_file:
        values.update(load_settings(config_file, SCHEMA))
    bmig_log.setup(str(log_level or values["log_level"]))
    targets = _targets(values, target_flags, bool(allow_discard))
    state = os.path.abspath(str(state_dir or values["state_dir"]))
    try:
        os.makedirs(state, mode=0o700, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"cannot create the state directory {state}: {exc.strerror}") from None
    secret_path = secret_file or values.get("secret_file")
    secret = load_secret(str(secret_path)) if secret_path else None
    policy = Policy(targets, state, secret)
    if stdio:
        Receiver(ReceiverSettings(policy)).serve_stdio()
        return
    cert = tls_cert or values.get("tls_cert")
    client_ca = tls_client_ca or values.get("tls_client_ca")
    tls = None
    if cert:
        tls = server_tls_context(str(cert), tls_key or values.get("tls_key"),
                                 str(client_ca) if client_ca else None)
    elif client_ca:
        raise ConfigError("--tls-client-ca needs --tls-cert")
    if secret is None and not client_ca:
        raise ConfigError("senders could not authenticate: give --secret-file FILE, or "
                          "--tls-cert with --tls-client-ca")
    addresses = list(listen) or [str(a) for a in values.get("listen", [])]
    settings = ReceiverSettings(policy, [host_port(a, "--listen", any_port=True) for a in addresses], tls,
                                client_certificates=bool(client_ca),
                                max_sessions=int(max_sessions or values["max_sessions"]),
                                max_unauthenticated=int(max_unauthenticated
                                                        or values["max_unauthenticated"]),
                                handshake_timeout=float(handshake_timeout
                                                        or values["handshake_timeout"]))
    Receiver(settings).serve()


add_verbosity(breceive, "info")


def main() -> None:
    run(breceive, "breceive")
