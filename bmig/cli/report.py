"""How a migration shows itself: a progress bar on a terminal, one line per pass
otherwise, JSON event lines with --json.

stdout carries results (the --json event lines, the final summary); stderr carries
progress and log lines, so ``bmigrate sync --json | jq`` sees only JSON.

``bmigrate run`` is a service: its text goes through logging (ServiceTextReporter), each
line at its level, so that the journal gets priorities and is not filled with a line per
pass: passes at debug, the periodic summary at info, changes of state at notice or
warning (bmig.sender.runstate decides which). With --json its changes of state are
``change`` events and its periodic summary a ``status`` event (bmig.devicestate's
shape) among the others.

Rendering only: it decides nothing about the migration.
"""

from __future__ import annotations

import json
import logging
import sys
import threading
import time
from typing import TYPE_CHECKING, Any, TextIO

from bmig.cli.common import human_bytes
from bmig.log import NOTICE
from bmig.sender.converge import Reporter, Summary
from bmig.sender.passes import PassResult

if TYPE_CHECKING:
    from tqdm import tqdm

PROGRESS_EVERY = 1.0       # seconds between JSON progress events
LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "notice": NOTICE,
          "warning": logging.WARNING, "error": logging.ERROR}

log = logging.getLogger("bmigrate")


def rate(n: float) -> str:
    return f"{human_bytes(int(n))}/s"


class TextReporter(Reporter):
    """Human output: tqdm on a terminal, one line per pass when not."""

    def __init__(self, name: str, stream: TextIO = sys.stderr, bar: bool | None = None):
        self.name = name
        self.stream = stream
        self.bar_enabled = stream.isatty() if bar is None else bar
        self._bar: tqdm | None = None
        self._lock = threading.Lock()
        self._done = 0

    def pass_started(self, number: int, dirty: int) -> None:
        if self.bar_enabled:
            from tqdm import tqdm        # on a terminal only: its import costs ~12 ms

            with self._lock:
                self._bar = tqdm(total=dirty, unit="B", unit_scale=True, unit_divisor=1024,
                                 desc=f"{self.name} pass {number}", file=self.stream,
                                 dynamic_ncols=True, leave=True)
                self._done = 0

    def progress(self, result: PassResult) -> None:
        if self._bar is None:
            return
        with self._lock:
            if self._bar is None:
                return
            step = result.bytes_done - self._done
            self._done = result.bytes_done
            if self._bar.total is not None and self._done > self._bar.total:
                self._bar.total = self._done
            self._bar.set_postfix_str(f"left {human_bytes(max(0, (self._bar.total or 0) - self._done))}"
                                      f", sent {human_bytes(result.bytes_sent)}", refresh=False)
            self._bar.update(step)

    def pass_done(self, result: PassResult, dirty: int, held: int) -> None:
        self._close_bar()
        self.stream.write(self.pass_text(result, dirty, held) + "\n")
        self.stream.flush()

    def _close_bar(self) -> None:
        with self._lock:
            if self._bar is not None:
                self._bar.close()
                self._bar = None

    def pass_text(self, result: PassResult, dirty: int, held: int) -> str:
        ratio = (f", compression {result.bytes_raw_sent / result.bytes_sent:.1f}x"
                 if result.bytes_sent else "")
        same = f", {human_bytes(result.bytes_same)} already equal" if result.bytes_same else ""
        busy = f" ({human_bytes(held)} being written)" if held else ""
        return (f"{self.name}: pass {result.number}: {human_bytes(result.bytes_committed)} "
                f"in {result.seconds:.1f} s ({rate(result.rate())}), sent "
                f"{human_bytes(result.bytes_sent)}{ratio}, zeros "
                f"{human_bytes(result.bytes_zero)}{same}; {human_bytes(dirty)} dirty{busy}")

    def note(self, message: str, **fields: Any) -> None:
        self.stream.write(message + "\n")
        self.stream.flush()

    def lag(self, dirty: int, seconds: float | None) -> None:
        pass

    def summary(self, summary: Summary) -> None:
        self.stream.write(self.summary_text(summary) + "\n")
        self.stream.flush()

    def summary_text(self, summary: Summary) -> str:
        ratio = summary.compression_ratio()
        state = ("converged, the copy is identical" if summary.identical
                 else f"converged while the device is written, "
                      f"{human_bytes(summary.dirty_bytes)} still dirty"
                 if summary.converged else f"stopped, {human_bytes(summary.dirty_bytes)} dirty")
        return (f"{self.name}: {state}: {summary.passes} pass(es) in {summary.seconds:.1f} s; "
                f"read {human_bytes(summary.bytes_read)}, sent {human_bytes(summary.bytes_sent)}"
                f"{f' (compression {ratio}x)' if ratio else ''}, zeros "
                f"{human_bytes(summary.bytes_zero)}")

    def service_event(self, event: dict[str, Any], severity: str) -> None:
        """A change of the service's state, or its periodic summary (bmigrate run)."""
        from bmig.cli.statustext import event_line     # bmigrate run's only: sync starts sooner
        self.stream.write(event_line(event) + "\n")
        self.stream.flush()


