"""Sessions: what each control connection has checked out and what it holds, and what
happens when it ends.

Two words, never mixed: a connection *checks out* runs of chunks as a sender (CHECKOUT;
they are in flight until it commits or aborts them, ``Session.checkouts``), and *holds*
runs as a writer (MARK with ``hold``; they stay dirty, whatever a sender commits, until
MARK_COMPLETED lets go of them, ``Session.holds``). ChunkMap keeps only the union of every
session's holds (``held``), so letting go of a hold recomputes that union from the holds
of the others. One sender at a time checks out a device.

The sender slot: the first connection that checks a device out is its sender until it
closes. A CLAIM (``bmigrate cutover``) takes the slot: at once if it is free, else it
waits (at most ``wait_ms``) while the sender's next CHECKOUT is refused with
``sender-claimed`` and STATS names the claimant (``claimed_by``); the claim is granted
the moment the sender's connection ends, so the slot is never free in between. A
connection that took the slot by CLAIM keeps it until it closes: nobody claims it from
it.

When a connection ends, for whatever reason, ``end`` aborts its checkouts (invariant 3: a
lost sender's chunks go back to dirty) and lets go of its holds (the chunks stay dirty: a
write may have reached the source). The MARK handler is here because a hold belongs to
its connection; a MARK makes its chunks dirty before it is answered (invariant 1, through
TrackedDevice.mark_spans and the group committer), and MARK_COMPLETED marks them again
(invariant 2).

The room may change chunk state only through ChunkMap and queue bitmap pages only through
the device's GroupCommitter; it does no I/O, and knows nothing of sockets (control.py) or
of the config directory (registry.py).
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Any, Awaitable

from bmig.errors import DeviceBusy, NotCheckedOut, RequestError, SenderClaimed, UnknownDevice
from bmig.limits import (MARK_PIECE, MAX_CHECKOUT_RUNS, MAX_CLAIM_WAIT_MS, MAX_HELD_RUNS,
                         MAX_RANGES_PER_FRAME)
from bmig.tracker.committer import pages_of
from bmig.tracker.intervals import IntervalSet, merge_spans
from bmig.tracker.protocol import Message, Op, Reply, field_bool, field_int, reply_after
from bmig.tracker.registry import Registry
from bmig.tracker.tracked import TrackedDevice

log = logging.getLogger("breqd")


class Session:
    """One control connection: per device, the runs it has checked out (as a sender) and
    the runs it holds (as a writer: marked with ``hold`` and not yet let go of)."""

    def __init__(self, peer: str):
        self.peer = peer
        self.checkouts: dict[str, IntervalSet] = {}
        self.holds: dict[str, IntervalSet] = {}
        self.claimed: set[str] = set()     # devices whose slot it took by CLAIM


@dataclass(eq=False)
class _Claim:
    """A CLAIM waiting for the device's sender to give the slot up."""

    session: Session
    answer: asyncio.Future             # the peer that gave the slot up, or an error
    timer: asyncio.TimerHandle


