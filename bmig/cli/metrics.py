"""bmigrate metrics: every device's status in the Prometheus text format, for
node_exporter's textfile collector (a timer runs ``bmigrate metrics --output
/var/lib/prometheus/node-exporter/bmig.prom``) or any scraper that reads a file.

--output replaces the file whole (a fresh temporary file, mode 0644, renamed over it), so
the collector never reads half of one, and a name planted in the directory (the
collector's directory is often writable by others) is never opened or followed. When breqd does not answer, the file still says so
(``bmig_breqd_up 0``) and the exit status is 4.

Printing only: bmig.sender.status gathers, bmig.metrics formats.
"""

from __future__ import annotations

import click

from bmig.cli.common import control_option
from bmig.cli.options import manage_dir_option, status_dir_option
from bmig.errors import EXIT_OK, ConfigError, UnreachableError
from bmig.metrics import prometheus
from bmig.sender.status import statuses
from bmig.sender.statusfile import replace_file


def write_file(path: str, text: str) -> None:
    """Replace ``path`` with ``text``, readable by the collector (mode 0644)."""
    try:
        replace_file(path, text.encode(), 0o644)
    except OSError as exc:
        raise ConfigError(f"cannot write {path}: {exc.strerror}") from None


@click.command()
@click.argument("name", required=False)
@click.option("--output", metavar="FILE",
              help="Write FILE (replaced whole) instead of standard output.")
@manage_dir_option
@status_dir_option()
@control_option
def metrics(name: str | None, output: str | None, manage_dir: str, status_dir: str,
            control: str) -> int:
    """Print the lag, dirty bytes, pass rates, states and errors of every device (or
    NAME) in the Prometheus text format."""
    failure: UnreachableError | None = None
    try:
        found = statuses(control, None if name is None else [name], manage_dir, status_dir)
    except UnreachableError as exc:
        failure, found = exc, []
    text = prometheus(found, breqd_up=failure is None)
    if output:
        write_file(output, text)
    else:
        click.echo(text, nl=False)
    if failure is not None:
        raise failure
    return EXIT_OK
