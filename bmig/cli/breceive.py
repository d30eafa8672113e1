"""breceive: the receiving daemon that writes what bmigrate ships to target devices."""

from __future__ import annotations

import os
import re
from typing import Any

import click

from bmig import __version__
from bmig import log as bmig_log
from bmig.cli.common import host_port, run
from bmig.config import load_settings
from bmig.constants import DEFAULT_RECEIVER_STATE_DIR
from bmig.errors import ConfigError
from bmig.receiver.service import (HANDSHAKE_TIMEOUT, MAX_UNAUTHENTICATED, Receiver,
                                   ReceiverSettings)
from bmig.receiver.session import Policy, TargetConfig
from bmig.wire.auth import load_secret
from bmig.wire.transports import server_tls_context

KEYS = {"listen", "state_dir", "secret_file", "tls_cert", "tls_key", "tls_client_ca",
        "max_sessions", "log_level", "targets", "max_unauthenticated", "handshake_timeout"}
TARGET_KEYS = {"path", "allow_discard"}
_EXPORT = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}")
DEFAULT_PORT = 10810


def _targets(values: dict[str, Any], flags: tuple[str, ...],
             allow_discard: bool) -> dict[str, TargetConfig]:
    targets: dict[str, TargetConfig] = {}
    table = values.get("targets", {})
    if not isinstance(table, dict):
        raise ConfigError("[targets] must be a table of EXPORT = { path = ... }")
    for export, spec in table.items():
        if not isinstance(spec, dict) or "path" not in spec or set(spec) - TARGET_KEYS:
            raise ConfigError(f"[targets.{export}] needs path, and only "
                              f"{', '.join(sorted(TARGET_KEYS))}")
        targets[export] = TargetConfig(export, str(spec["path"]),
                                       bool(spec.get("allow_discard", False)))
    for item in flags:
        export, sep, path = item.partition("=")
        if not sep or not path:
            raise ConfigError(f"--target {item!r}: expected EXPORT=PATH")
        targets[export] = TargetConfig(export, path, allow_discard)
    for export in targets:
        if not _EXPORT.fullmatch(export):
            raise ConfigError(f"export name {export!r} is invalid: use up to 64 letters, "
                              "digits, '_', '.', '-', not starting with '.' or '-'")
    if not targets:
        raise ConfigError("no targets: give --target EXPORT=PATH or [targets] in --config")
    return targets


def _number(values: dict[str, Any], key: str, default: float, low: float, high: float,
            kind: type) -> Any:
    """A number from --config, checked: ``kind`` (int, or float which takes ints too)
    from ``low`` to ``high``."""
    value = values.get(key, default)
    kinds = (int, float) if kind is float else (int,)
    if isinstance(value, bool) or not isinstance(value, kinds) or not low <= value <= high:
        what = "an integer" if kind is int else "a number"
        raise ConfigError(f"{key} = {value!r}: expected {what} from {low:g} to {high:g}")
    return kind(value)


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
    values: dict[str, Any] = {}
    if config_file:
        values = load_settings(config_file, KEYS)
    bmig_log.setup(str(log_level or values.get("log_level", "info")))
    targets = _targets(values, target_flags, bool(allow_discard))
    state = os.path.abspath(str(state_dir or values.get("state_dir",
                                                        DEFAULT_RECEIVER_STATE_DIR)))
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
                                max_sessions=int(max_sessions or values.get("max_sessions", 16)),
                                max_unauthenticated=max_unauthenticated or _number(
                                    values, "max_unauthenticated", MAX_UNAUTHENTICATED,
                                    1, 1024, int),
                                handshake_timeout=handshake_timeout or _number(
                                    values, "handshake_timeout", HANDSHAKE_TIMEOUT,
                                    0.1, 3600, float))
    Receiver(settings).serve()


def main() -> None:
    run(breceive, "breceive")
