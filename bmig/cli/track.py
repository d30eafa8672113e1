"""bmigrate track: which devices breqd tracks, and how much of each is dirty.

The command parses and prints: every change goes through breqd's control socket. It reads
a promoted target's record for ``add --adopt``, and never writes a definition file or a
bitmap itself.
"""

from __future__ import annotations

import click

from bmig.cli.common import SIZE, connect, control_option, human_bytes, json_option, print_json, size_of
from bmig.cli.options import manage_dir_option
from bmig.cli.track_dm import attach, detach, dm_state_option, intercepts
from bmig.errors import ConfigError


@click.group()
def track() -> None:
    """Add, remove and inspect the devices breqd tracks."""


@track.command()
@click.argument("name")
@click.option("--size", type=SIZE, help="Device size in bytes (units: K, M, G, T).")
@click.option("--size-of", "size_path", metavar="PATH",
              help="Take the size from this file or block device.")
@click.option("--chunk-size", type=SIZE, default=None,
              help="Bytes per bitmap bit: a power of two, 4K to 16M [default: 64K].")
@click.option("--adopt", "adopt", metavar="RECORD",
              help="Carry on the lineage of a promoted target (its EXPORT.target record), "
                   "starting with nothing dirty: the new primary after a cutover.")
@control_option
@json_option
def add(name: str, size: int | None, size_path: str | None, chunk_size: int | None,
        adopt: str | None, control: str, as_json: bool) -> None:
    """Start tracking writes to NAME. Every chunk starts dirty (with --adopt: clean)."""
    if (size is None) == (size_path is None):
        raise ConfigError("give the device size with --size BYTES or --size-of PATH")
    if size_path is not None:
        size = size_of(size_path)
    lineage = adopted_lineage(adopt) if adopt else None
    with connect(control) as client:
        stats = client.add_device(name, size, chunk_size, lineage=lineage,
                                  clean=lineage is not None)
    if as_json:
        print_json(stats)
    else:
        click.echo(f"tracking {name}: {human_bytes(stats['size'])} in "
                   f"{human_bytes(stats['chunk_size'])} chunks, device id {stats['device_id']}")


def adopted_lineage(path: str) -> dict:
    """The lineage a promoted target's record hands on: only a primary copy may be
    adopted (promoted by a cutover, or by ``bmigrate promote`` without its source, which
    also took an inconsistent copy only when forced): from then on every write to it is
    tracked, and a rejoin of its former source ships what changed here since."""
    import os

    from bmig.lineage import ROLE_PRIMARY, STATE_NEW, hex_id, load_target

    directory, name = os.path.split(os.path.abspath(path))
    if not name.endswith(".target"):
        raise ConfigError(f"{path}: not a target record (EXPORT.target in breceive's state "
                          "directory)")
    if not os.path.exists(path):
        raise ConfigError(f"{path}: no such file")
    record = load_target(directory, name[:-len(".target")])
    if record.role != ROLE_PRIMARY or record.state == STATE_NEW:
        raise ConfigError(f"{path}: {record.export} is {record.role} and {record.state}; only "
                          "a target promoted (by a cutover or bmigrate promote) can be "
                          "adopted")
    return {"generation": hex_id(record.generation), "previous": list(record.previous)}


@track.command()
@click.argument("name")
@control_option
@json_option
def remove(name: str, control: str, as_json: bool) -> None:
    """Stop tracking NAME. Its bitmap stays in the state directory."""
    with connect(control) as client:
        result = client.remove_device(name)
    if as_json:
        print_json({"name": name, "state_file": result.get("state_file")})
        return
    click.echo(f"stopped tracking {name}; bitmap kept in {result.get('state_file')}")


@track.command("list")
@control_option
@json_option
def list_(control: str, as_json: bool) -> None:
    """List tracked devices, one name per line."""
    with connect(control) as client:
        devices = client.list_devices()
    if as_json:
        print_json([d["name"] for d in devices])
    else:
        for device in devices:
            click.echo(device["name"])


