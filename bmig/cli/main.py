"""bmigrate: the operator's command.

Only the group: each command lives in its own module, imported when that command runs
(or when help or the manual's checks ask for every command). A ``bmigrate sync`` with
nothing to ship is mostly the interpreter and its imports; loading cutover's, the
device-mapper's and the HA commands' modules as well cost it about a third of its time.
"""

from __future__ import annotations

import importlib

import click

from bmig import __version__
from bmig.cli.common import add_verbosity, run

# name -> "module:attribute" of the click command
COMMANDS: dict[str, str] = {
    "track": "bmig.cli.track:track",
    "sync": "bmig.cli.sync:sync",
    "run": "bmig.cli.run:run_service",
    "replicate": "bmig.cli.replicate:replicate",
    "cutover": "bmig.cli.cutover:cutover",
    "status": "bmig.cli.status:status",
    "verify": "bmig.cli.status:verify",
    "events": "bmig.cli.events:events",
    "metrics": "bmig.cli.metrics:metrics",
    "promote": "bmig.cli.promote:promote",
    "rejoin": "bmig.cli.rejoin:rejoin",
}


class LazyGroup(click.Group):
    """A group whose commands are imported on first use, each given -v and -q as it
    loads unless it has a --log-level of its own (as ``add_verbosity`` does for a group
    whose commands are all there)."""

    def __init__(self, *args, lazy: dict[str, str], **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.lazy = dict(lazy)

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*self.commands, *self.lazy})

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name not in self.commands and cmd_name in self.lazy:
            module, _, attribute = self.lazy[cmd_name].partition(":")
            command = getattr(importlib.import_module(module), attribute)
            assert command.name == cmd_name, (cmd_name, command.name)
            if not any(p.name == "log_level" for p in command.params):
                add_verbosity(command)          # one way: its own --log-level
            self.add_command(command)
        return self.commands.get(cmd_name)


@click.group(cls=LazyGroup, lazy=COMMANDS,
             context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="bmigrate")
def cli() -> None:
    """Move a live block device to another host with seconds of downtime."""


def load_named_command(args: list[str]) -> None:
    """Import the module of the command ``args`` name (the first word that is not an
    option), so that ``bmig.cli.bmigrate`` can load it while the garbage collector
    sleeps; click finds it loaded. Nothing for help, --version or an unknown name."""
    name = next((a for a in args if not a.startswith("-")), None)
    if name in COMMANDS:
        cli.get_command(click.Context(cli), name)


def main() -> None:
    run(cli, "bmigrate")
