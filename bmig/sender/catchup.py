"""The catch-up service (``bmigrate run``): a Migration kept up to date until stopped.

It never stops on its own: it ships changes as they come, reconnects with backoff
after a failure, and reports its lag to its ``ServiceState`` (bmig.sender.runstate
decides what that means). A device breqd does not know at the start is a configuration
error; errors that do not mend themselves end it.

The sender slot: a cutover that claims the device (breqd's CLAIM) is given it. The
service closes its target session first and breqd's last (the claim is granted as that
connection ends, so the cutover finds the target free), waits while the cutover holds
the slot, then stops (the device was handed over) or ships again (it was not).

Chunks a writer holds (bmig-nbd keeps a chunk held until no write reached it for a
couple of seconds) are left alone: shipped while written, they would stay dirty and go
again on every pass (a steady writer of scattered 4 KiB blocks made the service send
about six times what one shipment of each written chunk needs). Each goes once its
writes settle; a chunk never let go is shipped anyway every ``hot_refresh`` seconds (a setting,
30 by default), so the copy of a hot chunk is never older than that and a pass.

The room drives a Migration (bmig.sender.converge) through its public methods only; it
opens no connection of its own but short ones to breqd, to read the device's status.
"""

from __future__ import annotations

import sys
import time

from bmig.errors import (AuthError, BmigError, ConfigError, LineageError, SenderClaimed,
                         StateError, UnknownDevice, UnknownExport, UnreachableError)
from bmig.framing import ConnectionClosed
from bmig.lineage import ROLE_HANDED_OVER
from bmig.sender.converge import Migration, Reporter, Summary, give_way
from bmig.sender.passes import PassResult
from bmig.sender.runstate import ServiceState
from bmig.tracker.blocking_client import TrackerClient

BACKOFF = (1, 2, 5, 10, 30, 60)
LAG_LOOK = 1.0              # waiting to try again: how often to read the lag
PAUSE_POLL = 1.0            # while a cutover has the device: seconds between looks


def run_forever(migration: Migration, state: ServiceState | None = None) -> Summary:
    """Ship writes as they come until ``migration.stop``; its summary at the end."""
    return CatchUp(migration, state).run()


