"""The replication layer: while active, every write, trim and zero also goes to breceive.

Started and stopped at run time (``bmigrate replicate``), without touching the
application's NBD connections. Local and remote writes run side by side; the reply waits
for what the protocol says (bmig.nbd.replica: A, B or C) and for the local write. FLUSH
is durable on both sides. Reads stay local.

When the target fails (the connection is lost, or breceive refused a frame: no space, an
I/O error), the policy decides: ``degrade`` (the default) goes back to tracking only,
loudly; the writes that did not reach the target have their chunks dirty, so a later
sync ships them. ``block`` fails writes with EIO until replication is stopped or started
again. Either way the replication generation moves on (bmig.nbd.layers.mirror, where
invariant 6 lives), and the listeners (the tracking layer) hear it at once: a write whose
seq was not durable on the target by then stays dirty, since no DURABLE of this replica
or of a later one will ever cover it.

It may not talk to breqd or know the holds: the tracking layer above hears the
replication generation and the durable watermark through the Mirror contract.
"""

from __future__ import annotations

import asyncio
import errno
import logging
from typing import Callable

from bmig.constants import REPLICATION_POLICIES
from bmig.errors import BmigError
from bmig.nbd.layers.base import Layer, WriteDone
from bmig.nbd.layers.mirror import ReplicationGeneration
from bmig.nbd.replica import Replica

log = logging.getLogger("bmig-nbd")


