"""bmigrate sync: ship a device's dirty chunks to a target until the copy has converged.

It and ``bmigrate run`` (bmig.cli.run, which builds on ``prepare`` and ``Signals`` here)
take the same options, from flags or a TOML file (``--config``, one migration per
file; flags win). SIGHUP reloads the file: the bandwidth limit, compression level and
mode, threshold, interval and hot_refresh change at once. SIGTERM stops cleanly: what is in flight gets its
acknowledgement, what is not goes back to dirty. The first Ctrl-C does the same; a second
one stops at once.

Parsing, signals and exit codes only: the settings are bmig.sender.settings', the
passes bmig.sender.converge's.
"""

from __future__ import annotations

import logging
import signal
import sys
import threading
from typing import Any, Callable

import click

from bmig import log as bmig_log
from bmig import signalrelay
from bmig.cli.common import human_bytes
from bmig.cli.options import migration_options
from bmig.cli.report import JsonReporter, TextReporter
from bmig.errors import EXIT_LIVE, EXIT_OK, ConfigError
from bmig.sender import settings
from bmig.sender.converge import Migration

log = logging.getLogger("bmigrate")

EXIT_INTERRUPTED = 130


class Signals:
    """SIGTERM and the first Ctrl-C stop cleanly; the second Ctrl-C stops at once;
    SIGHUP reloads the migration file. Acted on in bmig.signalrelay's thread: a handler
    that set the stop event itself could wait for the main thread for ever."""

    def __init__(self, migration: Migration, reload: Callable[[], None] | None,
                 as_json: bool = False):
        self.migration = migration
        self.reload = reload
        self.as_json = as_json
        self.interrupted = False

    def install(self) -> None:
        signalrelay.relay({signal.SIGTERM: self._stop, signal.SIGINT: self._interrupt,
                           signal.SIGHUP: self._hup},
                          in_main={signal.SIGINT: self._interrupt_at_once})

    def _stop(self) -> None:
        self.migration.stop.set()

    def _interrupt_at_once(self) -> None:
        """In the main thread, in the handler: only reads (``is_set`` takes no lock)."""
        if self.migration.stop.is_set():
            raise KeyboardInterrupt

    def _interrupt(self) -> None:
        if self.migration.stop.is_set():
            return                      # the handler has stopped it at once already
        self.interrupted = True
        sys.stderr.write("bmigrate: stopping after what is in flight (Ctrl-C again to stop "
                         "at once)\n")
        self.migration.stop.set()

    def _hup(self) -> None:
        threading.Thread(target=self._reload, daemon=True).start()

    def _reload(self) -> None:
        if self.reload is None:
            log.warning("SIGHUP: nothing to reload without --config")
            return
        try:
            self.reload()
        except ConfigError as exc:
            log.error("reload refused: %s", exc.message)
            if self.as_json:          # scripts hear it too, not only the log
                self.migration.reporter.note(
                    f"{self.migration.name}: reload refused: {exc.message}; the running "
                    "settings stay", reload_refused=exc.message, error=exc.wire_code)


def prepare(command: str, config_file: str | None, flags: dict[str, Any], as_json: bool,
            text_reporter: type[TextReporter] = TextReporter):
    values = settings.settings_from(config_file, flags)
    bmig_log.setup(str(values.get("log_level", "warning")))
    reporter_class = JsonReporter if as_json else text_reporter
    migration = settings.build(values, reporter_class)
    migration.client_name = f"bmigrate {command}"      # how breqd names this sender
    reporter = migration.reporter

    def reload() -> None:
        settings.reload(migration, settings.settings_from(config_file, flags))
        bwlimit = migration.settings.bwlimit
        reporter.note(f"{migration.name}: settings reloaded (bwlimit "
                      f"{human_bytes(bwlimit) + '/s' if bwlimit else 'none'})",
                      reloaded=settings.RELOADABLE)

    signals = Signals(migration, reload if config_file else None, as_json)
    signals.install()
    return migration, reporter, signals, values


@click.command()
@migration_options
def sync(name: str | None, config_file: str | None, as_json: bool, **flags: Any) -> int:
    """Make passes until the copy has converged.

    Exit status 0 when the copy is identical (nothing dirty), 15 when it converged while
    the device is being written (what is still dirty ships in less than --threshold),
    10 when it does not converge (writes outpace shipping).
    """
    migration, reporter, signals, _ = prepare("sync", config_file, {"name": name, **flags},
                                              as_json)
    try:
        migration.connect()
        summary = migration.sync()
    finally:
        migration.close()
    reporter.summary(summary)
    if signals.interrupted or (migration.stop.is_set() and not summary.converged):
        return EXIT_INTERRUPTED
    return EXIT_OK if summary.identical else EXIT_LIVE
