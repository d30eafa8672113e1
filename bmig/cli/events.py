"""bmigrate events: the changes of every device's state as JSON lines, as
``drbdsetup events2`` prints DRBD's.

First an ``exists`` event for each part of each device (with --now, only those, then it
exits), then, looking every --interval seconds, what changed: ``create``, ``change``
(with ``changed``: key -> [before, after]), ``destroy`` (bmig.devicestate.diff). A
statistic (bytes, seconds, counters) changes nothing unless --statistics asks for it.
breqd failing, at the start as later, is an ``error`` event (once), and the looking goes
on (with --now: the error, and its exit status).

Printing only: bmig.sender.status gathers.
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any

import click

from bmig.cli.common import control_option
from bmig.cli.options import manage_dir_option, status_dir_option
from bmig.devicestate import diff, exists
from bmig.errors import EXIT_OK, BmigError
from bmig.sender.status import statuses


def emit(event: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(event, sort_keys=True) + "\n")
    sys.stdout.flush()


@click.command()
@click.argument("name", required=False)
@click.option("--now", is_flag=True, help="Print the current state and exit.")
@click.option("--statistics", is_flag=True,
              help="Also report changes of byte counts, times and counters.")
@click.option("--interval", type=click.FloatRange(0.1, 3600), default=1.0,
              show_default=True, metavar="SECONDS", help="How often to look for changes.")
@manage_dir_option
@status_dir_option()
@control_option
def events(name: str | None, now: bool, statistics: bool, interval: float,
           manage_dir: str, status_dir: str, control: str) -> int:
    """Print the state of every device (or NAME) and then its changes, as JSON lines."""
    names = None if name is None else [name]
    failing: str | None = None

    def look() -> dict[str, dict[str, Any]] | None:
        """Every device's status; None (and an error event, once) while breqd fails."""
        nonlocal failing
        try:
            found = {s["device"]: s for s in statuses(control, names, manage_dir, status_dir)}
        except BmigError as exc:
            if exc.message != failing:
                failing = exc.message
                emit({"event": "error", "time": round(time.time(), 3),
                      "message": exc.message, "exit_code": exc.exit_code})
            if now:
                raise                # the line on stderr and the exit status too
            return None
        failing = None
        return found

    seen = look()                    # None: no state yet, "exists" once there is one
    try:
        while seen is None:
            time.sleep(interval)
            seen = look()
    except KeyboardInterrupt:
        return EXIT_OK
    for status in seen.values():
        for event in exists(status, float(status["time"])):
            emit(event)
    if now:
        return EXIT_OK
    try:
        while True:
            time.sleep(interval)
            current = look()
            if current is None:
                continue
            moment = time.time()
            for device in list(current) + [d for d in seen if d not in current]:
                for event in diff(seen.get(device), current.get(device), moment, statistics):
                    emit(event)
            seen = current
    except KeyboardInterrupt:
        return EXIT_OK