class ReplicateLayer(Layer):
    """While active, every write-like request goes to the replica too; the tracking
    layer above reads it as its ``Mirror`` (bmig.nbd.layers.mirror)."""

    def __init__(self, inner: Layer, name: str):
        super().__init__(inner)
        self.name = name
        self.replica: Replica | None = None
        self.policy = "degrade"
        self._generation = ReplicationGeneration()
        self.failed: str | None = None       # why replication stopped on its own
        self.blocked = False                 # policy block after a failure
        self._running = 0                    # replicated requests not yet finished
        self._idle = asyncio.Event()
        self._idle.set()

    # -- what the tracking layer reads ---------------------------------------------------

    @property
    def active(self) -> bool:
        return self.replica is not None

    @property
    def generation(self) -> int:
        return self._generation.value

    @property
    def durable_seq(self) -> int:
        return self.replica.durable_seq if self.replica is not None else 0

    def add_listener(self, callback: Callable[[], None]) -> None:
        self._generation.add_listener(callback)

    def _durable(self, seq: int) -> None:
        self._generation.announce()

    # -- switching -------------------------------------------------------------------

    def start(self, replica: Replica, policy: str) -> None:
        if policy not in REPLICATION_POLICIES:
            raise ValueError(policy)
        old, self.replica = self.replica, None
        if old is not None:                 # detached first: its failing writes are not
            old.close()                     # taken for a failure of the replication
        self.replica, self.policy = replica, policy
        self.failed, self.blocked = None, False
        self._generation.advance()
        replica.on_durable = self._durable
        replica.on_failed = lambda exc: self._give_up(replica, exc)
        log.info("%s: replicating synchronously to %s (protocol %s, on failure %s)",
                 self.name, replica.description, replica.protocol, policy)
        self._generation.announce()
        if replica.error is not None:       # it failed before we listened
            self._give_up(replica, replica.error)

    async def stop(self) -> None:
        """Back to tracking only, once the replicated requests in flight are answered."""
        replica = self.replica
        self._generation.advance()
        self.blocked = False
        if replica is None:
            self._generation.announce()
            return
        await self._idle.wait()
        self.replica = None
        self._generation.announce()
        await asyncio.to_thread(replica.close)
        log.info("%s: replication to %s stopped; tracking only", self.name,
                 replica.description)

    def _give_up(self, replica: Replica, exc: BmigError) -> None:
        if self.replica is not replica:
            return
        self._generation.advance()
        self.replica = None
        self.failed = exc.message
        if self.policy == "block":
            self.blocked = True
            log.error("%s: replication to %s failed (%s); writes fail with EIO until it is "
                      "started again or stopped", self.name, replica.description, exc.message)
        else:
            log.error("%s: replication to %s failed (%s); back to tracking only: the "
                      "writes since are dirty and the next sync ships them", self.name,
                      replica.description, exc.message)
        self._generation.announce()
        asyncio.get_running_loop().run_in_executor(None, replica.close)

    # -- requests --------------------------------------------------------------------

    def _refuse_if_blocked(self) -> None:
        if self.blocked:
            raise OSError(errno.EIO, f"replication of {self.name} failed ({self.failed}) "
                                     "and the policy is block")

    def write_now(self, data: memoryview, offset: int, fua: bool) -> bool:
        if self.replica is not None or self.blocked:
            return False
        return self.inner.write_now(data, offset, fua)

    async def _both(self, local, remote, local_now=None) -> int | None:
        """Run the local request and its replica side by side; the replica's seq, or
        None when the write did not reach the target. ``local_now``: the local request
        done at once if it can be (True), before the replica's frame leaves with the
        others of this loop turn: no task of its own."""
        self._refuse_if_blocked()
        replica = self.replica
        if replica is None:
            await local()
            return None
        self._running += 1
        self._idle.clear()
        try:
            local_task = (None if local_now is not None and local_now()
                          else asyncio.ensure_future(local()))
            try:
                seq = await remote(replica)
            except BmigError as exc:
                self._give_up(replica, exc)
                seq = None
            if local_task is not None:
                await local_task
            self._refuse_if_blocked()
            return seq
        finally:
            self._running -= 1
            if not self._running:
                self._idle.set()

    async def write(self, data: memoryview, offset: int, fua: bool) -> int | None:
        """Written locally at once, before its frames leave (a FUA write too, flushed
        after), so that overlapping writes reach the source and the target in one order.
        A write of more than one frame cannot promise that (another write's frame may go
        between its frames): the tracking layer taints the holds of such a write that
        overlaps another in flight."""
        flush: asyncio.Future | None = None

        def local_now() -> bool:
            nonlocal flush
            done = self._next().write_now(data, offset, False)
            if done and fua:                # its flush runs beside the target's answer
                flush = asyncio.ensure_future(self._next().flush())
            return done

        try:
            return await self._both(lambda: self._next().write(data, offset, fua),
                                    lambda r: r.write(offset, data, fua), local_now)
        finally:
            if flush is not None:
                await flush

    def write_later(self, data: memoryview, offset: int, fua: bool,
                    done: WriteDone) -> bool:
        """A write of one frame the replica can queue now: written locally at once,
        queued for the target in the same step (as ``_both`` does with a local write
        done at once), and answered through ``done`` when the replica answers, with the
        seq; no task, no future. A write the target did not get is handled as in
        ``_both``: the replica is given up, and the write fails only under ``block``."""
        replica = self.replica
        if replica is None or self.blocked or not replica.takes_now(len(data)):
            return False
        if not self._next().write_now(data, offset, fua):
            return False
        self._running += 1
        self._idle.clear()

        def answered(seq: int, error: BmigError | None) -> None:
            self._running -= 1
            if not self._running:
                self._idle.set()
            outcome: tuple[int | None, BaseException | None]
            try:
                if error is not None:
                    self._give_up(replica, error)
                self._refuse_if_blocked()
                outcome = (seq if error is None else None, None)
            except OSError as exc:          # blocked: the write fails
                outcome = (None, exc)
            except Exception as exc:        # a bug: the writer is answered all the same
                log.exception("%s: after a replicated write", self.name)
                outcome = (None, exc)
            done(*outcome)

        replica.write_now(offset, data, fua, answered)
        return True

    # A trim or zero runs its local part beside its frame (a task, perhaps a thread), so
    # an overlapping write may land before it locally and after it on the target: the
    # tracking layer taints the holds of one that overlaps another request in flight.

    async def trim(self, offset: int, length: int, fua: bool) -> int | None:
        return await self._both(lambda: self._next().trim(offset, length, fua),
                                lambda r: r.zero(offset, length, fua))

    async def zero(self, offset: int, length: int, fua: bool, may_trim: bool,
                   fast: bool) -> int | None:
        return await self._both(lambda: self._next().zero(offset, length, fua, may_trim, fast),
                                lambda r: r.zero(offset, length, fua))

    async def flush(self) -> None:
        async def remote(r: Replica) -> int:
            await r.flush()
            return r.durable_seq

        await self._both(lambda: self._next().flush(), remote)

    async def close(self) -> None:
        await self.stop()
        await super().close()