class ServiceTextReporter(TextReporter):
    """bmigrate run's text: log lines at their levels (the bar still on a terminal)."""

    def pass_done(self, result: PassResult, dirty: int, held: int) -> None:
        self._close_bar()
        log.debug("%s", self.pass_text(result, dirty, held))

    def note(self, message: str, **fields: Any) -> None:
        if "retry_in" not in fields:          # a failure: its change event says it
            log.log(NOTICE, "%s", message)

    def service_event(self, event: dict[str, Any], severity: str) -> None:
        from bmig.cli.statustext import event_line     # as above
        log.log(LEVELS.get(severity, logging.INFO), "%s", event_line(event))

    def summary(self, summary: Summary) -> None:
        log.log(NOTICE, "%s", self.summary_text(summary))


class JsonReporter(Reporter):
    """One JSON object per line on stdout: events, then the summary."""

    def __init__(self, name: str, stream: TextIO = sys.stdout):
        self.name = name
        self.stream = stream
        self._lock = threading.Lock()
        self._last = 0.0

    def emit(self, event: str, **fields: Any) -> None:
        line = json.dumps({"event": event, "device": self.name, "time": round(time.time(), 3),
                           **fields}, sort_keys=True)
        with self._lock:
            self.stream.write(line + "\n")
            self.stream.flush()

    def pass_started(self, number: int, dirty: int) -> None:
        self.emit("pass-start", passes=number, dirty_bytes=dirty)

    def progress(self, result: PassResult) -> None:
        now = time.monotonic()
        if now - self._last >= PROGRESS_EVERY:
            self._last = now
            self.emit("progress", passes=result.number, bytes_done=result.bytes_done,
                      bytes_sent=result.bytes_sent)

    def pass_done(self, result: PassResult, dirty: int, held: int) -> None:
        self.emit("pass", passes=result.number, bytes_committed=result.bytes_committed,
                  bytes_read=result.bytes_read, bytes_sent=result.bytes_sent,
                  bytes_zero=result.bytes_zero, bytes_same=result.bytes_same,
                  seconds=round(result.seconds, 3), rate=round(result.rate()),
                  dirty_bytes=dirty, held_bytes=held)

    def note(self, message: str, **fields: Any) -> None:
        self.emit("note", message=message, **fields)

    def lag(self, dirty: int, seconds: float | None) -> None:
        now = time.monotonic()
        if now - self._last >= PROGRESS_EVERY:
            self._last = now
            self.emit("lag", dirty_bytes=dirty,
                      lag_seconds=None if seconds is None else round(seconds, 3))

    def service_event(self, event: dict[str, Any], severity: str) -> None:
        """A ``change`` or ``status`` event of the service, as it is."""
        with self._lock:
            self.stream.write(json.dumps(event, sort_keys=True) + "\n")
            self.stream.flush()

    def summary(self, summary: Summary) -> None:
        with self._lock:
            self.stream.write(json.dumps({**summary.to_json(), "time": round(time.time(), 3)},
                                         sort_keys=True) + "\n")
            self.stream.flush()
