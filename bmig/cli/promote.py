"""bmigrate promote: on the receiving host, the copy becomes the primary without its
source (a failover). Parsing and printing only: bmig.receiver.promotion does it, and the
breqd record the new primary is tracked by is added through breqd's control socket.
"""

from __future__ import annotations

import os
import sys

import click

from bmig.cli.common import connect, control_option, human_bytes, json_option, print_json, size_of
from bmig.constants import DEFAULT_RECEIVER_STATE_DIR
from bmig.errors import BmigError, ConfigError, DeviceExists
from bmig.lineage import target_path as record_path


@click.command()
@click.argument("name")
@click.option("--target", "target_path", metavar="PATH", required=True,
              help="The copy: the file or block device breceive writes for NAME.")
@click.option("--receiver-state-dir", metavar="DIR", default=DEFAULT_RECEIVER_STATE_DIR,
              show_default=True, help="breceive's --state-dir (the copy's record).")
@click.option("--fence", metavar="CMD",
              help="Run this first (power off the old source, take a reservation); when "
                   "it fails nothing is promoted.")
@click.option("--no-fence", is_flag=True,
              help="Promote without a fence, or even when the fence failed.")
@click.option("--force-inconsistent", is_flag=True,
              help="Promote a copy a pass was being applied to (chunks of different "
                   "moments).")
@click.option("--force-connected", is_flag=True,
              help="Promote although a session of the source still holds the copy.")
@click.option("--track", is_flag=True,
              help="Then track the promoted copy in this host's breqd (adopting its "
                   "record), so that bmig-nbd can serve it at once.")
@control_option
@json_option
def promote(name: str, target_path: str, receiver_state_dir: str, fence: str | None,
            no_fence: bool, force_inconsistent: bool, force_connected: bool, track: bool,
            control: str, as_json: bool) -> None:
    """Make the copy of NAME on this host the primary, without its source.

    Refuses an inconsistent copy and a source still connected unless forced; runs
    --fence first; gives the copy a new generation, so the old source is refused from
    then on; says what may have been lost (nothing under protocol C).
    """
    from bmig.receiver.promotion import PromoteSettings, promote as promote_copy
    from bmig.sender.hooks import run_hook

    if not os.path.exists(record_path(receiver_state_dir, name)):
        raise ConfigError(f"no record of {name} in {receiver_state_dir}: give breceive's "
                          "--state-dir as --receiver-state-dir")
    if track:
        size = tracking_possible(name, target_path, control)

    def fence_output(stream: str, line: str) -> None:
        sys.stderr.write(f"{name}: fence: {line}\n")
        sys.stderr.flush()

    report = promote_copy(
        PromoteSettings(state_dir=receiver_state_dir, export=name, target_path=target_path,
                        fence=fence, no_fence=no_fence,
                        force_inconsistent=force_inconsistent,
                        force_connected=force_connected),
        lambda command, env, timeout: run_hook(command, env, timeout, fence_output))
    if track:
        report["tracked"] = track_promoted(name, report["generation"], size,
                                           record_path(receiver_state_dir, name), control)
    if as_json:
        print_json(report)
        return
    lost = report["loss"]
    bound = lost["bytes_at_most"]
    click.echo(f"{name}: primary now, generation {report['generation']} (was "
               f"{report['previous_generation']}, {report['state']})")
    click.echo("  may have lost: " + ("nothing" if bound == 0 else
                                      "unknown" if bound is None else
                                      f"up to {human_bytes(bound)}") + f" ({lost['why']})")
    if track:
        click.echo(f"  tracked in breqd as {name}: serve it with bmig-nbd --device {name} "
                   f"--backing {os.path.abspath(target_path)}")


def tracking_possible(name: str, target_path: str, control: str) -> int:
    """Before anything is fenced or promoted, what --track needs: breqd reachable and NAME
    not tracked there yet; the target's size."""
    size = size_of(target_path)
    try:
        with connect(control) as client:
            tracked = {device["name"] for device in client.list_devices()}
    except BmigError as exc:
        raise type(exc)(f"{exc.message}; --track needs it: nothing was fenced or "
                        "promoted") from None
    if name in tracked:
        raise DeviceExists(f"breqd tracks {name!r} already, so --track cannot add the "
                           "promoted copy: nothing was fenced or promoted (remove it with "
                           f"bmigrate track remove {name} first, or promote without "
                           "--track)")
    return size


def track_promoted(name: str, generation: str, size: int, record: str,
                   control: str) -> dict:
    """Track the promoted copy in breqd, adopting its record. When that fails the copy
    stays promoted: the error says so and the command that finishes the work."""
    from bmig.cli.track import adopted_lineage

    try:
        lineage = adopted_lineage(record)
        with connect(control) as client:
            stats = client.add_device(name, size, None, lineage=lineage, clean=True)
    except BmigError as exc:
        raise type(exc)(f"{name} is promoted (generation {generation}) but not tracked: "
                        f"{exc.message}; track it with: bmigrate track add {name} "
                        f"--size {size} --adopt {os.path.abspath(record)}") from None
    return {"device_id": stats["device_id"], "generation": stats["generation"]}
