"""bmigrate status and bmigrate verify: where a device stands, on either side.

Printing only: bmig.sender.status and bmig.receiver.records gather, the Migration
verifies.
"""

from __future__ import annotations

from typing import Any

import click

from bmig.cli.common import control_option, human_bytes, json_option, print_json
from bmig.cli.options import connection_options, manage_dir_option
from bmig.cli.replicate import mode as describe_nbd
from bmig.cli.report import JsonReporter
from bmig.constants import DEFAULT_RECEIVER_STATE_DIR
from bmig.errors import ConfigError, VerifyFailed
from bmig.receiver.records import receiver_status
from bmig.sender.settings import build
from bmig.sender.status import source_status


def describe_source(s: dict) -> str:
    lines = [f"{s['device']}: {s['role']}, generation {s['generation']}, "
             f"{human_bytes(s['dirty_bytes'])} dirty, {human_bytes(s['inflight_bytes'])} in "
             f"flight" + (f", {human_bytes(s['mirrored_bytes'])} being replicated"
                          if s["mirrored_bytes"] else "")]
    if s["role"] == "handed-over":
        lines.append(f"  handed over to generation {s['successor']}: the target is the "
                     "primary now")
    nbd = s.get("nbd")
    if nbd is not None:
        lines.append("  bmig-nbd: " + describe_nbd(nbd))
    target = s.get("target", "absent")
    if target is None:
        lines.append("  target: no record of this export")
    elif target != "absent":
        lines.append("  target: " + describe_record(target))
    return "\n".join(lines)


def describe_record(t: dict) -> str:
    if "error" in t:
        return f"{t['export']}: {t['error']}"
    return (f"{t['export']}: {t['role']}, {t['state']}, generation {t['generation']} of "
            f"device {t['source_device_id']}, {t['passes']} passes")


@click.command()
@click.argument("name", required=False)
@click.option("--to", "to", metavar="URL", help="Also ask the target for its record.")
@click.option("--receiver-state-dir", metavar="DIR",
              help="On the receiving host: show the target records in DIR "
                   f"(breceive's --state-dir, e.g. {DEFAULT_RECEIVER_STATE_DIR}).")
@manage_dir_option
@control_option
@connection_options
@json_option
def status(name: str | None, to: str | None, receiver_state_dir: str | None,
           manage_dir: str, control: str, as_json: bool, **connection: Any) -> None:
    """Which side is primary, the generations, the state and the lag.

    On the source: bmigrate status NAME [--to URL]. On the receiving host: bmigrate
    status --receiver-state-dir DIR.
    """
    if (name is None) == (receiver_state_dir is None):
        raise ConfigError("give NAME (a device breqd tracks) or --receiver-state-dir DIR")
    if receiver_state_dir is not None:
        records = receiver_status(receiver_state_dir)
        if as_json:
            print_json(records)
        else:
            for record in records:
                click.echo(describe_record(record))
        return
    assert name is not None
    result = source_status(name, control, to, connection, manage_dir)
    if as_json:
        print_json(result)
    else:
        click.echo(describe_source(result))


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
