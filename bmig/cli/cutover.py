"""bmigrate cutover: hand the workload over to the target, with a downtime report;
``--check`` only tests its preconditions.

Flags in, reports out: the steps are bmig.sender.cutover's, the checks
bmig.sender.precheck's. stdout carries the result (with --json only JSON lines, each
with a time); the steps, notes and the hooks' output go to stderr in text mode.
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any

import click

from bmig import log as bmig_log
from bmig.cli.common import control_option, json_option
from bmig.cli.options import connection_options, manage_dir_option
from bmig.cli.report import JsonReporter, TextReporter
from bmig.constants import (DEFAULT_RECEIVER_STATE_DIR, REPLICATION_POLICIES,
                            REPLICATION_PROTOCOLS)
from bmig.errors import ConfigError, HookFailed
from bmig.sender.cutover import Cutover, CutoverSettings
from bmig.sender.dm_cutover import DmFreezeCutover, DmNbdCutover
from bmig.sender.precheck import Check, Precheck
from bmig.sender.settings import build, replica_options


def text_report(event: dict) -> None:
    kind = event.get("event")
    if kind == "step":
        if event.get("status") == "started":
            sys.stderr.write(f"{event['device']}: step {event['step']}: {event['name']}...\n")
        else:
            extra = ", ".join(f"{k} {v}" for k, v in event.items()
                              if k not in ("event", "device", "step", "name", "status",
                                           "seconds"))
            sys.stderr.write(f"{event['device']}: step {event['step']}: {event['name']} "
                             f"done in {event['seconds']:.2f} s{'; ' + extra if extra else ''}"
                             "\n")
    elif kind == "downtime":
        sys.stderr.write(f"{event['device']}: downtime {event['seconds']:.3f} s\n")
    elif kind == "note":
        sys.stderr.write(event["message"] + "\n")
    elif kind == "hook-output":
        sys.stderr.write(f"{event['device']}: {event['hook']}: {event['line']}\n")
    sys.stderr.flush()


def json_report(event: dict) -> None:
    """One event, one line on stdout, with the time it happened."""
    sys.stdout.write(json.dumps({"time": round(time.time(), 3), **event}, sort_keys=True)
                     + "\n")
    sys.stdout.flush()


def text_check(check: Check) -> None:
    state = {True: "ok", False: "FAILED", None: "skipped"}[check.ok]
    click.echo(f"{state:8} {check.name:10} {check.message}")


@click.command()
@click.argument("name")
@click.option("--source", metavar="PATH", required=True,
              help="The device or file bmig-nbd serves.")
@click.option("--to", "to", metavar="URL", required=True,
              help="breceive holding the copy: tcp://, tls:// or ssh://.")
@click.option("--pre-handover", metavar="CMD",
              help="Run before the handover: stop the application (downtime starts).")
@click.option("--post-handover", metavar="CMD",
              help="Run after it: start the application on the other side.")
@click.option("--check", "check_only", is_flag=True,
              help="Only test every precondition, changing nothing; the exit status says "
                   "which failed first.")
@click.option("--freeze", is_flag=True,
              help="Hold new writes in bmig-nbd for the handover (the default without "
                   "--pre-handover).")
@click.option("--verify", is_flag=True, help="Compare every chunk's hash before handing over.")
@click.option("--verify-sample", type=click.FloatRange(0, 1, min_open=True), metavar="F",
              help="With --verify: compare this fraction of the chunks, chosen at random.")
@click.option("--timeout", type=click.FloatRange(1), default=600, show_default=True,
              metavar="SECONDS",
              help="How long the drain may take (step 2), and how long a running sender "
                   "may take to give the device up before it.")
@click.option("--protocol", type=click.Choice(REPLICATION_PROTOCOLS), default="C",
              show_default=True,
              help="Replication protocol while draining.")
@click.option("--policy", type=click.Choice(REPLICATION_POLICIES), default="degrade",
              show_default=True,
              help="If the target fails while draining: back to tracking only, or fail "
                   "writes with EIO (the cutover stops either way).")
@click.option("--keep-writable", is_flag=True,
              help="Do not turn bmig-nbd read-only after the handover.")
@click.option("--hook-timeout", type=click.FloatRange(1), default=300, show_default=True,
              metavar="SECONDS", help="How long a hook may run.")
@click.option("--via-nbd", is_flag=True,
              help="A device tracked by dm-era: switch it onto bmig-nbd and replicate "
                   "with --protocol, instead of freezing it for the drain.")
@click.option("--nbd-device", metavar="DEV",
              help="With --via-nbd: the kernel NBD device to use [default: a free one].")
@click.option("--record-dir", metavar="DIR", default=DEFAULT_RECEIVER_STATE_DIR,
              show_default=True,
              help="Record the handed-over source here, as breceive would, for a fail-back.")
@manage_dir_option
@control_option
@connection_options
@click.option("--log-level", type=click.Choice(bmig_log.LEVELS),
              help="Least severe message logged [default: warning].")
@json_option
def cutover(name: str, source: str, to: str, pre_handover: str | None,
            post_handover: str | None, check_only: bool, freeze: bool, verify: bool,
            verify_sample: float | None, timeout: float, protocol: str, policy: str,
            keep_writable: bool, hook_timeout: float, via_nbd: bool, nbd_device: str | None,
            record_dir: str, manage_dir: str, control: str, log_level: str | None,
            as_json: bool, **connection: Any) -> int | None:
    """Hand the workload of NAME over to the target at --to.

    Switches to protocol C, drains, stops the application (--pre-handover) or freezes
    writes, flushes both sides, optionally verifies, gives the target a new generation
    (it becomes the primary; this source can no longer write to it) and turns bmig-nbd
    read-only, then starts the application on the other side (--post-handover). The
    downtime is reported. A failure before the handover leaves this source primary and
    writable. A bmigrate run shipping NAME gives the device up when the cutover starts.
    """
    bmig_log.setup(log_level or "warning")
    if check_only:                     # a rehearsal writes nothing, not even a host key
        connection["accept_new_host_key"] = None
    values = {"name": name, "source": source, "to": to, "control": control,
              "threshold": "0", "manage_dir": manage_dir,
              **{k: v for k, v in connection.items() if v is not None}}
    migration = build(values, JsonReporter if as_json else TextReporter)
    report = json_report if as_json else text_report
    if check_only:
        return check(migration, manage_dir, pre_handover, post_handover, as_json)
    settings = CutoverSettings(
        manage_dir=manage_dir, protocol=protocol, policy=policy, pre_handover=pre_handover,
        post_handover=post_handover, freeze=freeze, verify=verify,
        verify_sample=verify_sample, timeout=timeout, keep_writable=keep_writable,
        hook_timeout=hook_timeout, record_dir=record_dir,
        replicate_options=replica_options(connection))
    if migration.intercept is not None and via_nbd:     # dm-era, switched onto bmig-nbd
        job: Cutover = DmNbdCutover(migration, to, settings, report, nbd_device)
    elif migration.intercept is not None:               # dm-era under a dm device
        job = DmFreezeCutover(migration, to, settings, report)
    elif via_nbd or nbd_device:
        raise ConfigError(f"--via-nbd is for a device tracked by dm-era (bmigrate track "
                          f"attach {name} --dm DEVICE); {name} is tracked through bmig-nbd "
                          "already")
    else:
        job = Cutover(migration, to, settings, report)
    try:
        result = job.run()
    except HookFailed:
        if job.result.handed_over and as_json:     # the scripts must hear it happened
            json_report(job.result.to_json())
        raise
    finally:
        job.close()
    if as_json:
        json_report(result.to_json())
    else:
        click.echo(f"{name}: handed over to {to} (generation {result.generation}); "
                   f"downtime {result.downtime:.3f} s")


def check(migration, manage_dir: str, pre_handover: str | None, post_handover: str | None,
          as_json: bool) -> int:
    """cutover --check: each check a line (a "check" event with --json), then the exit
    status of the first that failed."""
    device = migration.name

    def report(check: Check) -> None:
        if as_json:
            json_report({**check.to_json(), "device": device})
        else:
            text_check(check)
    precheck = Precheck(migration, manage_dir,
                        {"pre-handover": pre_handover, "post-handover": post_handover},
                        report)
    precheck.run()
    failed = precheck.failed()
    if as_json:
        json_report({"event": "checked", "device": device, "ok": failed is None,
                     "exit_code": failed.exit_code if failed else 0})
    elif failed is not None:
        click.echo(f"bmigrate: cutover --check: {failed.name}: {failed.message}", err=True)
    return failed.exit_code if failed else 0
