"""bmig.chunkmath against the slow definitions it replaces."""

from hypothesis import given
from hypothesis import strategies as st

from bmig.chunkmath import ceil_div, chunk_count, chunk_span, round_up

sizes = st.integers(min_value=0, max_value=1 << 62)
units = st.sampled_from([1, 3, 512, 4096, 65536, 32512, 1 << 24])


@given(sizes, units)
def test_ceil_div_is_the_smallest_quotient_that_covers(n, d):
    q = ceil_div(n, d)
    assert q * d >= n and (q - 1) * d < n or n == q == 0


@given(sizes, units)
def test_chunk_count_covers_the_size_with_a_short_last_chunk_at_most(size, chunk):
    n = chunk_count(size, chunk)
    assert n * chunk >= size > (n - 1) * chunk or size == n == 0


@given(sizes, st.integers(min_value=1, max_value=1 << 40), units)
def test_chunk_span_is_every_chunk_a_byte_of_the_range_is_in(offset, length, chunk):
    first, end = chunk_span(offset, length, chunk)
    assert first == offset // chunk                      # the first byte's chunk
    assert end - 1 == (offset + length - 1) // chunk     # the last byte's chunk


def test_chunk_span_small_cases():
    assert chunk_span(0, 1, 4096) == (0, 1)
    assert chunk_span(4095, 2, 4096) == (0, 2)
    assert chunk_span(4096, 4096, 4096) == (1, 2)
    assert chunk_span(4096, 4097, 4096) == (1, 3)


@given(sizes, units)
def test_round_up_is_the_next_multiple(value, unit):
    r = round_up(value, unit)
    assert r % unit == 0 and value <= r < value + unit
