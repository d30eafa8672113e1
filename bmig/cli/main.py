"""bmigrate: the operator's command.

Only the group: each command lives in its own module.
"""

from __future__ import annotations

import click

from bmig import __version__
from bmig.cli.common import add_verbosity, run
from bmig.cli.cutover import cutover
from bmig.cli.events import events
from bmig.cli.metrics import metrics
from bmig.cli.promote import promote
from bmig.cli.rejoin import rejoin
from bmig.cli.replicate import replicate
from bmig.cli.status import status, verify
from bmig.cli.sync import run_service, sync
from bmig.cli.track import track


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="bmigrate")
def cli() -> None:
    """Move a live block device to another host with seconds of downtime."""


cli.add_command(track)
cli.add_command(sync)
cli.add_command(run_service)
cli.add_command(replicate)
cli.add_command(cutover)
cli.add_command(status)
cli.add_command(verify)
cli.add_command(events)
cli.add_command(metrics)
cli.add_command(promote)
cli.add_command(rejoin)
add_verbosity(cli)            # last: -v and -q on every command above


def main() -> None:
    run(cli, "bmigrate")
