"""A migration of one device to one target: connect, agree on lineage, make passes.

``sync`` makes passes until nothing is dirty (the copy is identical), or, while an
application writes through the intercept, until what is dirty is below the threshold
(bytes, or seconds of shipping at the rate measured): converged, the copy trailing by
that much. It raises NotConverging when the dirty amount stops shrinking: the
application writes faster than the changes ship. A writer is at work when chunks stay
held longer than bmig-nbd ever keeps an idle one. The catch-up service (``bmigrate
run``) keeps a Migration up to date: bmig.sender.catchup.

Lineage, on opening the target (invariant 7):
    same     the target holds this device's generation: ship what is dirty
    descendant  the target is the source this lineage took over from at a cutover, not
             written since: a fail-back, which ships what is dirty (what changed here
             since the handover)
    new      the target holds nothing of ours: every chunk is set dirty first (holes
             skipped), or compared by hash with --checksum. Also a target whose record
             no longer describes it (deleted, replaced, truncated or grown behind the
             receiver's back: invariant 9); the receiver says why, and so do we
    rejoin   the target is a former primary that waits to become our secondary (bmigrate
             rejoin on its host): the chunks it changed alone (its resync set) are marked
             dirty here first, then what is dirty ships: the union of both sides' changes.
             When it could not say which chunks (its state was missing or not trusted),
             every chunk is compared by hash instead (--checksum)
    foreign  refused by the receiver, unless --discard-target-data names the target;
             a split brain (both sides written as primary) is refused the same way
    none     an NBD target, which keeps no record: everything, every time we connect

The sender slot (one sender per device in breqd): a cutover claims it. A sync that
sees the claim (``give_way``) stops (SenderClaimed, exit 17) once what is in flight is
answered; the catch-up service gives the device up the same way (bmig.sender.catchup).

A Migration owns its connections (breqd through LockedTracker, the source, the target);
a pass's threads are bmig.sender.passes', the cutover's steps bmig.sender.cutover's.
Code outside uses its public methods (``info``, ``verify``, ``promote``,
``hand_over``...), never its fields.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from bmig import systemd
from bmig.blockdev import size_of_fd
from bmig.constants import HOLD_IDLE, HOLD_IDLE_SWEEPS, MiB
from bmig.errors import BmigError, ConfigError, NotConverging, SenderClaimed
from bmig.identity import TargetIdentity, identify
from bmig.lineage import ROLE_HANDED_OVER, ROLE_PRIMARY, hex_id, parse_id
from bmig.nbd.manage_client import ManageClient
from bmig.sender.lockedtracker import LockedTracker
from bmig.sender.pacing import CompressionPacer, RateLimit
from bmig.sender.passes import Pass, PassResult, PassSettings
from bmig.sender.source import Source
from bmig.sender.targets import NbdTarget, open_target
from bmig.tracker.blocking_client import TrackerClient
from bmig.wire.client import SourceInfo, WireTarget
from bmig.wire.options import ConnectOptions
from bmig.wire.urls import TargetUrl

if TYPE_CHECKING:
    from bmig.sender.verify import VerifyResult

log = logging.getLogger("bmigrate")

STALL_PASSES = 3            # passes without shrinking before "not converging"
SHRINK = 0.9                # shrinking means: below this fraction of the best so far
HOLD_WAIT = 0.1             # poll while only held chunks are left (a writer is active)
# ... for at most this long: bmig-nbd lets go of a hold this long after the last write.
MAX_HOLD_WAIT = HOLD_IDLE * (1 + 1 / HOLD_IDLE_SWEEPS) + 1.0


@dataclass
class SyncSettings:
    passes: PassSettings = field(default_factory=PassSettings)
    threshold_bytes: int = 0
    threshold_seconds: float | None = 1.0
    bwlimit: int | None = None
    discard_export: str | None = None
    interval: float = 1.0            # run: how often to look for new writes when idle
    hot_refresh: float = 30.0        # run: seconds between passes that ship held chunks
    manage_dir: str | None = None    # bmig-nbd's control sockets: the write rate


@dataclass
class Summary:
    device: str
    target: str
    relation: str = ""
    passes: int = 0
    bytes_read: int = 0
    bytes_sent: int = 0
    bytes_raw_sent: int = 0
    bytes_zero: int = 0
    bytes_same: int = 0
    bytes_committed: int = 0
    seconds: float = 0.0
    dirty_bytes: int = 0
    converged: bool = False
    identical: bool = False          # converged with nothing dirty or in flight
    writer_active: bool = False      # converged while the device is being written
    handed_over: bool = False        # run: a cutover handed the device over; it stopped

    def add(self, result: PassResult) -> None:
        self.passes += 1
        self.bytes_read += result.bytes_read
        self.bytes_sent += result.bytes_sent
        self.bytes_raw_sent += result.bytes_raw_sent
        self.bytes_zero += result.bytes_zero
        self.bytes_same += result.bytes_same
        self.bytes_committed += result.bytes_committed

    def compression_ratio(self) -> float | None:
        """What the data sent decodes to, over what it took on the wire."""
        return round(self.bytes_raw_sent / self.bytes_sent, 2) if self.bytes_sent else None

    def to_json(self) -> dict:
        return {"event": "summary", "device": self.device, "target": self.target,
                "relation": self.relation, "passes": self.passes,
                "bytes_read": self.bytes_read, "bytes_sent": self.bytes_sent,
                "bytes_zero": self.bytes_zero, "bytes_same": self.bytes_same,
                "bytes_committed": self.bytes_committed,
                "compression_ratio": self.compression_ratio(),
                "seconds": round(self.seconds, 3), "dirty_bytes": self.dirty_bytes,
                "converged": self.converged, "identical": self.identical,
                "writer_active": self.writer_active, "handed_over": self.handed_over}

    def stopped_with(self, stats: dict) -> None:
        """run's end: what breqd says now. Converged and identical when nothing is dirty,
        in flight or held (no writer at work), as sync would say it."""
        left = int(stats["dirty_bytes"]) + int(stats["inflight_bytes"])
        self.dirty_bytes = left
        self.converged = self.identical = left == 0 and not stats["held_bytes"]
        self.writer_active = bool(stats["held_bytes"])


def source_info(name: str, stats: dict) -> SourceInfo:
    """The source as breqd's status object describes it: lineage, size, chunk size."""
    return SourceInfo(name, parse_id(stats["device_id"], "device_id"),
                      parse_id(stats["generation"], "generation"),
                      int(stats["size"]), int(stats["chunk_size"]),
                      tuple(str(g) for g in stats.get("previous", [])))


