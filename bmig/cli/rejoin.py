"""bmigrate rejoin: on the former primary's host, make it the secondary of the new one.
Parsing and printing only: bmig.sender.rejoin does it."""

from __future__ import annotations

import click

from bmig.cli.common import control_option, human_bytes, json_option, print_json
from bmig.cli.options import manage_dir_option
from bmig.constants import DEFAULT_RECEIVER_STATE_DIR


@click.command()
@click.argument("name")
@click.option("--backing", metavar="PATH", required=True,
              help="The device or file NAME is (what bmig-nbd served).")
@click.option("--receiver-state-dir", metavar="DIR", default=DEFAULT_RECEIVER_STATE_DIR,
              show_default=True, help="The --state-dir of breceive on this host.")
@click.option("--export", metavar="EXPORT",
              help="The export breceive has for it [default: NAME].")
@click.option("--discard-my-data", "discard", is_flag=True,
              help="After a split brain (both sides written as primary): this side's "
                   "changes are the ones thrown away.")
@click.option("--checksum", is_flag=True,
              help="Compare every chunk by hash instead of trusting this side's bitmap.")
@manage_dir_option
@control_option
@json_option
def rejoin(name: str, backing: str, receiver_state_dir: str, export: str | None,
           discard: bool, checksum: bool, manage_dir: str, control: str,
           as_json: bool) -> None:
    """Make this former primary of NAME wait to be the secondary of the new one.

    bmig-nbd turns read-only; breceive on this host gets a record of this copy and the
    chunks it changed alone. The new primary's next sync (or its HA replication) ships
    the union of both sides' changes, and nothing else.
    """
    from bmig.sender.rejoin import RejoinSettings, rejoin as prepare

    report = prepare(RejoinSettings(name=name, control=control, manage_dir=manage_dir,
                                    backing=backing, state_dir=receiver_state_dir,
                                    export=export or name, discard=discard,
                                    checksum=checksum))
    if as_json:
        print_json(report)
        return
    what = (f"{report['ranges']} ranges ({human_bytes(report['bytes'])}) it changed alone"
            if report["resync"] == "ranges" else "every chunk compared by hash")
    click.echo(f"{name}: waits for its new primary as {report['export']} (generation "
               f"{report['generation']}); it gets back {what} and what changed there")
