"""breqd's activity log: a chunk marked recently stays dirty on disk when a commit makes
it clean in memory, so its next mark needs no fdatasync; a chunk evicted from the log is
clean on disk after the next write; the setting is checked like every other key.

The bitmap writes are counted through the store's seam (``BitmapFile.sync_staged``, the
one place a flush calls fdatasync), not by timing; what is on disk is read back by
opening the file again, as breqd does after a kill -9.
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

import pytest

from bmig.cli import breqd as breqd_cli
from bmig.config import load_settings
from bmig.errors import ConfigError
from bmig.limits import DEFAULT_ACTIVITY_LOG, MAX_ACTIVITY_LOG
from bmig.tracker.activity import ActivityLog
from bmig.tracker.chunks import ChunkMap
from bmig.tracker.definitions import DeviceDefinition
from bmig.tracker.store import BitmapFile, Identity
from bmig.tracker.tracked import TrackedDevice, bitmap_path

CHUNK = 4096
DEFINITION = DeviceDefinition("dev", 64 * CHUNK, CHUNK, 0xABCD)


class Device:
    """A TrackedDevice on a real bitmap file, its fdatasyncs counted."""

    def __init__(self, state_dir: str, log_chunks: int):
        self.state_dir = state_dir
        self.loop = asyncio.new_event_loop()
        self.executor = ThreadPoolExecutor(1)
        self.device = TrackedDevice(DEFINITION, state_dir, self.executor, log_chunks)
        self.syncs = 0
        bitmap = self.device.bitmap
        real_sync = bitmap.sync_staged

        def counted() -> None:
            self.syncs += 1
            real_sync()

        bitmap.sync_staged = counted           # type: ignore[method-assign]
        self.device.chunks.clear_all()
        self.flush_lazy()

    def run(self, coro):
        return self.loop.run_until_complete(coro)

    def mark(self, chunk: int) -> bool:
        """Mark ``chunk`` as a MARK does; True if the answer had to wait for a flush."""
        async def mark() -> bool:
            pending = self.device.mark_spans([(chunk, chunk + 1)])
            if pending is None:
                return False
            await pending
            return True
        return self.run(mark())

    def ship(self, chunk: int) -> None:
        """What a sender does: check the chunk out, commit it once durable on the target
        (and give back what else it took)."""
        chunks = self.device.chunks
        runs = chunks.checkout(chunks.nchunks)
        assert any(a <= chunk < b for a, b in runs), runs
        for a, b in runs:
            chunks.abort(a, b)
        chunks.inflight[chunk] = 1
        chunks.dirty[chunk] = 0
        chunks.commit(chunk, chunk + 1)
        self.device.committer.lazy([0])        # as Sessions.commit does

    def flush_lazy(self) -> None:
        async def flush() -> None:
            future = self.device.committer.flush_lazy()
            if future is not None:
                await future
        self.run(flush())

    def on_disk(self) -> set[int]:
        """The chunks set in the bitmap file now, read as a restart after kill -9 would."""
        ident = Identity(DEFINITION.device_id, DEFINITION.size, DEFINITION.chunk_size)
        bitmap, bits, reason = BitmapFile.open(bitmap_path(self.state_dir, "dev"), ident)
        bitmap.close(clean=False)
        assert reason is None, reason
        return set(bits.search(1))

    def close(self) -> None:
        self.run(self.device.close())
        self.executor.shutdown()
        self.loop.close()


@pytest.fixture
def make(tmp_path):
    made: list[Device] = []

    def factory(log_chunks: int) -> Device:
        d = Device(str(tmp_path), log_chunks)
        made.append(d)
        return d

    yield factory
    for d in made:
        d.close()


def test_a_mark_of_a_chunk_in_the_log_needs_no_fdatasync(make):
    d = make(8)
    assert d.mark(5)                           # clean: waits for its flush
    d.ship(5)
    d.flush_lazy()                             # the commit's lazy write has landed
    assert not d.device.chunks.dirty[5] and not d.device.chunks.inflight[5]
    assert d.on_disk() == {5}, "a chunk in the log stays dirty on disk"
    syncs = d.syncs
    assert not d.mark(5), "the bit is durable already: the mark is answered at once"
    assert d.syncs == syncs
    assert d.device.chunks.dirty[5]


def test_without_the_log_the_same_mark_waits_for_a_flush(make):
    """The case above with the log off: what the log saves."""
    d = make(0)
    assert d.mark(5)
    d.ship(5)
    d.flush_lazy()
    assert d.on_disk() == set()
    syncs = d.syncs
    assert d.mark(5)
    assert d.syncs == syncs + 1


def test_a_chunk_evicted_and_committed_is_clean_on_disk_after_the_next_write(make):
    """Eviction by a mark that needs no flush of its own: the evicted chunk's bit goes
    with the next lazy write all the same."""
    d = make(2)
    d.mark(8)                                  # dirty, never shipped
    for chunk in (7, 5):
        d.mark(chunk)
        d.ship(chunk)                          # the log: 7, 5; 8 left it, still dirty
    d.flush_lazy()
    assert d.on_disk() == {5, 7, 8}
    syncs = d.syncs
    assert not d.mark(8)                       # dirty already: no flush; 7 leaves the log
    assert d.syncs == syncs
    d.flush_lazy()
    assert d.on_disk() == {5, 8}


def test_a_chunk_out_of_the_log_needs_a_flush_again(make):
    d = make(2)
    for chunk in (5, 6):
        d.mark(chunk)
        d.ship(chunk)
    d.flush_lazy()
    assert d.on_disk() == {5, 6}               # both in the log, clean in memory
    d.mark(7)                                  # the log holds two: 5, the oldest, goes
    assert len(d.device.chunks.log) == 2
    d.flush_lazy()
    assert d.on_disk() == {6, 7}
    syncs = d.syncs
    assert d.mark(5), "out of the log and clean: its mark waits for a flush again"
    assert d.syncs == syncs + 1
    assert d.on_disk() == {5, 7}               # and 6, clean, went out with that write


def test_a_mark_refreshes_a_chunk_so_the_oldest_other_one_goes(make):
    d = make(2)
    for chunk in (5, 6):
        d.mark(chunk)
        d.ship(chunk)
    d.mark(5)                                  # 5 is the newest now
    d.ship(5)
    d.mark(7)
    d.flush_lazy()
    assert d.on_disk() == {5, 7}


def test_a_clean_stop_and_clear_all_empty_the_log(make, tmp_path):
    d = make(8)
    d.mark(5)
    d.ship(5)
    d.device.chunks.clear_all()
    assert len(d.device.chunks.log) == 0
    d.device.committer.lazy([0])
    d.flush_lazy()
    assert d.on_disk() == set()
    d.mark(6)
    d.ship(6)
    d.flush_lazy()
    assert d.on_disk() == {6}
    d.run(d.device.close())                    # a clean stop: nobody can write now
    assert d.on_disk() == set(), "after a clean stop the file holds dirty ∪ in flight"
    d.device = TrackedDevice(DEFINITION, str(tmp_path), d.executor, 8)


def test_a_run_longer_than_the_log_keeps_only_its_last_chunks():
    log = ActivityLog(100, 4)
    assert log.add(0, 3) == []
    evicted = log.add(10, 50)
    assert sorted(evicted) == [0, 1, 2]
    assert log.bits is not None and sorted(log.bits.search(1)) == [46, 47, 48, 49]
    assert ActivityLog(100, 0).bits is None and ActivityLog(100, 0).add(0, 100) == []


@pytest.mark.parametrize("value", ["8192", 1.5, -1, MAX_ACTIVITY_LOG + 1, True])
def test_the_activity_log_setting_is_type_checked(tmp_path, value):
    path = tmp_path / "breqd.toml"
    text = f'"{value}"' if isinstance(value, str) else str(value).lower()
    path.write_text(f"activity_log_chunks = {text}\n")
    with pytest.raises(ConfigError, match=r"activity_log_chunks: expected an integer from 0 "
                                          rf"to {MAX_ACTIVITY_LOG}"):
        load_settings(str(path), breqd_cli.SCHEMA)


def test_the_activity_log_setting_takes_0_to_the_cap(tmp_path):
    path = tmp_path / "breqd.toml"
    for value in (0, MAX_ACTIVITY_LOG):
        path.write_text(f"activity_log_chunks = {value}\n")
        assert load_settings(str(path), breqd_cli.SCHEMA)["activity_log_chunks"] == value
    assert breqd_cli.SCHEMA.defaults()["activity_log_chunks"] == DEFAULT_ACTIVITY_LOG


def test_a_logged_chunk_written_synchronously_is_mirrored_and_stays_dirty_on_disk():
    """Clean in memory but dirty on disk: a synchronous write to it makes it mirrored
    (its target copy is current), and once released as synced it is clean for the
    sender again while the file still has its bit."""
    m = ChunkMap(16 * CHUNK, CHUNK, log_chunks=4)
    m.mark(3, 4)
    assert m.checkout(16) == [(3, 4)]
    m.commit(3, 4)
    mirror = m.clean(3, 4)
    assert mirror.all(), "the sender made it clean: the target has it"
    m.mark(3, 4, keep_mirrored=True)
    m.hold(3, 4, mirror)
    assert m.checkout(16) == [], "mirrored: not the sender's to ship"
    m.set_held(3, 4, False)
    assert m.release_mirrored(3, 4, synced=True)
    assert not m.dirty[3] and m.disk_image(3, 4).all()
