"""The HA replication mode: bmig-nbd replicates synchronously, and this keeps it so.

``bmigrate replicate NAME --keep`` (bmig-replicate@.service) runs it. DRBD's connection
states, with bmig's parts:

    connecting   the target's lineage is checked (a pass session's OPEN) and bmig-nbd is
                 asked to replicate (protocol A, B or C, policy degrade)
    catching up  replication runs; a pass ships beside it what is dirty (what became
                 dirty while degraded, or was never shipped). Invariant 6 keeps the two
                 apart: a chunk in flight for the pass and written meanwhile ships again.
                 The target's record says inconsistent (bmig.receiver.session)
    synchronous  nothing is dirty but what the replication carries; the last pass told
                 the receiver so, and its record says in-sync
    degraded     the target is gone (a lost connection, or no acknowledgement within
                 ``ack_timeout``: a partition); bmig-nbd tracks and the writes go on;
                 connecting again after a backoff (1, 2, 5, 10, 30, 60 s)

The state, with the lag (bytes that are not on the target yet, and at the measured rate
how long they take to ship), goes to bmig-nbd's status (``ha``, while this process is
connected to it), to the events (a ``note`` with ``state``) and to systemd's STATUS.

The device's lineage record says ``ha`` from the first start: the target may be promoted
while this side is away, so bmig-nbd starts it read-only until its role is confirmed.
This confirms it once the target has opened as its secondary (same, descendant or rejoin).
A target that refuses this lineage (it was promoted: LineageError) makes bmig-nbd
read-only at once and ends with that error: a promoted copy is never written by its
former source (invariant 7).

It drives bmig-nbd (ManageClient) and a Migration through their public calls.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from bmig.errors import (AuthError, BmigError, ConfigError, LineageError, StateError,
                         UnknownExport, UnreachableError)
from bmig.lineage import ROLE_HANDED_OVER, ROLE_PRIMARY
from bmig.nbd.manage_client import ManageClient
from bmig.sender.catchup import BACKOFF
from bmig.sender.converge import Migration

log = logging.getLogger("bmigrate")

CONNECTING, CATCHING_UP, SYNCHRONOUS, DEGRADED = ("connecting", "catching up",
                                                  "synchronous", "degraded")
STATES = (CONNECTING, CATCHING_UP, SYNCHRONOUS, DEGRADED)
POLL = 0.2                   # seconds between looks at bmig-nbd and breqd


@dataclass
class HaSettings:
    manage_dir: str
    protocol: str = "C"
    ack_timeout: float = 10.0
    replicate_options: dict = field(default_factory=dict)
    poll: float = POLL
    backoff: tuple[float, ...] = tuple(float(b) for b in BACKOFF)


class HaReplication:
    def __init__(self, migration: Migration, settings: HaSettings,
                 on_state: Callable[[dict], None] | None = None):
        self.migration = migration
        self.settings = settings
        # Connecting to a target that stops answering is given up on as soon.
        migration.options = dataclasses.replace(
            migration.options, timeout=min(migration.options.timeout,
                                           max(2.0, 2 * settings.ack_timeout)))
        self.on_state = on_state
        self.state = CONNECTING
        self.since = time.time()
        self.report: dict[str, Any] = {"state": CONNECTING}
        self._nbd: ManageClient | None = None
        self._nbd_lock = threading.Lock()
        self._lost: str | None = None
        self._watching = False
        self._replica_lag = 0

    @property
    def stop(self) -> threading.Event:
        return self.migration.stop

    # -- bmig-nbd ------------------------------------------------------------------------

    def _call(self, op: str, **fields: Any) -> dict:
        with self._nbd_lock:
            if self._nbd is None:
                self._nbd = ManageClient(self.settings.manage_dir, self.migration.name,
                                         timeout=max(60.0, 3 * self.settings.ack_timeout))
            try:
                return self._nbd.call(op, **fields)
            except BmigError:
                self._drop_nbd()
                raise

    def _drop_nbd(self) -> None:
        if self._nbd is not None:
            self._nbd.close()
            self._nbd = None

    def _set(self, state: str, **fields: Any) -> None:
        """A new state, or new figures in the same one: tell bmig-nbd, the events and
        whoever listens (systemd's STATUS)."""
        changed = state != self.state
        if changed:
            self.state, self.since = state, time.time()
        self.report = {"state": state, "since": round(self.since, 3),
                       "target": str(self.migration.url),
                       "protocol": self.settings.protocol, **fields}
        try:
            self._call("ha-state", **self.report)
        except BmigError:
            pass                       # bmig-nbd is gone: the next step says so
        if changed:
            detail = ", ".join(f"{k} {v}" for k, v in fields.items() if v is not None)
            self.migration.reporter.note(
                f"{self.migration.name}: {state}" + (f" ({detail})" if detail else ""),
                **self.report)
        if self.on_state is not None:
            self.on_state(self.report)

    # -- the loop ------------------------------------------------------------------------

    def run(self) -> None:
        """Until ``stop``: connect, catch up, stay synchronous; after a failure, degraded,
        and again after a backoff. Errors that do not mend themselves end it."""
        failures = 0
        self._mark_ha()
        while not self.stop.is_set():
            try:
                self._connected_session()
            except (ConfigError, AuthError, StateError, UnknownExport):
                raise
            except LineageError as exc:
                self._refused(exc)
                raise
            except BmigError as exc:
                backoff = self.settings.backoff
                delay = backoff[min(failures, len(backoff) - 1)]
                failures = failures + 1 if self.state != SYNCHRONOUS else 1
                self.migration.close()
                message = self._lost or exc.message
                self._lost = None
                self._set(DEGRADED, error=message, retry_in=delay,
                          lag_bytes=self._plain_dirty())
                log.warning("%s: replication degraded (%s); trying again in %g s",
                            self.migration.name, message, delay)
                self.stop.wait(delay)
        self.migration.close()
        with self._nbd_lock:
            self._drop_nbd()

    def _mark_ha(self) -> None:
        """The lineage record says ``ha`` (bmig-nbd starts read-only until confirmed)."""
        from bmig.tracker.blocking_client import TrackerClient
        with TrackerClient(self.migration.control, client="bmigrate") as client:
            stats = client.stats(self.migration.name)
            if stats["role"] != ROLE_PRIMARY:
                raise LineageError(f"{self.migration.name} is {stats['role']}, not the "
                                   "primary: it cannot replicate its writes")
            if not stats.get("ha"):
                client.set_lineage(self.migration.name, ROLE_PRIMARY, ha=True)

    def _plain_dirty(self) -> int | None:
        """Bytes dirty that no replication carries, or None when breqd cannot say."""
        from bmig.tracker.blocking_client import TrackerClient
        try:
            with TrackerClient(self.migration.control, client="bmigrate") as client:
                stats = client.stats(self.migration.name)
        except BmigError:
            return None
        return max(0, int(stats["dirty_bytes"]) - int(stats.get("mirrored_bytes", 0)))

    def _connected_session(self) -> None:
        """One connection: lineage, replication, confirmation, then catch-up and the
        synchronous state until the target is lost (an error) or ``stop``."""
        m = self.migration
        self._set(CONNECTING)
        m.connect()                       # the pass session: the lineage decision
        info = m.info
        status = self._call("replicate", url=str(m.url), protocol=self.settings.protocol,
                            policy="degrade", options=self.settings.replicate_options,
                            ack_timeout=self.settings.ack_timeout,
                            generation=f"{info.generation:016x}",
                            previous=list(info.previous))
        if status.get("awaiting_confirmation"):
            self._call("confirm")
            log.warning("%s: the target is this device's secondary: writable", m.name)
        self._watching = True
        watcher = threading.Thread(target=self._watch, name="ha watch", daemon=True)
        watcher.start()
        try:
            self._keep_up()
        finally:
            self._watching = False
            watcher.join(timeout=self.settings.poll * 10 + 5)

    def _watch(self) -> None:
        """Beside the passes: when bmig-nbd's replication fails, end the pass at once
        (its link may have stopped answering, not broken)."""
        while self._watching and not self.stop.is_set():
            try:
                status = self._call("status")
            except BmigError as exc:
                self._lost = f"bmig-nbd: {exc.message}"
                self.migration.abort_target()
                return
            if not status.get("replicating"):
                self._lost = f"replication failed: {status.get('failed') or 'stopped'}"
                self.migration.abort_target()
                return
            self._replica_lag = int(status.get("replica_lag_bytes", 0))
            self.stop.wait(self.settings.poll)

    def _keep_up(self) -> None:
        """Catch up, then synchronous; a pass again whenever something is dirty that the
        replication does not carry."""
        m = self.migration
        first = True
        while not self.stop.is_set():
            if self._lost:
                raise UnreachableError(self._lost)
            stats = m.stats()
            plain = max(0, int(stats["dirty_bytes"]) - int(stats.get("mirrored_bytes", 0)))
            if first or plain or int(stats["inflight_bytes"]):
                self._set(CATCHING_UP, lag_bytes=plain,
                          lag_seconds=round(plain / m.rate, 3) if m.rate else None)
                result = m.one_pass(int(stats["dirty_bytes"]))
                first = False
                after = m.stats()
                m.reporter.pass_done(result, int(after["dirty_bytes"]),
                                     int(after["held_bytes"]))
                if (result.target or {}).get("state") not in ("in-sync", "consistent"):
                    continue              # more became dirty meanwhile: again
            if self._lost:
                raise UnreachableError(self._lost)
            self._set(SYNCHRONOUS, lag_bytes=self._replica_lag, lag_seconds=0)
            self.stop.wait(self.settings.poll)

    def _refused(self, exc: LineageError) -> None:
        """The target refused this lineage: it was promoted, or holds another. This side
        must not go on as a primary: bmig-nbd read-only now."""
        log.error("%s: %s", self.migration.name, exc.message)
        try:
            # breqd first: bmig-nbd keeps this read-only after our connection ends only
            # for a device breqd records as handed over.
            from bmig.tracker.blocking_client import TrackerClient
            with TrackerClient(self.migration.control, client="bmigrate") as client:
                client.set_lineage(self.migration.name, ROLE_HANDED_OVER)
        except BmigError as breqd_exc:
            log.error("%s: could not record it as handed over in breqd: %s",
                      self.migration.name, breqd_exc.message)
        try:
            self._call("stop")
            self._call("read-only", value=True)
        except BmigError as nbd_exc:
            log.error("%s: could not make bmig-nbd read-only: %s", self.migration.name,
                      nbd_exc.message)
        self._set(DEGRADED, error=exc.message, retry_in=None)
