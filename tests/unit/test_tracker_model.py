"""The chunk state machine and its persistence against a simple model, crashes included.

The model keeps the one fact that matters (invariants 1-3): the set of chunks written
since their last durable commit. After any sequence of marks, mark_completed, checkouts,
commits, aborts, lazy flushes and crashes, each of those chunks must be dirty or in
flight in memory, and dirty on disk after a crash and restart.

Holds: a held chunk may be written at any moment until it is released, so a commit never
takes it out of that set, and a held chunk is dirty at all times.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
from concurrent.futures import Executor, Future

from hypothesis import settings, strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from bmig.tracker.tracked import TrackedDevice
from bmig.tracker.definitions import DeviceDefinition
from bmig.tracker import committer as committer_module
from bmig.tracker.store import BITS_PER_PAGE

CHUNK = 4096
NCHUNKS = 2 * BITS_PER_PAGE + 1000     # three bitmap pages
DEFINITION = DeviceDefinition("dev", NCHUNKS * CHUNK - 512, CHUNK, 0xABCD)
# Chunks near page boundaries, so marks often share pages and runs span them.
HOT = [0, 1, 2, BITS_PER_PAGE - 1, BITS_PER_PAGE, 2 * BITS_PER_PAGE - 1, NCHUNKS - 1]
chunk_ranges = st.tuples(st.sampled_from(HOT), st.integers(1, 3))


class ManualExecutor(Executor):
    """Bitmap writes run only when the test says so, so a crash can strike before them."""

    def __init__(self) -> None:
        self.jobs: list[tuple[Future, object, tuple]] = []

    def submit(self, fn, /, *args, **kwargs):
        future: Future = Future()
        self.jobs.append((future, fn, args))
        return future

    def run_all(self) -> None:
        while self.jobs:
            future, fn, args = self.jobs.pop(0)
            try:
                future.set_result(fn(*args))
            except BaseException as exc:
                future.set_exception(exc)

    def discard(self) -> None:
        """A crash: queued writes never reach the disk."""
        for future, _, _ in self.jobs:
            future.cancel()
        self.jobs.clear()


class TrackerModel(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.dir = tempfile.mkdtemp(prefix="bmig-model-")
        self.loop = asyncio.new_event_loop()
        self.executor = ManualExecutor()
        self.device = self._open()
        self.device.chunks.clear_all()
        self._run(self._flush_everything())
        self.must_survive: set[int] = set()     # written since their last durable commit
        self.checked_out: dict[int, bool] = {}  # chunk -> written since its checkout
        self.held: set[int] = set()             # a writer holds them: writes may land
        self.crashes = 0

    def _open(self) -> TrackedDevice:
        return TrackedDevice(DEFINITION, self.dir, self.executor)

    def _run(self, coro):
        """Run ``coro`` to completion, letting bitmap writes happen while it waits."""
        task = self.loop.create_task(coro)
        while True:
            self.loop.run_until_complete(asyncio.sleep(0))
            if task.done():
                return task.result()
            self.executor.run_all()

    async def _flush_everything(self):
        self.device.committer.lazy(self.device.all_pages())
        await self.device.committer.drain()

    def _byte_range(self, first: int, count: int) -> tuple[int, int]:
        end = min(first + count, NCHUNKS)
        offset, length = self.device.chunks.chunk_bytes(first, end)
        return offset + 100 if length > 200 else offset, max(1, length - 200)

    def _written(self, first: int, count: int) -> None:
        for c in range(first, min(first + count, NCHUNKS)):
            self.must_survive.add(c)
            if c in self.checked_out:
                self.checked_out[c] = True

    async def _mark(self, spans):
        pending = self.device.mark_spans(spans)
        if pending is not None:
            await pending

    @rule(r=chunk_ranges)
    def mark(self, r):
        """Mark before write, acknowledged; then the write happens (it 'writes')."""
        offset, length = self._byte_range(*r)
        self._run(self._mark([self.device.chunks.span(offset, length)]))
        self._written(*r)

    @rule(r=chunk_ranges)
    def mark_completed(self, r):
        offset, length = self._byte_range(*r)
        self._run(self._mark([self.device.chunks.span(offset, length)]))
        self._written(*r)

    @rule(r=chunk_ranges)
    def hold(self, r):
        """A writer marks with a hold, then writes whenever it likes until it releases."""
        offset, length = self._byte_range(*r)
        first, end = self.device.chunks.span(offset, length)
        self._run(self._mark([(first, end)]))
        self.device.chunks.hold(first, end)
        self.held.update(range(first, end))
        self._written(*r)

    @precondition(lambda self: self.held)
    @rule(data=st.data())
    def release(self, data):
        """The writer's last write to the chunk is done: mark again, let go."""
        c = data.draw(st.sampled_from(sorted(self.held)))
        self._run(self._mark([(c, c + 1)]))
        self.device.chunks.set_held(c, c + 1, False)
        self.held.discard(c)
        self._written(c, 1)

    @rule(r=chunk_ranges)
    def mark_unacknowledged(self, r):
        """A mark whose flush has not finished: the write it guards has not happened."""
        offset, length = self._byte_range(*r)

        async def start() -> None:
            self.device.mark_spans([self.device.chunks.span(offset, length)])

        self._run(start())

    @rule()
    def background_progress(self):
        """Flushes scheduled so far get their writes submitted, done, and noticed."""
        self.loop.run_until_complete(asyncio.sleep(0))
        self.executor.run_all()
        self.loop.run_until_complete(asyncio.sleep(0))

    @rule()
    def background_start(self):
        """Flushes take their snapshot and submit the write, which has not run yet."""
        self.loop.run_until_complete(asyncio.sleep(0))

    @rule(budget=st.integers(1, 8))
    def checkout(self, budget):
        for first, end in self.device.chunks.checkout(budget):
            for c in range(first, end):
                assert c not in self.checked_out
                self.checked_out[c] = False

    @precondition(lambda self: self.checked_out)
    @rule(data=st.data())
    def commit(self, data):
        """The receiver said durable: commit one checked-out chunk."""
        c = data.draw(st.sampled_from(sorted(self.checked_out)))
        self.device.chunks.commit(c, c + 1)
        self.device.committer.lazy([c // BITS_PER_PAGE])
        if not self.checked_out.pop(c) and c not in self.held:
            self.must_survive.discard(c)

    @precondition(lambda self: self.checked_out)
    @rule(data=st.data())
    def abort(self, data):
        c = data.draw(st.sampled_from(sorted(self.checked_out)))
        self.device.chunks.abort(c, c + 1)
        self.checked_out.pop(c)

    @rule()
    def lazy_flush(self):
        async def flush() -> None:
            future = self.device.committer.flush_lazy()
            if future is not None:
                await future

        self._run(flush())

    @rule(clean=st.booleans())
    def crash_and_restart(self, clean):
        """kill -9 (memory lost, the file as written) or a clean stop; then restart."""
        # Invariant 4 at this instant: on every page with no write pending, the file
        # holds every chunk dirty or in flight in memory.
        image = self.device.chunks.dirty | self.device.chunks.inflight
        unsynced = self.device.committer.unsynced
        covered = {c for c in image.search(1) if c // BITS_PER_PAGE not in unsynced}
        if clean:
            self._run(self.device.close())
        else:  # kill -9: queued and scheduled bitmap writes never happen
            self.executor.discard()
            for task in asyncio.all_tasks(self.loop):
                task.cancel()
            self.loop.run_until_complete(asyncio.sleep(0))
            self.device.bitmap.close(clean=False)
        self.device = self._open()
        assert self.device.recovered is None, self.device.recovered
        self.checked_out.clear()   # the sender's session died: its checkouts aborted
        self.held.clear()          # and the writer's session: its holds let go
        on_disk = self.device.chunks.dirty
        lost = [c for c in self.must_survive if not on_disk[c]]
        assert not lost, f"acknowledged chunks lost in a crash: {lost[:10]}"
        lost = sorted(c for c in covered if not on_disk[c])
        assert not lost, f"dirty or in flight on a synced page, clean on disk: {lost[:10]}"
        self.crashes += 1

    @invariant()
    def written_chunks_are_dirty_or_in_flight(self):
        chunks = self.device.chunks
        for c in self.must_survive:
            assert chunks.dirty[c] or chunks.inflight[c], c
        for c, rewritten in self.checked_out.items():
            assert chunks.inflight[c]
            if rewritten:
                assert chunks.dirty[c]
        for c in self.held:
            assert chunks.held[c] and chunks.dirty[c], c

    def teardown(self) -> None:
        try:
            self._run(self.device.close())
        finally:
            self.loop.close()
            shutil.rmtree(self.dir, ignore_errors=True)


TrackerModel.TestCase.settings = settings(max_examples=150, stateful_step_count=40,
                                          deadline=None)
test_tracker_model = TrackerModel.TestCase


class TrackerModelOnePagePerWrite(TrackerModel):
    """The same model with every flush written one page per slice, so that crashes and
    marks fall between the slices of one flush (large bitmaps are written that way)."""

    def __init__(self):
        self._saved_slice = committer_module.PAGES_PER_WRITE
        committer_module.PAGES_PER_WRITE = 1
        super().__init__()

    def teardown(self):
        try:
            super().teardown()
        finally:
            committer_module.PAGES_PER_WRITE = self._saved_slice


TrackerModelOnePagePerWrite.TestCase.settings = settings(max_examples=100,
                                                         stateful_step_count=40,
                                                         deadline=None)
test_tracker_model_one_page_per_write = TrackerModelOnePagePerWrite.TestCase


class TrackerModelSmallActivityLog(TrackerModel):
    """The same model with an activity log of two chunks, so marks keep evicting chunks
    that commits made clean in memory, and marks of logged chunks are answered at once."""

    def _open(self) -> TrackedDevice:
        return TrackedDevice(DEFINITION, self.dir, self.executor, log_chunks=2)


TrackerModelSmallActivityLog.TestCase.settings = settings(max_examples=150,
                                                          stateful_step_count=40,
                                                          deadline=None)
test_tracker_model_small_activity_log = TrackerModelSmallActivityLog.TestCase


def _replay(steps) -> None:
    machine = TrackerModel()
    try:
        for name, kwargs in steps:
            getattr(machine, name)(**kwargs)
            machine.written_chunks_are_dirty_or_in_flight()
    finally:
        machine.teardown()


def test_a_held_chunk_stays_dirty_through_checkout_and_commit():
    """The write under a hold may land after the sender read the chunk: it ships again."""
    _replay([("hold", {"r": (0, 1)}),
             ("checkout", {"budget": 8}),
             ("lazy_flush", {}),
             ("crash_and_restart", {"clean": False})])
    machine = TrackerModel()
    try:
        machine.hold(r=(1, 1))
        machine.checkout(budget=8)
        chunks = machine.device.chunks
        chunks.commit(1, 2)
        assert chunks.dirty[1] and not chunks.inflight[1]
        chunks.set_held(1, 2, False)
        assert chunks.checkout(8) == [(1, 2)]
        chunks.commit(1, 2)
        assert not chunks.dirty[1]
    finally:
        machine.teardown()


def test_a_mark_answered_from_the_activity_log_survives_a_crash():
    """Marked, shipped and committed (clean in memory, dirty on disk through the log),
    the commit's lazy write landed: the next mark is answered at once, so the bit it
    relies on must still be in the file after a kill -9."""
    machine = TrackerModelSmallActivityLog()
    try:
        machine.mark(r=(1, 1))
        machine.checkout(budget=8)
        machine.commit(data=_Draw(1))
        machine.lazy_flush()
        flushes = machine.device.committer.flushes
        machine.mark(r=(1, 1))
        assert machine.device.committer.flushes == flushes, "no flush for a logged chunk"
        machine.lazy_flush()
        machine.crash_and_restart(clean=False)
    finally:
        machine.teardown()


class _Draw:
    """Stands in for hypothesis' data: always draws ``value``."""

    def __init__(self, value):
        self.value = value

    def draw(self, strategy):
        return self.value


def test_mark_of_a_chunk_whose_flush_is_pending_waits_for_it():
    """The chunk is dirty in memory but not yet on disk: a second mark must not be free."""
    _replay([("mark_unacknowledged", {"r": (0, 1)}),
             ("mark", {"r": (0, 1)}),
             ("crash_and_restart", {"clean": False})])


def test_page_changed_during_its_flush_stays_unsynced():
    """A bit set after a flush took its snapshot is not made durable by that flush: once
    that flush has landed, a mark of the bit still waits for the next one."""
    machine = TrackerModel()
    try:
        committer = machine.device.committer
        machine.mark_unacknowledged(r=(0, 1))
        assert machine.executor.jobs, "the flush has taken page 0's image, not written it"
        machine.mark_unacknowledged(r=(2, 1))       # page 0 changes after that image
        flushes = committer.flushes
        while committer.flushes == flushes:
            machine.background_progress()           # the first flush lands, without chunk 2
        assert committer._next is None and committer._task is not None, \
            "the next flush has started but not landed"
        machine.mark(r=(2, 1))                      # so this mark waits for the next one
        machine.written_chunks_are_dirty_or_in_flight()
        machine.crash_and_restart(clean=False)
    finally:
        machine.teardown()


def test_a_mark_is_acknowledged_only_after_its_page_is_written_and_synced(monkeypatch):
    """Invariant 1: durable in breqd's state means the page write and then fdatasync of
    the bitmap returned, before the mark's answer."""
    machine = TrackerModel()
    try:
        bitmap_fd = machine.device.bitmap._fd
        io: list[str] = []
        real_pwrite, real_fdatasync = os.pwrite, os.fdatasync

        def pwrite(fd, data, offset):
            if fd == bitmap_fd:
                io.append("pwrite")
            return real_pwrite(fd, data, offset)

        def fdatasync(fd):
            if fd == bitmap_fd:
                io.append("fdatasync")
            return real_fdatasync(fd)

        monkeypatch.setattr(os, "pwrite", pwrite)
        monkeypatch.setattr(os, "fdatasync", fdatasync)

        async def mark() -> None:
            await machine._mark([(5, 6)])
            io.append("acknowledged")

        machine._run(mark())
        assert io == ["pwrite", "fdatasync", "acknowledged"], io
    finally:
        machine.teardown()
