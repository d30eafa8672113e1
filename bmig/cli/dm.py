"""bmig-dm: import what dm-era recorded into breqd, every few seconds or once.

The sender imports at each pass boundary itself; bmig-dm keeps breqd's bitmap current
between senders (bmigrate track status shows writes as they come) and keeps the eras
dm-era has to remember few.
"""

from __future__ import annotations

import logging
import signal
import threading

import click

from bmig import __version__
from bmig import log as bmig_log
from bmig import signalrelay
from bmig import systemd
from bmig.cli.common import add_verbosity, control_option, run
from bmig.cli.track_dm import dm_state_option
from bmig.errors import BmigError, InterceptError

DEFAULT_INTERVAL = 5.0


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="bmig-dm")
@click.argument("names", metavar="NAME...", nargs=-1, required=True)
@click.option("--interval", type=click.FloatRange(0.1, 3600), default=DEFAULT_INTERVAL,
              show_default=True, metavar="SECONDS", help="Time between imports.")
@click.option("--once", is_flag=True, help="Import each device once and exit.")
@dm_state_option
@control_option
@click.option("--log-level", type=click.Choice(bmig_log.LEVELS),
              help="Least severe message logged [default: info].")
def dm(names: tuple[str, ...], interval: float, once: bool, dm_state: str, control: str,
       log_level: str | None) -> int:
    """Import the writes dm-era recorded for each NAME into breqd."""
    from bmig.dm.intercept import DmIntercept

    bmig_log.setup(log_level or "info")
    log = logging.getLogger("bmig-dm")
    stop = threading.Event()
    if not once:        # set by a thread: a handler setting it could wait for ever
        signalrelay.relay({signal.SIGTERM: stop.set, signal.SIGINT: stop.set})
    intercepts = [DmIntercept(name, control, dm_state) for name in names]
    failed: set[str] = set()
    ready = False
    while True:
        for intercept in intercepts:
            try:
                result = intercept.import_eras()
            except InterceptError as exc:
                if once:
                    raise
                if intercept.name not in failed:
                    log.error("%s", exc.message)
                failed.add(intercept.name)
                continue
            except BmigError as exc:
                if once:
                    raise
                log.warning("%s: import failed: %s; trying again", intercept.name,
                            exc.message)
                continue
            failed.discard(intercept.name)
            log.debug("%s: imported up to era %d: %d bytes in %d ranges, %.3f s (I/O held "
                      "%.3f s)", intercept.name, result.era, result.bytes_marked,
                      result.ranges, result.seconds, result.boundary_seconds)
        if once:
            return 0
        if not ready:
            systemd.notify("READY=1")
            ready = True
        systemd.notify(f"STATUS=importing {len(intercepts) - len(failed)} of "
                       f"{len(intercepts)} devices every {interval:g} s")
        if stop.wait(interval):
            systemd.notify("STOPPING=1")
            return 0


add_verbosity(dm, "info")


def main() -> None:
    run(dm, "bmig-dm")
