from hypothesis import given, strategies as st

from bmig.tracker.intervals import IntervalSet

ops = st.lists(st.tuples(st.booleans(), st.integers(0, 60), st.integers(1, 10)), max_size=40)


@given(ops)
def test_interval_set_matches_a_plain_set(operations):
    model: set[int] = set()
    s = IntervalSet()
    for add, start, length in operations:
        if add:
            s.add(start, start + length)
            model.update(range(start, start + length))
        else:
            s.remove(start, start + length)
            model.difference_update(range(start, start + length))
        runs = list(s)
        assert set().union(*(range(a, b) for a, b in runs)) == model
        assert all(a < b for a, b in runs)
        assert all(runs[i][1] < runs[i + 1][0] for i in range(len(runs) - 1))
    for start in range(0, 70, 7):
        for length in (1, 3):
            expect = set(range(start, start + length)) <= model
            assert s.contains(start, start + length) == expect
