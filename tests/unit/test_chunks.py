import pytest

from bmig.errors import RangeError
from bmig.tracker.chunks import ChunkMap


def test_span_covers_partial_chunks():
    m = ChunkMap(10 * 4096 + 100, 4096)
    assert m.nchunks == 11
    assert m.span(0, 1) == (0, 1)
    assert m.span(4095, 2) == (0, 2)
    assert m.span(10 * 4096, 100) == (10, 11)


@pytest.mark.parametrize("offset,length", [(0, 0), (-1, 10), (0, 10 * 4096 + 101),
                                           (10 * 4096 + 100, 1), (2**64 - 1, 2)])
def test_span_rejects_empty_and_out_of_range(offset, length):
    m = ChunkMap(10 * 4096 + 100, 4096)
    with pytest.raises(RangeError):
        m.span(offset, length)


def test_short_last_chunk_counts_its_real_bytes():
    m = ChunkMap(10 * 4096 + 100, 4096)
    m.mark(9, 11)
    assert m.dirty_bytes() == 4096 + 100
    assert m.chunk_bytes(9, 11) == (9 * 4096, 4096 + 100)


def test_commit_cleans_only_chunks_not_remarked_since_checkout():
    m = ChunkMap(8 * 4096, 4096)
    m.mark(0, 8)
    assert m.checkout(100) == [(0, 8)]
    m.mark(3, 4)            # written while in flight (invariant 2)
    m.commit(0, 8)
    assert m.dirty.tolist() == [0, 0, 0, 1, 0, 0, 0, 0]
    assert not m.inflight.any()


def test_abort_returns_chunks_to_dirty():
    m = ChunkMap(8 * 4096, 4096)
    m.mark(2, 5)
    runs = m.checkout(100)
    assert runs == [(2, 5)] and not m.dirty.any()
    m.abort(2, 5)
    assert m.dirty.tolist() == [0, 0, 1, 1, 1, 0, 0, 0]


def test_checkout_respects_budget_and_sweeps_on():
    m = ChunkMap(100 * 4096, 4096)
    m.mark(10, 20)
    m.mark(50, 55)
    assert m.checkout(4) == [(10, 14)]
    assert m.checkout(8) == [(14, 20), (50, 52)]
    m.mark(0, 2)                       # behind the cursor: found after wrapping
    assert m.checkout(100) == [(52, 55), (0, 2)]
    assert m.checkout(100) == []


def test_checkout_skips_remarked_chunks_still_in_flight():
    m = ChunkMap(10 * 4096, 4096)
    m.mark(0, 6)
    assert m.checkout(3) == [(0, 3)]
    m.mark(1, 2)                       # re-marked while in flight
    assert m.checkout(100) == [(3, 6)]
    assert m.checkout(100) == []       # chunk 1 waits for its commit
    m.commit(0, 3)
    assert m.checkout(100) == [(1, 2)]


def test_disk_image_is_dirty_or_inflight():
    m = ChunkMap(8 * 4096, 4096)
    m.mark(0, 2)
    m.checkout(1)
    m.mark(5, 6)
    assert m.disk_image(0, 8).tolist() == [1, 1, 0, 0, 0, 1, 0, 0]
    assert m.covered(0, 2) and not m.covered(0, 3)


def test_checkout_caps_the_number_of_runs():
    m = ChunkMap(100 * 4096, 4096)
    for c in range(0, 100, 2):
        m.mark(c, c + 1)
    runs = m.checkout(1000, max_runs=3)
    assert runs == [(0, 1), (2, 3), (4, 5)]
    assert m.checkout(1000, max_runs=2) == [(6, 7), (8, 9)]


def test_a_settled_checkout_allocates_nothing_the_size_of_the_device():
    """breqd answers writers' MARKs on the loop that serves checkouts: a checkout of the
    catch-up service (settled) finds held chunks run by run, as it finds mirrored and in
    flight ones, and builds no array as large as the device (invariant 8)."""
    import tracemalloc

    from bmig.tracker.chunks import ChunkMap

    chunks = 1 << 24                                  # 2 MiB per bit array
    m = ChunkMap(chunks * 4096, 4096)
    m.mark(0, chunks)
    m.hold(10, 20)
    tracemalloc.start()
    try:
        runs = m.checkout(1000, settled=True)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert runs == [(0, 10), (20, 1010)]
    assert peak < (chunks // 8) // 4, peak
