"""The catch-up service's state (``bmigrate run``): what it is doing, its lag, its last
pass, its failures; the part ``service`` of a device's status (bmig.devicestate).

    starting ──connected──▶ catching up ──nothing left──▶ caught up
        ▲                      │  ▲                          │   ▲
        │                      │  └── a backlog of more than CATCH_UP_SECONDS seconds
        │          not shrinking for STALL_PASSES passes     │   │
        │                      ▼                             ▼   │ nothing left
        │                  not converging ◀──────────────────┘   │
        │                      └─────────────────────────────────┘
    any state ──a failure──▶ retrying ──connected──▶ catching up
    any state ──a cutover claims the device──▶ paused ──not handed over, connected──▶ catching up
    any state ──SIGTERM──▶ stopped
    any state ──an error that does not mend itself (the command exits)──▶ failed

Run_forever (bmig.sender.converge) tells it what happens; it decides the state, and
says so through three outlets the command wires up:

- ``on_event(event, severity)``: each change of state, and every failed attempt, as a
  ``change`` event of bmig.devicestate's shape; every SUMMARY_EVERY seconds a ``status``
  event (the periodic summary). The severity is the log level: connected (catching up),
  caught up after connecting or after not converging, and stopped are notices; a
  failure and not converging are warnings; a backlog after being caught up, and caught
  up again after it, are info (bursts of writes are routine).
- ``on_publish(part)``: the part as it is now, at each event and at most once a second
  otherwise (the status file, the STATUS= line).

Passes call ``progress`` from the sender thread: everything here holds one lock.
"""

from __future__ import annotations

import os
import threading
import time
from typing import Any, Callable

from bmig.devicestate import event as make_event

EventSink = Callable[[dict[str, Any], str], None]
PartSink = Callable[[dict[str, Any]], None]

SUMMARY_EVERY = 600.0       # seconds between periodic summaries
PUBLISH_EVERY = 1.0         # at most this often without an event
STALL_PASSES = 3            # passes without shrinking before "not converging"
SHRINK = 0.9                # shrinking: below this fraction of the least lag so far
CATCH_UP_SECONDS = 60.0            # seconds of shipping: a backlog that means "catching up"

STARTING = "starting"
CATCHING_UP = "catching up"
CAUGHT_UP = "caught up"
NOT_CONVERGING = "not converging"
RETRYING = "retrying"
PAUSED = "paused"
STOPPED = "stopped"
FAILED = "failed"


