"""The click options bmigrate's commands share: how to reach a target
(``connection_options``), a migration's settings (``migration_options``, sync and
run), and where bmig-nbd's control sockets are (``manage_dir_option``).

Parsing only: the values go to bmig.sender.settings, which checks and uses them.
"""

from __future__ import annotations

from typing import Callable

import click

from bmig import log as bmig_log
from bmig.cli.common import SIZE, json_option
from bmig.constants import DEFAULT_CONTROL_SOCKET, DEFAULT_STATUS_DIR
from bmig.nbd.manage_client import DEFAULT_MANAGE_DIR
from bmig.sender.pacing import COMPRESS_CHOICES
from bmig.wire import codec


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
                     help="SSH cipher, e.g. aes128-gcm@openssh.com [default: SSH's own "
                          "ciphers, AES-GCM first where the CPU has AES instructions]."),
    ]
    for option in reversed(options):
        f = option(f)
    return f


def migration_options(f: Callable) -> Callable:
    """sync's options (run has them all but --threshold)."""
    return _migration_options(f, threshold=True)


def service_options(f: Callable) -> Callable:
    """run's options: sync's but --threshold (run ships every write as it comes)."""
    return _migration_options(f, threshold=False)


def _migration_options(f: Callable, threshold: bool) -> Callable:
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
                     help="Most bytes per second on the wire, e.g. 100M (MiB/s) "
                          "[default: none]."),
        click.option("--level", type=click.IntRange(0, 22), metavar="N",
                     help=f"zstd level; 0 sends raw [default: {codec.DEFAULT_LEVEL}]."),
        click.option("--compress", type=click.Choice(COMPRESS_CHOICES),
                     help="auto: compress as much as pays in time; always: every frame "
                          "that shrinks (a metered link) [default: auto]."),
        click.option("--window", type=SIZE, metavar="SIZE",
                     help="Checked out and not yet durable at once [default: 256M]."),
        click.option("--direct", is_flag=True, default=None,
                     help="Read the source with O_DIRECT (no page cache)."),
        click.option("--checksum", is_flag=True, default=None,
                     help="Compare per-chunk hashes with the target and send what differs."),
        *([click.option("--threshold", metavar="SIZE|Ns",
                        help="Converged when less than this is dirty: bytes, or seconds of "
                             "shipping [default: 1s].")] if threshold else []),
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


def manage_dir_option(f: Callable) -> Callable:
    return click.option("--manage-dir", metavar="DIR", envvar="BMIG_NBD_DIR",
                        default=DEFAULT_MANAGE_DIR, show_default=True,
                        help="Where bmig-nbd's control sockets are (or BMIG_NBD_DIR).")(f)


def status_dir_option(default: str | None = DEFAULT_STATUS_DIR) -> Callable[[Callable], Callable]:
    """Where bmigrate run publishes its state (run: no default here, so that
    status_dir = in --config is not overridden)."""
    return click.option("--status-dir", metavar="DIR", envvar="BMIG_STATUS_DIR",
                        default=default,
                        help="Where bmigrate run publishes its state for bmigrate status "
                             f"(or BMIG_STATUS_DIR) [default: {DEFAULT_STATUS_DIR}].")
