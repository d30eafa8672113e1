"""bmigrate track attach and detach: the dm intercept under a live device-mapper device."""

from __future__ import annotations

import click

from bmig.cli.common import SIZE, control_option, json_option, print_json
from bmig.dm.state import DEFAULT_DM_STATE_DIR


def dm_state_option(f):
    return click.option("--dm-state", metavar="DIR", envvar="BMIG_DM_STATE",
                        default=DEFAULT_DM_STATE_DIR, show_default=True,
                        help="Where bmig keeps its dm intercept records (or BMIG_DM_STATE).")(f)


@click.command()
@click.argument("name")
@click.option("--dm", "device", metavar="DEVICE", required=True,
              help="The device-mapper device to track (an LVM volume, /dev/mapper/NAME).")
@click.option("--metadata", metavar="DEV",
              help="A block device for dm-era's metadata, overwritten [default: a file in "
                   "--dm-state on a loop device].")
@click.option("--era-block-size", type=SIZE, metavar="BYTES",
              help="dm-era's block size, a multiple of 4K [default: the chunk size].")
@click.option("--chunk-size", type=SIZE, default=None,
              help="Chunk size when NAME is not tracked yet [default: 64K].")
@dm_state_option
@control_option
@json_option
def attach(name: str, device: str, metadata: str | None, era_block_size: int | None,
           chunk_size: int | None, dm_state: str, control: str, as_json: bool) -> None:
    """Start tracking writes to the live dm device DEVICE as NAME, with dm-era.

    Nothing is unmounted: the device's table is swapped while its I/O is held for a few
    milliseconds. NAME is added to breqd if it is not tracked yet; every chunk is dirty.
    """
    from bmig.dm.intercept import DmIntercept

    done = DmIntercept(name, control, dm_state).attach(device, metadata, era_block_size,
                                                       chunk_size)
    if as_json:
        print_json(done)
        return
    click.echo(f"{name}: tracking {done['device']} with dm-era ({done['era_block_size']}-byte "
               f"blocks, metadata {done['metadata']}); I/O held "
               f"{done['held_seconds'] * 1000:.1f} ms; every chunk dirty")


@click.command()
@click.argument("name")
@click.option("--dm", "device", metavar="DEVICE",
              help="The device, when bmig's record of NAME is gone.")
@dm_state_option
@control_option
@json_option
def detach(name: str, device: str | None, dm_state: str, control: str,
           as_json: bool) -> None:
    """Stop tracking NAME's dm device: its own table comes back, bmig's layers go.

    Writes after this are not tracked: a later attach sets every chunk dirty.
    """
    from bmig.dm.intercept import DmIntercept

    done = DmIntercept(name, control, dm_state).detach(device)
    if as_json:
        print_json(done)
        return
    click.echo(f"{name}: {done['device']} detached (I/O held "
               f"{done['held_seconds'] * 1000:.1f} ms); its writes are no longer tracked")


def intercepts(names: list[str], dm_state: str) -> dict[str, dict | None]:
    """The intercept of each device for ``track status``: the dm record, or None."""
    from bmig.dm.intercept import DmIntercept

    return {name: DmIntercept(name, "", dm_state).describe() for name in names}