class CatchUp:
    def __init__(self, migration: Migration, state: ServiceState | None = None):
        self.migration = migration
        self.state = state or ServiceState(migration.name, str(migration.url))

    def run(self) -> Summary:
        """Ship writes as they come until ``stop``; reconnect with backoff on failure.
        ``state`` is told what happens. A device breqd does not know at the start is a
        configuration error. A cutover that claims the device is given it: the run
        waits, paused, and ends once the device is handed over, or ships again if it
        was not."""
        m, state = self.migration, self.state
        started = time.monotonic()
        hot_shipped = started
        failures = 0
        connected_once = False
        outer = m.reporter
        m.reporter = _Watched(outer, state)
        state.start()
        fatal: BmigError | None = None
        try:
            while not m.stop.is_set():
                m.heartbeat.beat()
                try:
                    if not m.connected:
                        m.connect()
                        failures = 0
                        connected_once = True
                        state.connected(m.summary.relation)
                    lost = m.target_error()
                    if lost is not None:
                        raise lost                  # gone while idle: connect again
                    m.import_writes()
                    stats = m.stats()
                    give_way(m.name, stats)
                    dirty = int(stats["dirty_bytes"])
                    lag = dirty + int(stats["inflight_bytes"])
                    m.reporter.lag(dirty, dirty / m.rate if m.rate else None)
                    state.looked(lag, m.rate)
                    m.summary.dirty_bytes = dirty
                    settled = time.monotonic() - hot_shipped < m.settings.hot_refresh
                    if not settled:
                        hot_shipped = time.monotonic()
                    if dirty > (int(stats["held_bytes"]) if settled else 0):
                        result = m.one_pass(dirty, settled=settled)
                        after = m.stats()
                        m.summary.dirty_bytes = int(after["dirty_bytes"])
                        held = int(after["held_bytes"])
                        m.reporter.pass_done(result, int(after["dirty_bytes"]), held)
                        state.pass_done(result.bytes_committed, result.bytes_sent,
                                        int(after["dirty_bytes"]) + int(after["inflight_bytes"]),
                                        held, m.threshold(), m.rate)
                        if int(after["dirty_bytes"]) > held:
                            continue            # more came in meanwhile: go on at once
                        lag = int(after["dirty_bytes"]) + int(after["inflight_bytes"])
                    # Nothing dirty, or only chunks a writer is busy with (they would only
                    # be sent again): look again in a moment.
                    state.idle(lag, m.rate)
                    m.heartbeat.wait(m.stop, m.settings.interval)
                except SenderClaimed as exc:
                    if self._give_up_device(exc):
                        break                 # handed over: nothing more to ship
                    failures = 0
                except (ConfigError, AuthError, LineageError, StateError, UnknownExport):
                    raise                     # these do not mend themselves: say so and stop
                except UnknownDevice:
                    if not connected_once:
                        raise                 # a device breqd never knew: a wrong setting
                    self._retry_after_failure(failures)
                    failures += 1
                except BmigError:
                    self._retry_after_failure(failures)
                    failures += 1
        except BmigError as exc:
            fatal = exc
            raise
        finally:
            m.reporter = outer
            m.summary.seconds = time.monotonic() - started
            if m.summary.handed_over:         # _give_up_device read breqd last
                state.stopped(m.summary.dirty_bytes)
            elif fatal is not None:
                lag = self._lag_now()
                if lag is not None:
                    m.summary.dirty_bytes = lag
                state.stopped(lag, fatal.message)
            elif m.stop.is_set():
                final = self._peek()
                if final is not None:
                    m.summary.stopped_with(final)
                state.stopped(m.summary.dirty_bytes if final is not None else None)
        return m.summary

    def _retry_after_failure(self, failures: int) -> None:
        """After a failed attempt (the exception being handled): close, say so, wait."""
        m, state = self.migration, self.state
        exc = sys.exc_info()[1]
        assert isinstance(exc, BmigError)
        m.close()
        delay = BACKOFF[min(failures, len(BACKOFF) - 1)]
        m.reporter.note(f"{m.name}: {exc.message}; trying again in {delay} s",
                        error=exc.wire_code, retry_in=delay)
        state.failed(self._unreachable_peer(exc), exc.message, delay, self._lag_now(),
                     m.rate)
        deadline = time.monotonic() + delay
        while not m.heartbeat.wait(m.stop,
                                   max(0.0, min(LAG_LOOK, deadline - time.monotonic()))):
            if time.monotonic() >= deadline:
                break
            state.lag_seen(self._lag_now(), m.rate)    # writes go on meanwhile

    def _unreachable_peer(self, exc: BmigError) -> str | None:
        """Which peer a lost or refused connection is about: breqd when it does not
        answer now, else the receiver (the target, for an NBD one); None for other
        failures."""
        if not isinstance(exc, (UnreachableError, ConnectionClosed)):
            return None
        try:
            TrackerClient(self.migration.control, timeout=5, client="bmigrate").close()
        except BmigError:
            return "breqd"
        return "target" if self.migration.url.kind == "nbd" else "receiver"

    def _lag_now(self) -> int | None:
        """Dirty and in flight as breqd says it now (the summary re-reads it: a failed
        attempt leaves no earlier number standing); None when breqd does not answer."""
        stats = self._peek()
        try:
            return None if stats is None else \
                int(stats["dirty_bytes"]) + int(stats["inflight_bytes"])
        except (KeyError, TypeError, ValueError):
            return None

    # -- the sender slot -------------------------------------------------------------------

    def _give_up_device(self, why: SenderClaimed) -> bool:
        """A cutover claims the device: give it up, wait while the cutover has it (the
        state says so, and the watchdog is fed). True if it was handed over (the
        service is done), False to ship again."""
        m, state = self.migration, self.state
        m.close()      # the target's session first, breqd's last: that grants the claim
        paused = f"{why.message}; paused until it is done"
        m.reporter.note(paused, state="paused")
        state.paused(paused.removeprefix(f"{m.name}: "))     # the state names the device
        while not m.stop.is_set():
            stats = self._peek()
            if stats is not None and not stats.get("sender") and not stats.get("claimed_by"):
                if stats.get("role") == ROLE_HANDED_OVER:
                    m.summary.handed_over = True
                    m.summary.stopped_with(stats)
                    m.reporter.note(f"{m.name}: breqd records it as handed over to "
                                    f"generation {stats.get('successor')}; nothing "
                                    "more to ship", state="handed-over",
                                    successor=stats.get("successor"))
                    return True
                m.reporter.note(f"{m.name}: the cutover is over and this source is "
                                "still primary; shipping again", state="resumed")
                return False
            state.lag_seen(None, m.rate)
            m.heartbeat.wait(m.stop, min(m.settings.interval, PAUSE_POLL))
        return False

    def _peek(self) -> dict | None:
        """The device's status on a connection of its own (None if breqd does not
        answer, or does not know the device)."""
        m = self.migration
        try:
            with TrackerClient(m.control, timeout=10, client=m.client_name) as tracker:
                return tracker.stats(m.name)
        except BmigError:
            return None


class _Watched(Reporter):
    """A run's reporter, with the service's state told of each pass's progress."""

    def __init__(self, inner: Reporter, state: ServiceState):
        self._inner = inner
        self._state = state

    def pass_started(self, number: int, dirty: int) -> None:
        self._inner.pass_started(number, dirty)

    def progress(self, result: PassResult) -> None:
        self._inner.progress(result)
        self._state.progress(result.bytes_done)

    def pass_done(self, result: PassResult, dirty: int, held: int) -> None:
        self._inner.pass_done(result, dirty, held)

    def note(self, message: str, **fields) -> None:
        self._inner.note(message, **fields)

    def lag(self, dirty: int, seconds: float | None) -> None:
        self._inner.lag(dirty, seconds)