def give_way(name: str, stats: dict) -> None:
    """SenderClaimed if a cutover waits for this device (breqd's ``claimed_by``)."""
    claimant = stats.get("claimed_by")
    if claimant:
        raise SenderClaimed(f"{name}: {claimant} claims the device for a cutover")


class StopOrDeadline:
    """An event that is set when ``stop`` is, or once ``deadline`` has passed."""

    def __init__(self, stop: threading.Event, deadline: float):
        self._stop = stop
        self._deadline = deadline

    def is_set(self) -> bool:
        return self._stop.is_set() or time.monotonic() >= self._deadline

    def wait(self, timeout: float | None = None) -> bool:
        left = self._deadline - time.monotonic()
        if left > 0:
            self._stop.wait(left if timeout is None else min(timeout, left))
        return self.is_set()


class Reporter:
    """What a migration tells its operator; bmig.cli.sync renders it."""

    def pass_started(self, number: int, dirty: int) -> None: ...
    def progress(self, result: PassResult) -> None: ...
    def pass_done(self, result: PassResult, dirty: int, held: int) -> None: ...
    def note(self, message: str, **fields) -> None: ...
    def lag(self, dirty: int, seconds: float | None) -> None: ...


class Migration:
    def __init__(self, name: str, source_path: str, url: TargetUrl, options: ConnectOptions,
                 settings: SyncSettings, control: str, reporter: Reporter | None = None,
                 stop: threading.Event | None = None):
        self.name = name
        self.source_path = source_path
        self.url = url
        self.options = options
        self.settings = settings
        self.control = control
        self.reporter = reporter or Reporter()
        self.stop = stop or threading.Event()
        self.heartbeat = systemd.Heartbeat()     # WATCHDOG=1 of `bmigrate run`
        self.limit = RateLimit(settings.bwlimit)
        self.pacer = CompressionPacer()      # what it learnt lasts from pass to pass
        self.summary = Summary(name, str(url))
        self.rate = 0.0                      # bytes per second, the last passes
        self._tracker: LockedTracker | None = None
        self._source: Source | None = None
        self._target: WireTarget | NbdTarget | None = None
        self._info: SourceInfo | None = None
        self._number = 0
        self._checksum_next = False          # a rejoining copy whose changes are unknown
        self.client_name = "bmigrate"        # how breqd names this sender (HELLO)
        self.yielded_by: str | None = None   # connect(claim=...): who gave the device up
        # A kernel intercept (bmig.dm.intercept.DmIntercept) whose record of writes is
        # imported into breqd at each pass boundary; None for bmig-nbd, which marks itself.
        self.intercept = None

    # -- connecting ----------------------------------------------------------------------

    def connect(self, mode: str = "pass", claim: float | None = None) -> None:
        """breqd, the source, the target, and the lineage handshake. ``mode`` "inspect"
        only reads (verify): no lock on the target, nothing set dirty. ``claim`` (a
        cutover): take the device's sender slot first, waiting that many seconds at most
        for a running sender to give it up (and its target session with it)."""
        self.close()
        self._tracker = LockedTracker(TrackerClient(self.control, client=self.client_name))
        if claim is not None:
            self.yielded_by = self._tracker.claim(self.name, claim)
        self._info = source_info(self.name, self._tracker.stats(self.name))
        self._source = Source(self.source_path, self._info.size, self.settings.passes.direct)
        self._check_source_size()
        self._target = open_target(self.url, self.options)
        discard = self.settings.discard_export is not None
        if discard and self.settings.discard_export != self.url.export \
                and self.url.kind != "nbd":
            raise ConfigError(f"--discard-target-data names {self.settings.discard_export!r}, "
                              f"but the target is {self.url.export!r}")
        relation = self._target.open(self._info, discard, mode) if mode != "pass" \
            else self._target.open(self._info, discard)
        self.summary.relation = relation
        if mode != "pass":
            return
        if relation in ("new", "none"):
            why = getattr(self._target, "why", "")
            holds = (f"the target holds no copy any more: {why}" if why
                     else "the target holds no copy of this lineage")
            if not self.settings.passes.checksum:
                self.reporter.note(f"{self.name}: {holds}; shipping everything (holes "
                                   "skipped)", relation=relation, why=why or None)
            else:
                self.reporter.note(f"{self.name}: {holds}; comparing every chunk with it",
                                   relation=relation, why=why or None)
            self._tracker.set_all_dirty(self.name)
        elif relation == "rejoin":
            self._take_resync_set()
        elif self.settings.passes.checksum:
            self._tracker.set_all_dirty(self.name)

    def _take_resync_set(self) -> None:
        """The rejoining copy's own changes become dirty here, durably, before the pass
        that overwrites them begins (its PASS_BEGIN is what lets the copy forget them)."""
        assert self._tracker is not None and isinstance(self._target, WireTarget)
        assert self._info is not None
        count = self._target.resync_count()
        if count is None:
            self.reporter.note(f"{self.name}: the rejoining copy does not know which chunks "
                               "it changed; comparing every chunk with it", relation="rejoin")
            self._tracker.set_all_dirty(self.name)
            self._checksum_next = True
            return
        ranges = self._target.resync_ranges(count, self._info.size)
        for start in range(0, len(ranges), 4096):
            self._tracker.mark(self.name, ranges[start:start + 4096])
        self.reporter.note(f"{self.name}: the rejoining copy changed {len(ranges)} ranges "
                           "alone; they ship with what changed here", relation="rejoin",
                           resync_ranges=len(ranges))

    def _check_source_size(self) -> None:
        assert self._source is not None and self._info is not None
        have = size_of_fd(self._source.fd)
        if have != self._info.size:
            raise ConfigError(f"{self.source_path} has {have} bytes, but breqd tracks "
                              f"{self._info.size} for {self.name}")

    def close(self) -> None:
        for closer in (self._target, self._source, self._tracker):
            if closer is not None:
                try:
                    closer.close()
                except (BmigError, OSError):
                    pass
        self._target = self._source = self._tracker = None

    def abort_target(self) -> None:
        """End the connection to the target at once, from any thread: a pass waiting on
        a link that stopped answering fails now (its chunks go back to dirty)."""
        target = self._target
        if isinstance(target, WireTarget):
            target.abort()

    def close_target(self) -> None:
        """Close the connection to the target alone (its session on the receiver ends);
        breqd and the source stay open."""
        if self._target is not None:
            try:
                self._target.close()
            except (BmigError, OSError):
                pass

    # -- what a connected migration offers --------------------------------------------------

    @property
    def connected(self) -> bool:
        """connect() opened the target; close() and a failed attempt (which closes)
        undo it."""
        return self._target is not None

    def target_error(self) -> BmigError | None:
        """Why the target's connection ended while nobody used it (None while it is up)."""
        return getattr(self._target, "error", None)

    @property
    def info(self) -> SourceInfo:
        """The source as breqd described it at connect(): lineage, size, chunk size."""
        if self._info is None:
            raise BmigError(f"{self.name}: not connected")
        return self._info

    def source_identity(self) -> TargetIdentity:
        """What the source file or device is (invariant 9), as a receiver would see it."""
        source, _, _ = self._connected()
        return identify(source.fd)

    def verify(self, sample: float | None = None, repair: bool = False) -> VerifyResult:
        """Online verify of source against target (bmig.sender.verify)."""
        from bmig.sender.verify import verify   # here: a sync never loads it
        source, target, tracker = self._connected()
        return verify(tracker, source, target, self.name, self.info.size,
                      self.info.chunk_size, sample, repair)

    def promote(self, generation: int) -> dict:
        """Cutover: the target takes ``generation`` and becomes the primary; its record."""
        _, target, _ = self._connected()
        if not isinstance(target, WireTarget):
            raise ConfigError(f"{target.description} keeps no lineage: only breceive "
                              "can be promoted")
        return target.promote(generation)

    def hand_over(self, generation: int) -> None:
        """Record in breqd that this source handed over to ``generation`` (invariant 7:
        it stays read-only), through the lock the passes share."""
        _, _, tracker = self._connected()
        tracker.set_lineage(self.name, ROLE_HANDED_OVER, hex_id(generation))

    def reclaim(self) -> None:
        """Undo ``hand_over`` when the target was not promoted after all: this source is
        the primary again, succeeded by nobody."""
        _, _, tracker = self._connected()
        tracker.set_lineage(self.name, ROLE_PRIMARY, hex_id(0))

    def _connected(self) -> tuple[Source, WireTarget | NbdTarget, LockedTracker]:
        if self._source is None or self._target is None or self._tracker is None:
            raise BmigError(f"{self.name}: not connected")
        return self._source, self._target, self._tracker

    # -- passes ----------------------------------------------------------------------------

    def stats(self) -> dict:
        assert self._tracker is not None
        return self._tracker.stats(self.name)

    def one_pass(self, budget: int, checksum: bool | None = None,
                 deadline: float | None = None, settled: bool = False) -> PassResult:
        """One pass of up to ``budget`` bytes; with ``deadline`` (monotonic time) it
        stops there, as on SIGTERM: what is in flight is answered, the rest stays dirty.
        With ``settled`` it leaves alone the chunks a writer holds."""
        assert self._tracker and self._source and self._target and self._info
        self._number += 1
        settings = self.settings.passes
        if self._checksum_next:
            checksum, self._checksum_next = True, False
        if checksum is not None and checksum != settings.checksum:
            settings = PassSettings(**{**settings.__dict__, "checksum": checksum})
        if settled != settings.settled:
            settings = PassSettings(**{**settings.__dict__, "settled": settled})
        self.reporter.pass_started(self._number, budget)
        stop = self.stop if deadline is None else StopOrDeadline(self.stop, deadline)
        # The pass's loops look at their stop event as they turn: each look feeds the
        # watchdog of `bmigrate run` (none for sync, which has no WATCHDOG_USEC).
        stop = self.heartbeat.watch(stop)
        result = Pass(self._number, self._tracker, self._source, self._target, self._info,
                      settings, self.limit, self.reporter.progress, stop, self.pacer).run(budget)
        self.summary.add(result)
        measured = result.data_rate()
        if measured:
            self.rate = measured if not self.rate else 0.5 * self.rate + 0.5 * measured
        if result.error is not None:
            raise result.error
        return result

    def import_writes(self) -> None:
        """A pass boundary: what a kernel intercept recorded goes into breqd first."""
        if self.intercept is not None:
            self.intercept.refresh()

    def threshold(self) -> int:
        s = self.settings
        by_time = int(self.rate * s.threshold_seconds) if s.threshold_seconds and self.rate \
            else 0
        return max(s.threshold_bytes, by_time)

    def _wait_for_holds(self, stats: dict, any_held: bool = False) -> dict:
        """Only chunks a writer holds are left (``any_held``: some chunk is held at all):
        give the writer the moment it needs to let go. bmig-nbd lets a chunk go
        MAX_HOLD_WAIT at most after its last write, so holds that outlast the wait mean
        the device is being written now."""
        deadline = time.monotonic() + MAX_HOLD_WAIT
        while (stats["held_bytes"]
               and (any_held or stats["dirty_bytes"] <= stats["held_bytes"])
               and time.monotonic() < deadline and not self.stop.is_set()):
            self.stop.wait(HOLD_WAIT)
            stats = self.stats()
        return stats

    def _finish(self, stats: dict) -> bool:
        """Converged? Identical when nothing is dirty or in flight; with less than the
        threshold dirty, converged too if a writer is at work (its chunks stay held);
        with no writer the rest is shipped first (False)."""
        dirty = int(stats["dirty_bytes"]) + int(stats["inflight_bytes"])
        if dirty and not (self.summary.passes and dirty <= self.threshold()):
            return False
        writing = self.intercept is not None and self.intercept.writes_seen
        if dirty:
            stats = self._wait_for_holds(stats, any_held=True)
            dirty = int(stats["dirty_bytes"]) + int(stats["inflight_bytes"])
            if dirty and not stats["held_bytes"] and not writing:
                return False              # nobody writes: ship the rest, then identical
        self.summary.converged = True
        self.summary.identical = dirty == 0
        self.summary.writer_active = bool(stats["held_bytes"]) or (writing and dirty > 0)
        self.summary.dirty_bytes = dirty
        return True

    def _record_lags(self) -> bool:
        """Nothing to ship, no pass yet, but the target's record does not say it is a
        copy of one moment (a replication session opened, a pass was cut short): one
        empty pass tells it so (its end says nothing is dirty)."""
        if self.summary.passes or not isinstance(self._target, WireTarget):
            return False
        state = (getattr(self._target, "opened", None) or {}).get("state")
        if state in ("consistent", "in-sync", "new", None):
            return False
        self.summary.converged = False
        return True

    def sync(self) -> Summary:
        """Passes until converged; NotConverging when the dirty amount stops shrinking."""
        started = time.monotonic()
        best: int | None = None
        stalled = 0
        checksum_first = self.settings.passes.checksum and self.summary.relation in (
            "new", "none", "same")
        imported = False
        try:
            while not self.stop.is_set():
                if not imported:
                    self.import_writes()
                imported = False
                stats = self._wait_for_holds(self.stats())
                give_way(self.name, stats)
                if self._finish(stats) and not self._record_lags():
                    break
                dirty = int(stats["dirty_bytes"])
                written = self.written()
                result = self.one_pass(dirty, checksum=checksum_first)
                checksum_first = False
                if self.intercept is not None:
                    # What the pass's writers dirtied shows in breqd once imported: the
                    # stall check below must see it (and the next round starts from it).
                    self.import_writes()
                    imported = True
                after = self.stats()
                self.summary.dirty_bytes = int(after["dirty_bytes"])
                self.reporter.pass_done(result, self.summary.dirty_bytes,
                                        int(after["held_bytes"]))
                if best is None or self.summary.dirty_bytes < SHRINK * best:
                    best, stalled = self.summary.dirty_bytes, 0
                else:
                    stalled += 1
                if stalled >= STALL_PASSES and self.summary.dirty_bytes > self.threshold():
                    raise self._not_converging(result, dirty, written)
        finally:
            self.summary.seconds = time.monotonic() - started
        return self.summary

    def written(self) -> int | None:
        """Bytes the application wrote through bmig-nbd so far, if its control socket
        is where ``manage_dir`` says (None otherwise)."""
        if self.settings.manage_dir is None:
            return None
        try:
            with ManageClient(self.settings.manage_dir, self.name, timeout=5) as nbd:
                return int(nbd.call("status")["bytes_written"])
        except (BmigError, KeyError, ValueError):
            return None

    def _not_converging(self, result: PassResult, dirty_before: int,
                        written: int | None) -> NotConverging:
        shipping = result.rate()
        after = self.written() if written is not None else None
        if after is not None and result.seconds:
            writes = (after - written) / result.seconds
        else:
            # What became dirty while the pass ran: what is dirty now, less what was
            # dirty at its start and not shipped by it (at most the device, per pass).
            fresh = self.summary.dirty_bytes - (dirty_before - result.bytes_committed)
            writes = max(0, fresh) / result.seconds if result.seconds else 0.0
        return NotConverging(
            f"not converging: writes at {writes / MiB:.1f} MiB/s, shipping at "
            f"{shipping / MiB:.1f} MiB/s, {self.summary.dirty_bytes} bytes dirty after "
            f"{self.summary.passes} passes; cut over with protocol C "
            "(bmigrate cutover), or slow the writes down")
