"""bmigrate status and bmigrate verify: where a device stands, on either side."""

from __future__ import annotations

import os
from typing import Any

import click

from bmig.cli.common import control_option, human_bytes, json_option, print_json
from bmig.cli.replicate import manage_dir_option
from bmig.cli.replicate import mode as describe_nbd
from bmig.cli.sync import build, connection_options
from bmig.constants import DEFAULT_RECEIVER_STATE_DIR
from bmig.errors import BmigError, ConfigError, UnreachableError, VerifyFailed
from bmig.lineage import TARGET_SUFFIX, load_target
from bmig.nbd.manage_client import ManageClient
from bmig.sender.targets import open_target
from bmig.sender.verify import verify as verify_chunks
from bmig.tracker.client import TrackerClient
from bmig.wire.options import ConnectOptions
from bmig.wire.urls import parse_target_url


def source_status(name: str, control: str, to: str | None, connection: dict,
                  manage_dir: str | None = None) -> dict:
    """This side's view of NAME (breqd; bmig-nbd's, when one serves NAME in
    ``manage_dir``), and the target's record when --to is given."""
    with TrackerClient(control, client="bmigrate") as client:
        stats = client.stats(name)
    out: dict[str, Any] = {"device": name, "side": "source", "role": stats["role"],
                           "generation": stats["generation"], "device_id": stats["device_id"],
                           "dirty_bytes": stats["dirty_bytes"],
                           "inflight_bytes": stats["inflight_bytes"],
                           "held_bytes": stats["held_bytes"],
                           "mirrored_bytes": stats["mirrored_bytes"],
                           "successor": stats["successor"]}
    if manage_dir is not None:
        out["nbd"] = nbd_status(manage_dir, name)
    if to:
        url = parse_target_url(to)
        target = open_target(url, ConnectOptions.from_dict(connection))
        try:
            status = target.status()
        finally:
            target.close()
        records = [t for t in status.get("targets", []) if t.get("export") == url.export]
        out["target"] = records[0] if records else None
    return out


def nbd_status(manage_dir: str, name: str) -> dict | None:
    """What the bmig-nbd serving NAME says of itself (replication, freeze, a failed
    source), or None when none serves it."""
    try:
        with ManageClient(manage_dir, name, timeout=10) as client:
            status = client.call("status")
    except UnreachableError:
        return None
    return {k: v for k, v in status.items() if k != "ok"}


def receiver_status(state_dir: str) -> list[dict]:
    """Every target record in a receiver's state directory."""
    try:
        names = sorted(n[:-len(TARGET_SUFFIX)] for n in os.listdir(state_dir)
                       if n.endswith(TARGET_SUFFIX))
    except OSError as exc:
        raise ConfigError(f"cannot read {state_dir}: {exc.strerror}") from None
    out = []
    for export in names:
        try:
            out.append({"side": "target", **load_target(state_dir, export).to_json()})
        except BmigError as exc:
            out.append({"side": "target", "export": export, "error": exc.message})
    return out


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
    migration, _ = build(values, as_json=True)
    migration.connect(mode="inspect")
    try:
        m = migration
        assert m._tracker and m._source and m._target and m._info
        result = verify_chunks(m._tracker, m._source, m._target, name, m._info.size,
                               m._info.chunk_size, sample, repair)
        chunk = m._info.chunk_size
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
