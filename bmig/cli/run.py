"""bmigrate run: the catch-up service, keeping a target up to date until stopped.

Its options, signals and settings are sync's (``prepare`` and ``Signals`` in
bmig.cli.sync); what it adds is its status file, its state events and systemd's
notifications. A module of its own so that ``bmigrate sync``, which runs once, does not
load the service's code when it starts.
"""

from __future__ import annotations

from typing import Any

import click

from bmig import systemd
from bmig.cli.options import service_options, status_dir_option
from bmig.cli.report import ServiceTextReporter
from bmig.cli.statustext import status_line
from bmig.cli.sync import EXIT_INTERRUPTED, prepare
from bmig.errors import EXIT_OK
from bmig.sender.catchup import run_forever
from bmig.sender.runstate import ServiceState
from bmig.sender.statusfile import Publisher


@click.command("run")
@service_options
@click.option("--interval", type=click.FloatRange(0.05, 3600), metavar="SECONDS",
              help="How often to look for new writes when idle [default: 1].")
@click.option("--hot-refresh", type=click.FloatRange(1, 86400), metavar="SECONDS",
              help="Ship chunks still being written at most this often; others go once "
                   "their writes settle [default: 30].")
@status_dir_option(default=None)
def run_service(name: str | None, config_file: str | None, as_json: bool,
                **flags: Any) -> int:
    """Keep the target up to date until stopped (the catch-up service).

    Ships writes as they come, reconnects with backoff, reports its lag; SIGHUP reloads
    --config, SIGTERM stops cleanly.
    """
    migration, reporter, signals, values = prepare(
        "run", config_file, {"name": name, **flags}, as_json, ServiceTextReporter)
    publisher = Publisher(str(values["status_dir"]), migration.name)
    publisher.open()

    def publish(part: dict) -> None:
        publisher.write(part)
        systemd.notify("STATUS=" + status_line(migration.name, "service", part))

    state = ServiceState(migration.name, str(migration.url), on_event=reporter.service_event,
                         on_publish=publish)
    systemd.notify("READY=1")
    try:
        summary = run_forever(migration, state)
    finally:
        systemd.notify("STOPPING=1")
        migration.close()
        publisher.close()
    reporter.summary(summary)
    return EXIT_INTERRUPTED if signals.interrupted else EXIT_OK