@track.command()
@click.argument("name", required=False)
@dm_state_option
@control_option
@json_option
def status(name: str | None, dm_state: str, control: str, as_json: bool) -> None:
    """Size, chunk size, dirty and in-flight bytes of NAME or of every device, and its
    intercept (dm, or - when writes reach breqd through bmig-nbd).

    With --json: one object for NAME, or an array of objects.
    """
    with connect(control) as client:
        devices = [client.stats(name)] if name else client.list_devices()
    found = intercepts([d["name"] for d in devices], dm_state)
    for d in devices:
        d["intercept"] = found.get(d["name"])
    if as_json:
        print_json(devices[0] if name else devices)
        return
    if not devices:
        click.echo("no devices tracked")
        return
    rows = [("NAME", "SIZE", "CHUNK", "DIRTY", "IN FLIGHT", "DIRTY %", "INTERCEPT")]
    for d in devices:
        percent = 100.0 * d["dirty_bytes"] / d["size"] if d["size"] else 0.0
        rows.append((d["name"], human_bytes(d["size"]), human_bytes(d["chunk_size"]),
                     human_bytes(d["dirty_bytes"]), human_bytes(d["inflight_bytes"]),
                     f"{percent:.1f}", intercept_text(d.get("intercept"))))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        click.echo("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())
    for d in devices:
        if d.get("recovered") and d["recovered"] != "no saved bitmap":
            click.echo(f"note: {d['name']}: saved bitmap was not trusted ({d['recovered']}); "
                       "everything was set dirty", err=True)


def intercept_text(intercept: dict | None) -> str:
    if not intercept:
        return "-"
    if intercept["state"] != "attached":
        return f"dm {intercept['device']} ({intercept['state']})"
    return f"dm {intercept['device']} era {intercept.get('era')}"


track.add_command(attach)
track.add_command(detach)


@track.command("set-dirty")
@click.argument("name")
@control_option
@json_option
def set_dirty(name: str, control: str, as_json: bool) -> None:
    """Mark every chunk of NAME dirty: the next sync ships the whole device.

    With --json: the device's status afterwards.
    """
    with connect(control) as client:
        client.set_all_dirty(name)
        stats = client.stats(name) if as_json else None
    if stats is not None:
        print_json(stats)
        return
    click.echo(f"{name}: every chunk is dirty")


@track.command("clear")
@click.argument("name")
@click.option("--force", is_flag=True, help="Required: this forgets every dirty chunk.")
@control_option
@json_option
def clear(name: str, force: bool, control: str, as_json: bool) -> None:
    """Forget every dirty chunk of NAME (only when the target is known to be identical).

    With --json: the device's status afterwards.
    """
    with connect(control) as client:
        client.clear_all(name, force=force)
        stats = client.stats(name) if as_json else None
    if stats is not None:
        print_json(stats)
        return
    click.echo(f"{name}: every dirty chunk cleared")


@track.command("set-role")
@click.argument("name")
@click.argument("role", type=click.Choice(["primary", "handed-over"]))
@click.option("--new-generation", is_flag=True,
              help="With primary: start a new generation, for a primary confirmed while "
                   "its copy may have been promoted (a split brain is then told apart).")
@manage_dir_option
@control_option
@json_option
def set_role(name: str, role: str, new_generation: bool, manage_dir: str,
             control: str, as_json: bool) -> None:
    """Say whether NAME is the primary copy of its data.

    A cutover records the source as handed-over, and bmig-nbd then serves it read-only.
    Making it primary again is a deliberate split of the lineage: the former target
    refuses it anyway (another generation), unless told to discard its data. With
    primary, the bmig-nbd serving NAME (found in --manage-dir) is told at once: it serves
    the device writable unless a cutover or rejoin in progress still asks for read-only.
    """
    if new_generation and role != "primary":
        raise click.UsageError("--new-generation goes with primary only",
                               click.get_current_context())

    from bmig.errors import UnreachableError
    from bmig.nbd.manage_client import ManageClient

    before = None
    if role == "primary":
        try:
            with ManageClient(manage_dir, name, timeout=30) as nbd:
                before = nbd.call("status")
        except UnreachableError:
            before = None
    with connect(control) as client:
        stats = client.stats(name)
        kept = ha_kept(stats, before, manage_dir) if role == "primary" else None
        clear_ha = role == "primary" and bool(stats.get("ha")) and kept is None
        stats = client.set_lineage(name, role, new_generation=new_generation,
                                   ha=False if clear_ha else None)
    after = None
    if before is not None:
        try:
            with ManageClient(manage_dir, name, timeout=30) as nbd:
                after = nbd.call("confirm")
        except UnreachableError:
            after = None                    # it stopped meanwhile: one started is told

    if as_json:
        print_json({**stats, "bmig_nbd": after, "ha_kept": kept})
        return
    click.echo(f"{name}: {stats['role']}, generation {stats['generation']}")
    if role != "primary":
        return
    if after is None:
        click.echo(f"  no bmig-nbd serves it (no control socket in {manage_dir}): one "
                   "started now serves it " + ("read-only until its role is confirmed "
                                               "again" if kept else "writable"))
    elif after.get("read_only"):
        click.echo("  bmig-nbd still serves it read-only: a cutover or rejoin in progress "
                   "asks for it (see its log)")
    else:
        click.echo("  bmig-nbd serves it writable")
    if kept:
        click.echo(f"  it stays marked for the HA replication: {kept}")


def ha_kept(stats: dict, nbd: dict | None, manage_dir: str) -> str | None:
    """Why a device confirmed as primary stays marked HA in breqd (a restarted bmig-nbd
    then serves it read-only until the HA replication or an operator confirms it), or
    None when the mark can go: no HA replication runs for it."""
    if not stats.get("ha"):
        return None
    if nbd is None:
        return (f"no bmig-nbd answers in {manage_dir}, so whether its HA replication runs "
                "is unknown; run this again once bmig-nbd runs")
    ha = nbd.get("ha")
    if ha:
        return (f"its HA replication runs ({ha.get('state')}), and confirms it itself "
                "while its target is still its secondary")
    return None
