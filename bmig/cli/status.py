"""bmigrate status and bmigrate verify: where a device stands, on either side.

Printing only: bmig.sender.status and bmig.receiver.records gather (in
bmig.devicestate's shape), bmig.cli.statustext words it, the Migration verifies.
"""

from __future__ import annotations

import sys
import time
from typing import Any, Callable

import click

from bmig.cli.common import control_option, json_option, print_json
from bmig.cli.options import connection_options, manage_dir_option, status_dir_option
from bmig.cli.report import JsonReporter
from bmig.cli.statustext import device_text, part_line, printable
from bmig.constants import DEFAULT_RECEIVER_STATE_DIR
from bmig.errors import EXIT_OK, BmigError, ConfigError, VerifyFailed
from bmig.receiver.records import receiver_status
from bmig.sender.settings import build
from bmig.sender.status import source_status, statuses

CLEAR = "\033[H\033[J"          # cursor home, clear to the end: a terminal's new page


def describe_record(t: dict) -> str:
    """A receiver's target record: ``EXPORT: consistent, secondary; generation ...``."""
    return f"{printable(str(t.get('export')))}: " + part_line("target", {k: v for k, v in t.items()
                                                         if k not in ("export", "side")})


def watch_option(f: Callable) -> Callable:
    f = click.option("--interval", type=click.FloatRange(0.1, 3600), default=2.0,
                     show_default=True, metavar="SECONDS",
                     help="With --watch: how often to look.")(f)
    return click.option("--watch", is_flag=True,
                        help="Print again every --interval seconds until interrupted.")(f)


def repeat(show: Callable[[], None], watch: bool, interval: float, clear: bool) -> int:
    """``show`` once, or every ``interval`` seconds until Ctrl-C (exit status 0); with
    ``watch`` a failure is printed and tried again at the next look."""
    if not watch:
        show()
        return EXIT_OK
    try:
        while True:
            if clear:
                click.echo(CLEAR, nl=False)
            try:
                show()
            except BmigError as exc:
                click.echo(f"bmigrate: {exc.message}", err=True)
            sys.stdout.flush()
            time.sleep(interval)
    except KeyboardInterrupt:
        return EXIT_OK


@click.command()
@click.argument("name", required=False)
@click.option("--to", "to", metavar="URL", help="Also ask the target for its record.")
@click.option("--receiver-state-dir", metavar="DIR",
              help="On the receiving host: show the target records in DIR "
                   f"(breceive's --state-dir, e.g. {DEFAULT_RECEIVER_STATE_DIR}).")
@manage_dir_option
@status_dir_option()
@control_option
@connection_options
@watch_option
@json_option
def status(name: str | None, to: str | None, receiver_state_dir: str | None,
           manage_dir: str, status_dir: str, control: str, watch: bool, interval: float,
           as_json: bool, **connection: Any) -> int:
    """Where devices stand: roles, generations, what is dirty, the lag, the last pass.

    On the source: bmigrate status [NAME [--to URL]], every device without NAME. On the
    receiving host: bmigrate status --receiver-state-dir DIR.
    """
    if name is not None and receiver_state_dir is not None:
        raise ConfigError("give NAME (a device breqd tracks) or --receiver-state-dir DIR, "
                          "not both")
    if to and name is None:
        raise ConfigError("--to needs NAME: the device whose target it is")
    clear = watch and not as_json and sys.stdout.isatty()

    def show() -> None:
        if receiver_state_dir is not None:
            records = receiver_status(receiver_state_dir)
            if as_json:
                print_json(records)
            else:
                for record in records:
                    click.echo(describe_record(record))
            return
        if name is not None:
            one = source_status(name, control, to, connection, manage_dir, status_dir)
            if as_json:
                print_json(one)
            else:
                click.echo(device_text(one))
            return
        every = statuses(control, None, manage_dir, status_dir)
        if as_json:
            print_json(every)
        elif not every:
            click.echo("no device is tracked")
        else:
            for one in every:
                click.echo(device_text(one))

    return repeat(show, watch, interval, clear)


@click.command("verify")
@click.argument("name")
@click.option("--source", metavar="PATH", required=True, help="The device or file to read.")
@click.option("--to", "to", metavar="URL", required=True, help="The target to compare with.")
@click.option("--sample", type=click.FloatRange(0, 1, min_open=True), metavar="F",
              help="Compare this fraction of the chunks, chosen at random.")
@click.option("--repair", is_flag=True,
              help="Mark the chunks that differ dirty, so that the next pass fixes them.")
@control_option
@connection_options
@json_option
def verify(name: str, source: str, to: str, sample: float | None, repair: bool, control: str,
           as_json: bool, **connection: Any) -> None:
    """Compare every chunk of NAME with the target by hash, while the device is live.

    Chunks written during the comparison are skipped and counted. Exit status 14 when
    chunks differ (unless --repair marked them dirty).
    """
    values = {"name": name, "source": source, "to": to, "control": control,
              **{k: v for k, v in connection.items() if v is not None}}
    migration = build(values, JsonReporter)
    migration.connect(mode="inspect")
    try:
        result = migration.verify(sample, repair)
        chunk = migration.info.chunk_size
    finally:
        migration.close()
    if as_json:
        print_json({**result.to_json(chunk), "device": name})
    else:
        click.echo(f"{name}: {result.chunks} chunks compared, {result.skipped} skipped "
                   f"(being written), {len(result.differing)} differ"
                   + ("; marked dirty, the next sync fixes them" if result.repaired else ""))
        for c in result.differing[:20]:
            click.echo(f"  differs: bytes {c * chunk} to {(c + 1) * chunk - 1}")
    if result.differing and not repair:
        raise VerifyFailed(f"{len(result.differing)} chunks differ between {source} and {to}")
