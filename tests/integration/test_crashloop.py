"""A few seeded iterations of the crash loop (tests/crashloop.py) per component: kill -9
at a random moment under a journaled writer and a running sender, then a last sync;
every acknowledged write is in the source and the target equals it. bench/crashloop.py
runs many more."""

from __future__ import annotations

import pytest

from tests.crashloop import COMPONENTS, Rig

ITERATIONS = 2


@pytest.mark.parametrize("component", COMPONENTS)
def test_kill9_under_writes_loses_nothing(tmp_path, component):
    rig = Rig(str(tmp_path)).start()
    try:
        for number in range(ITERATIONS):
            outcome = rig.iteration(component, number, seed=1000 * COMPONENTS.index(component)
                                    + number)
            assert outcome.writes > 0, "the writer wrote nothing"
            assert not outcome.problems, "\n".join(outcome.problems)
    finally:
        rig.stop()