class ServiceState:
    def __init__(self, device: str, target: str, on_event: EventSink | None = None,
                 on_publish: PartSink | None = None, clock: Callable[[], float] = time.time):
        self.device = device
        self._on_event = on_event or (lambda e, s: None)
        self._on_publish = on_publish or (lambda p: None)
        self._clock = clock
        self._lock = threading.RLock()
        now = round(clock(), 3)
        self.fields: dict[str, Any] = {
            "state": STARTING, "message": None, "error": None, "lag_bytes": None,
            "lag_seconds": None, "last_pass_time": None, "rate_bytes_per_second": None,
            "retry_in_seconds": None, "target": target, "since_time": now,
            "started_time": now, "updated_time": now, "pid": os.getpid(),
            "passes_total": 0, "committed_bytes_total": 0, "sent_bytes_total": 0,
            "errors_total": 0}
        self._announced = False          # "caught up" said since the last connect
        self._least: int | None = None   # the least lag after a pass, since caught up
        self._stalled = 0
        self._pass_lag = 0               # the lag when the running pass started
        self._published = 0.0
        self._summary_at = now + SUMMARY_EVERY
        self._window_passes = 0          # since the last summary
        self._window_bytes = 0

    # -- what run_forever reports -------------------------------------------------------------

    def start(self) -> None:
        with self._lock:
            self._publish(force=True)

    def connected(self, relation: str) -> None:
        with self._lock:
            self._announced = False
            self._least, self._stalled = None, 0
            self._enter(CATCHING_UP, "notice", "connected, catching up", error=None,
                        retry_in_seconds=None)

    def looked(self, lag: int, rate: float) -> None:
        """breqd says ``lag`` bytes are dirty or in flight; ``rate`` is the shipping
        rate measured (0: not yet)."""
        with self._lock:
            self._set_lag(lag, rate)
            if self.fields["state"] == CAUGHT_UP and rate and lag / rate > CATCH_UP_SECONDS:
                self._enter(CATCHING_UP, "info", "a backlog of writes")
            self._pass_lag = lag
            self._tick()

    def progress(self, bytes_done: int) -> None:
        """The running pass has shipped ``bytes_done`` of what it set out to."""
        with self._lock:
            self.fields["lag_bytes"] = max(0, self._pass_lag - bytes_done)
            self._tick()

    def pass_done(self, committed: int, sent: int, lag: int, held: int, threshold: int,
                  rate: float) -> None:
        """A pass ended; ``lag`` is dirty and in flight after it, ``held`` of it being
        written now; ``threshold`` the lag below which the copy counts as converged."""
        with self._lock:
            now = self._clock()
            f = self.fields
            f["passes_total"] += 1
            f["committed_bytes_total"] += committed
            f["sent_bytes_total"] += sent
            f["last_pass_time"] = round(now, 3)
            self._window_passes += 1
            self._window_bytes += committed
            self._set_lag(lag, rate)
            shipping = max(0, lag - held)
            if self._least is None or shipping < SHRINK * self._least:
                self._least, self._stalled = shipping, 0
            else:
                self._stalled += 1
            if f["state"] == NOT_CONVERGING and shipping <= threshold:
                self._enter(CATCHING_UP, "notice", "converging again")
            elif (self._stalled >= STALL_PASSES and shipping > threshold
                    and f["state"] in (CATCHING_UP, CAUGHT_UP)):
                self._enter(NOT_CONVERGING, "warning", "not converging: writes outpace "
                            "shipping; cut over with protocol C (bmigrate cutover), or slow "
                            "the writes down")
            self._tick()

    def idle(self, lag: int, rate: float) -> None:
        """Nothing is left to ship but chunks a writer is busy with (``lag``)."""
        with self._lock:
            self._set_lag(lag, rate)
            self._least, self._stalled = None, 0
            if self.fields["state"] != CAUGHT_UP:
                notable = not self._announced or self.fields["state"] == NOT_CONVERGING
                self._announced = True
                self._enter(CAUGHT_UP, "notice" if notable else "info", None)
            self._tick()

    def failed(self, peer: str | None, error: str, delay: float, lag: int | None = None,
               rate: float = 0.0) -> None:
        """An attempt failed (``peer`` unreachable: "receiver", "breqd"...; None for
        another failure); the next one is in ``delay`` seconds; ``lag`` as breqd says
        it now (None: not known). Every failure is an event, also when the state stays
        the same."""
        with self._lock:
            self.fields["errors_total"] += 1
            if lag is not None:
                self._set_lag(lag, rate)
            what = f"{peer} unreachable" if peer else "failed"
            self._enter(RETRYING, "warning", f"{what}, retry in {delay:g} s", always=True,
                        error=error, retry_in_seconds=delay)

    def paused(self, why: str) -> None:
        """A cutover has the device (``why``): nothing ships until it is done. A run
        that gets the device back connects again (starting, then catching up)."""
        with self._lock:
            self._enter(PAUSED, "notice", why, retry_in_seconds=None)

    def lag_seen(self, lag: int | None, rate: float) -> None:
        """The lag as breqd says it while the service waits to try again."""
        with self._lock:
            if lag is not None:
                self._set_lag(lag, rate)
            self._tick()

    def stopped(self, lag: int | None, error: str | None = None) -> None:
        """The service stops, cleanly or for ``error`` (which the command reports
        itself: the event is logged at debug only); ``lag`` as breqd says it now
        (None: breqd not reached)."""
        with self._lock:
            self.fields["lag_bytes"] = lag
            if lag == 0:
                self.fields["lag_seconds"] = 0.0
            if error is None:
                self._enter(STOPPED, "notice", None, retry_in_seconds=None)
            else:
                self._enter(FAILED, "debug", "failed", error=error, retry_in_seconds=None)

    def part(self) -> dict[str, Any]:
        with self._lock:
            return dict(self.fields)

    # -- inside -------------------------------------------------------------------------------

    def _set_lag(self, lag: int, rate: float) -> None:
        f = self.fields
        f["lag_bytes"] = lag
        f["rate_bytes_per_second"] = round(rate) if rate else None
        f["lag_seconds"] = 0.0 if lag == 0 else round(lag / rate, 3) if rate else None

    def _enter(self, state: str, severity: str, message: str | None, always: bool = False,
               **fields: Any) -> None:
        f = self.fields
        before = {k: f[k] for k in ("state", "message", *fields)}
        if state != f["state"]:
            f["since_time"] = round(self._clock(), 3)
        f["state"], f["message"] = state, message
        f.update(fields)
        changed = {k: [v, f[k]] for k, v in before.items() if v != f[k]}
        if always and "errors_total" not in changed:
            changed["errors_total"] = [f["errors_total"] - 1, f["errors_total"]]
        if changed:
            f["updated_time"] = round(self._clock(), 3)
            self._on_event(make_event("change", self.device, "service", f, self._clock(),
                                      changed=changed), severity)
            self._publish(force=True)

    def _tick(self) -> None:
        now = self._clock()
        if now >= self._summary_at:
            self._summary_at = now + SUMMARY_EVERY
            self._on_event(make_event("status", self.device, "service", self.fields, now,
                                      period_seconds=SUMMARY_EVERY,
                                      passes=self._window_passes,
                                      committed_bytes=self._window_bytes), "info")
            self._window_passes = self._window_bytes = 0
        self._publish()

    def _publish(self, force: bool = False) -> None:
        now = self._clock()
        if force or now - self._published >= PUBLISH_EVERY:
            self._published = now
            self.fields["updated_time"] = round(now, 3)
            self._on_publish(dict(self.fields))
