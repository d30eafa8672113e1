"""bmigrate replicate: switch a running bmig-nbd to synchronous replication and back.

It asks bmig-nbd (bmig.nbd.manage_client) and prints the answer.
"""

from __future__ import annotations

from typing import Any

import click
from click.core import ParameterSource

from bmig import log as bmig_log
from bmig.cli.common import json_option, print_json
from bmig.cli.options import connection_options, manage_dir_option
from bmig.constants import REPLICATION_POLICIES, REPLICATION_PROTOCOLS
from bmig.errors import ConfigError
from bmig.nbd.manage_client import ManageClient
from bmig.sender.settings import replica_options


def describe(status: dict) -> str:
    return f"{status['device']}: {mode(status)}"


def mode(status: dict) -> str:
    """What bmig-nbd does with the device's writes, from its status."""
    if status["replicating"]:
        line = (f"replicating to {status['target']} with protocol {status['protocol']} "
                f"(on failure: {status['policy']})")
    else:
        why = f" (replication failed: {status['failed']})" if status.get("failed") else ""
        line = ("writes blocked" if status.get("blocked") else "tracking only") + why
    if status.get("source_failed"):
        line += (f"; the source failed ({status['source_failed']}): every write and flush "
                 "fails until bmig-nbd is restarted")
    return line


# The modes, and the options only some of them take (the others take every mode).
START, STOP, STATUS, KEEP = "--to", "--stop", "--status", "--keep"
ONLY_IN = {"to": (START, KEEP), "protocol": (START, KEEP), "policy": (START, KEEP),
           "ack_timeout": (START, KEEP), "config_file": (KEEP,), "source": (KEEP,),
           "control": (KEEP,), **{key: (START, KEEP) for key in (
               "secret_file", "tls_ca", "tls_cert", "tls_key", "trust_tls_server",
               "ssh_command", "ssh_program", "known_hosts", "accept_new_host_key",
               "identity", "ssh_cipher")}}


def mode_of(ctx: click.Context) -> str:
    """The mode the command line asks for; a usage error for an option given on it
    that the mode does not take (an environment variable is not refused)."""
    given = [param for param in ctx.command.params
             if ctx.get_parameter_source(param.name) == ParameterSource.COMMANDLINE]
    flags = {p.name: p.opts[0] for p in given}
    modes = [m for m, key in ((KEEP, "keep"), (STOP, "stop"), (STATUS, "show"))
             if key in flags]
    if len(modes) > 1:
        raise click.UsageError(f"give {modes[0]} or {modes[1]}, not both", ctx)
    mode = modes[0] if modes else START
    for key, flag in flags.items():
        takes = ONLY_IN.get(key)
        if takes is None or mode in takes:
            continue
        if takes == (KEEP,):
            raise click.UsageError(f"{flag} needs --keep", ctx)
        raise click.UsageError(f"{flag} does not apply to {mode}", ctx)
    if mode == KEEP and ctx.params["policy"] != "degrade":
        raise click.UsageError("--keep replicates with --policy degrade: after a failure "
                               "it tracks, and connects again", ctx)
    return mode


@click.command()
@click.argument("name")
@click.option("--to", "to", metavar="URL",
              help="breceive to replicate to: tcp://, tls:// or ssh:// (as for sync).")
@click.option("--protocol", type=click.Choice(REPLICATION_PROTOCOLS), default="C",
              show_default=True,
              help="C: a write returns once written on both sides; B: once the target has "
                   "received it; A: once queued for sending.")
@click.option("--policy", type=click.Choice(REPLICATION_POLICIES), default="degrade",
              show_default=True,
              help="When the target fails: back to tracking only, or fail writes with EIO.")
@click.option("--stop", is_flag=True, help="Stop replicating: tracking only again.")
@click.option("--status", "show", is_flag=True, help="Only say what bmig-nbd does now.")
@click.option("--keep", is_flag=True,
              help="Stay running (the HA mode): catch up beside the replication, reconnect "
                   "with backoff after a failure, and return to synchronous by itself.")
@click.option("--config", "config_file", metavar="FILE",
              help="With --keep: the migration file (source, target, connection).")
@click.option("--source", metavar="PATH",
              help="With --keep: the device or file bmig-nbd serves (read by catch-up).")
@click.option("--control", metavar="SOCK", envvar="BMIG_CONTROL",
              help="With --keep: breqd's control socket (or BMIG_CONTROL).")
@click.option("--ack-timeout", type=click.FloatRange(0.1, 3600), default=10.0,
              show_default=True, metavar="SECONDS",
              help="The target is lost when it acknowledges nothing for this long.")
@manage_dir_option
@connection_options
@click.option("--log-level", type=click.Choice(bmig_log.LEVELS),
              help="Least severe message logged (with --keep: or log_level in --config) "
                   "[default: warning].")
@json_option
def replicate(name: str, to: str | None, protocol: str, policy: str, stop: bool, show: bool,
              keep: bool, config_file: str | None, source: str | None, control: str | None,
              ack_timeout: float, manage_dir: str, log_level: str | None, as_json: bool,
              **connection: Any) -> int | None:
    """Switch the bmig-nbd of NAME to synchronous replication to --to, or back (--stop).

    The application's NBD connections are not interrupted. Writes then go to both the
    source and the target; the chunks they write stay clean in breqd once they are
    durable on the target. Run `bmigrate sync` (or `bmigrate cutover`) beside it to
    ship what was dirty before, or use --keep, which does, and keeps it so.
    """
    mode = mode_of(click.get_current_context())
    if mode == KEEP:
        from bmig.cli.ha import keep as keep_up
        return keep_up(name, protocol, ack_timeout, manage_dir, config_file, as_json,
                       {"to": to, "source": source, "control": control,
                        "log_level": log_level, **connection})
    bmig_log.setup(log_level or "warning")
    if mode == START and not to:
        raise ConfigError("give --to URL to start replicating, --stop to stop, or --status")
    with ManageClient(manage_dir, name) as client:
        if show:
            status = client.call("status")
        elif stop:
            status = client.call("stop")
        else:
            status = client.call("replicate", url=to, protocol=protocol, policy=policy,
                                 options=replica_options(connection),
                                 ack_timeout=ack_timeout)
    status = {k: v for k, v in status.items() if k != "ok"}
    if as_json:
        print_json(status)
    else:
        click.echo(describe(status))
    return None