class Sessions:
    """Every live session, the sender of each device, and the requests that change what a
    session has checked out or holds: MARK, MARK_COMPLETED, CHECKOUT, COMMIT, ABORT."""

    def __init__(self, registry: Registry):
        self._registry = registry
        self._live: set[Session] = set()
        self._senders: dict[str, Session] = {}     # device -> the session that checks out
        self._claims: dict[str, _Claim] = {}       # device -> the claim waiting for it

    # -- connections -----------------------------------------------------------------

    def open(self, peer: str) -> Session:
        session = Session(peer)
        self._live.add(session)
        return session

    def end(self, session: Session) -> None:
        """A connection ended: its checkouts go back to dirty, its holds are let go of
        (the held chunks stay dirty: a write may have reached the source)."""
        self._live.discard(session)
        for name, checked_out in session.checkouts.items():
            device = self._registry.devices.get(name)
            if device is None:
                continue
            for first, end in checked_out:
                device.chunks.abort(first, end)
        session.checkouts.clear()
        for name in [n for n, claim in self._claims.items() if claim.session is session]:
            self._drop_claim(name, RequestError(f"{name}: the claim's connection ended"))
        for name in [n for n, owner in self._senders.items() if owner is session]:
            del self._senders[name]
            self._grant(name, session.peer)
        session.claimed.clear()
        holds, session.holds = session.holds, {}
        for name, runs in holds.items():
            device = self._registry.devices.get(name)
            if device is not None:
                for first, end in runs:
                    self._let_go(device, session, first, end)

    def end_all(self) -> None:
        for session in list(self._live):
            self.end(session)

    def forget_device(self, name: str) -> None:
        """``name`` is no longer tracked: no session has it checked out or holds it."""
        self._senders.pop(name, None)
        self._drop_claim(name, UnknownDevice(f"{name} is no longer tracked"))
        for session in self._live:
            session.checkouts.pop(name, None)
            session.holds.pop(name, None)
            session.claimed.discard(name)

    def _let_go(self, device: TrackedDevice, session: Session, first: int, end: int,
                synced: bool = False) -> None:
        """Drop ``session``'s hold on [first, end); other sessions' holds stay. Mirrored
        chunks nobody holds any more become clean if ``synced``, plain dirty if not."""
        device.chunks.set_held(first, end, False)
        for other in self._live:
            runs = other.holds.get(device.name) if other is not session else None
            if runs:
                for a, b in runs.overlapping(first, end):
                    device.chunks.set_held(a, b, True)
        if device.chunks.release_mirrored(first, end, synced):
            device.committer.lazy(pages_of(first, end))

    # -- a writer's requests ---------------------------------------------------------

    def mark(self, session: Session, msg: Message) -> Reply:
        """Mark (and hold) the ranges. What one MARK allocates is bounded (invariant 8):
        its ranges, up to 65536 of them and each perhaps the whole device, are merged
        first, and each run is marked in pieces of at most MARK_PIECE chunks, so no bit
        array built on the way grows with the ranges or with the device.

        With ``sync`` the reply's ranges are the chunks of the mark that are mirrored now
        (at most MAX_RANGES_PER_FRAME runs): the writer may keep those holds once their
        writes settled, since no sender ships them; the others it lets go as they settle,
        so a sender can make them clean (invariant 6)."""
        device = self._registry.requested(msg)
        spans = merge_spans(device.spans(msg.ranges))
        hold = field_bool(msg, "hold")
        sync = field_bool(msg, "sync")
        if sync and not hold:
            raise RequestError("sync needs hold: a synchronous write holds its chunks")
        if hold:
            runs = session.holds.setdefault(device.name, IntervalSet())
            if len(runs) + len(spans) > MAX_HELD_RUNS:
                raise RequestError(f"{device.name}: more than {MAX_HELD_RUNS} held runs on "
                                   "one connection; release some first")
        pending: list[Awaitable] = []
        pieces = 0
        mirrored: list[tuple[int, int]] = []     # sync: the held chunks that are mirrored
        for first, end in spans:
            for start in range(first, end, MARK_PIECE):
                stop = min(end, start + MARK_PIECE)
                # Which chunks were clean, before the mark makes them dirty: those a
                # synchronous write makes mirrored.
                mirror = device.chunks.clean(start, stop) if sync else None
                flushed = device.mark_spans([(start, stop)], keep_mirrored=sync)
                pieces += 1
                if flushed is not None and flushed not in pending:
                    pending.append(flushed)
                if hold:
                    device.chunks.hold(start, stop, mirror)
                if sync:
                    _add_runs(mirrored, device.chunks.mirrored, start, stop)
            if hold:
                runs.add(first, end)
        device.marks += len(msg.ranges) - pieces      # it counts the ranges sent
        ok = Message(Op.REPLY_OK, msg.request_id, {},
                     [device.chunks.chunk_bytes(a, b) for a, b in mirrored])
        if not pending:
            return ok
        return reply_after(pending[0] if len(pending) == 1 else asyncio.gather(*pending), ok)

    def mark_completed(self, session: Session, msg: Message) -> Reply:
        """Mark again after the write, and let go of this connection's holds there. With
        ``synced`` every write under the holds reached the target as well: no mark again,
        and mirrored chunks become clean."""
        device = self._registry.requested(msg)
        spans = device.spans(msg.ranges)
        synced = field_bool(msg, "synced")
        pending = None if synced else device.mark_spans(spans)
        runs = session.holds.get(device.name)
        if runs:
            for first, end in spans:
                if runs.overlapping(first, end):
                    runs.remove(first, end)
                    self._let_go(device, session, first, end, synced)
        ok = Message(Op.REPLY_OK, msg.request_id)
        if pending is None:
            return ok
        return reply_after(pending, ok)

    # -- a sender's requests ---------------------------------------------------------

    def checkout(self, session: Session, msg: Message) -> Reply:
        device = self._registry.requested(msg)
        owner = self._sender(device.name)
        if owner is not None and owner is not session:
            raise DeviceBusy(f"{device.name} is being shipped by another sender "
                             f"({owner.peer}); one sender at a time")
        claim = self._claims.get(device.name)
        if claim is not None and claim.session is not session:
            raise SenderClaimed(f"{device.name}: {claim.session.peer} claims the device "
                                "for a cutover; this sender gives it up")
        self._senders[device.name] = session
        max_bytes = field_int(msg, "max_bytes")
        if max_bytes <= 0:
            raise RequestError(f"max_bytes must be positive, not {max_bytes}")
        runs = device.chunks.checkout(max(1, max_bytes // device.definition.chunk_size),
                                      max_runs=MAX_CHECKOUT_RUNS,
                                      settled=field_bool(msg, "settled"))
        checked_out = session.checkouts.setdefault(device.name, IntervalSet())
        for first, end in runs:
            checked_out.add(first, end)
        ranges = [device.chunks.chunk_bytes(first, end) for first, end in runs]
        return Message(Op.REPLY_OK, msg.request_id, {}, ranges)

    def _checked_out(self, session: Session,
                     msg: Message) -> tuple[TrackedDevice, list[tuple[int, int]], IntervalSet]:
        """The device, the spans of the request and the session's checkouts of the device;
        NotCheckedOut unless this session has every range checked out."""
        device = self._registry.requested(msg)
        spans = device.spans(msg.ranges)
        checked_out = session.checkouts.get(device.name)
        for (first, end), (offset, length) in zip(spans, msg.ranges):
            if checked_out is None or not checked_out.contains(first, end):
                raise NotCheckedOut(f"{device.name}: range {offset}+{length} is not checked "
                                    "out by this client")
        assert checked_out is not None
        return device, spans, checked_out

    def commit(self, session: Session, msg: Message) -> Reply:
        device, spans, checked_out = self._checked_out(session, msg)
        for first, end in spans:
            device.chunks.commit(first, end)
            checked_out.remove(first, end)
            device.committer.lazy(pages_of(first, end))
        return Message(Op.REPLY_OK, msg.request_id)

    def abort(self, session: Session, msg: Message) -> Reply:
        device, spans, checked_out = self._checked_out(session, msg)
        for first, end in spans:
            device.chunks.abort(first, end)
            checked_out.remove(first, end)
        return Message(Op.REPLY_OK, msg.request_id)

    # -- the sender slot ---------------------------------------------------------------

    def slot(self, name: str) -> dict[str, Any]:
        """The sender slot of device ``name``, for its status object."""
        owner = self._sender(name)
        claim = self._claims.get(name)
        return {"sender": owner.peer if owner is not None else None,
                "sender_claimed": owner is not None and name in owner.claimed,
                "claimed_by": claim.session.peer if claim is not None else None}

    def claim(self, session: Session, msg: Message) -> Reply:
        """CLAIM: make ``session`` the device's sender, now if the slot is free, else
        once its sender gives it up (within ``wait_ms``). The reply's ``yielded_by``
        names the sender that gave it up (null if none had it)."""
        device = self._registry.requested(msg)
        name = device.name
        wait_ms = field_int(msg, "wait_ms", 0)
        if not 0 <= wait_ms <= MAX_CLAIM_WAIT_MS:
            raise RequestError(f"wait_ms must be from 0 to {MAX_CLAIM_WAIT_MS}, not {wait_ms}")
        owner = self._sender(name)
        if owner is None or owner is session:
            self._senders[name] = session
            session.claimed.add(name)
            return Message(Op.REPLY_OK, msg.request_id, {"yielded_by": None})
        if name in owner.claimed:
            raise DeviceBusy(f"{name} is held by {owner.peer} for a cutover; one at a time")
        waiting = self._claims.get(name)
        if waiting is not None:
            raise DeviceBusy(f"{name}: {waiting.session.peer} already claims it")
        if wait_ms == 0:
            raise DeviceBusy(f"{name} is being shipped by {owner.peer}")
        loop = asyncio.get_running_loop()
        answer = loop.create_future()
        timer = loop.call_later(wait_ms / 1000, self._claim_timed_out, name, answer,
                                owner.peer, wait_ms)
        self._claims[name] = _Claim(session, answer, timer)
        log.info("%s: %s claims the device; asking %s to give it up", name, session.peer,
                 owner.peer)
        return _claim_reply(msg.request_id, answer)

    def _sender(self, name: str) -> Session | None:
        owner = self._senders.get(name)
        return owner if owner is not None and owner in self._live else None

    def _grant(self, name: str, previous: str) -> None:
        """The slot of ``name`` is free: the claim waiting for it (if any) gets it."""
        claim = self._claims.pop(name, None)
        if claim is None:
            return
        claim.timer.cancel()
        if claim.session not in self._live or claim.answer.done():
            return
        self._senders[name] = claim.session
        claim.session.claimed.add(name)
        log.info("%s: %s gave the device up to %s", name, previous, claim.session.peer)
        claim.answer.set_result(previous)

    def _drop_claim(self, name: str, why: Exception) -> None:
        claim = self._claims.pop(name, None)
        if claim is not None:
            claim.timer.cancel()
            if not claim.answer.done():
                claim.answer.set_exception(why)

    def _claim_timed_out(self, name: str, answer: asyncio.Future, owner: str,
                         wait_ms: int) -> None:
        claim = self._claims.get(name)
        if claim is not None and claim.answer is answer:
            self._drop_claim(name, DeviceBusy(
                f"{name}: {owner} did not give the device up within {wait_ms / 1000:g} s"))


def _add_runs(runs: list[tuple[int, int]], bits, first: int, end: int) -> None:
    """Append the runs of set bits of ``bits`` in [first, end) to ``runs`` (merging with
    the last one), up to MAX_RANGES_PER_FRAME runs: what does not fit is left out, which
    only makes the writer let those holds go sooner."""
    pos = first
    while pos < end and len(runs) <= MAX_RANGES_PER_FRAME:
        a = bits.find(1, pos, end)
        if a < 0:
            return
        b = bits.find(0, a, end)
        b = end if b < 0 else b
        if runs and runs[-1][1] == a:
            runs[-1] = (runs[-1][0], b)
        elif len(runs) < MAX_RANGES_PER_FRAME:
            runs.append((a, b))
        else:
            return
        pos = b


async def _claim_reply(request_id: int, answer: Awaitable[str]) -> Message:
    return Message(Op.REPLY_OK, request_id, {"yielded_by": await answer})
