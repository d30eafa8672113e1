"""A short run of every fuzz driver of bench/fuzz.py (tests/fuzzing/) under hypothesis:
a seed of the driver changed by a few mutations, or random bytes, must be accepted or
refused with the product's own errors; never a crash, a hang or an unexpected failure
that was only logged. Derandomized, so every run tries the same inputs; bench/fuzz.py
runs the same drivers for a million inputs each.

Also the engine itself: a crash, a hang and a failure only logged are each caught, and
a crash's input is saved where --replay finds it."""

from __future__ import annotations

import logging
import os
import random
import time

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from tests.fuzzing import drivers
from tests.fuzzing.engine import (Driver, Frame, Seed, check, fuzz, mutate, random_input,
                                   random_ops)

ALL = drivers()
_made: dict[str, Driver] = {}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("fuzz")
    yield str(directory)
    for driver in _made.values():
        driver.close()
    _made.clear()


def driver_for(name: str, workdir: str) -> Driver:
    if name not in _made:
        path = os.path.join(workdir, name)
        os.makedirs(path)
        _made[name] = ALL[name](path)
    return _made[name]


@st.composite
def inputs(draw, driver: Driver) -> bytes:
    """What the bench feeds: random bytes one time in twenty, else a seed and one to eight
    mutations, drawn the bench's way from a ``random.Random`` seeded by hypothesis (its
    own random source favours small numbers: mutations would pile up at the start)."""
    rng = random.Random(draw(st.integers(0, (1 << 64) - 1)))
    if rng.randrange(20) == 0:
        return random_input(rng, driver.max_size)
    seeds = driver.seed_list()
    return mutate(seeds[rng.randrange(len(seeds))], random_ops(rng), seeds, driver.dictionary,
                  driver.max_size)


EXAMPLES = {"wire-session": 300, "control": 400, "bitmap": 400, "nbd-client": 400,
            "nbd-transmission": 400, "wire-sealed": 400}


@pytest.mark.parametrize("name", list(ALL))
def test_every_parser_accepts_or_refuses_with_its_own_errors(name, workdir):
    driver = driver_for(name, workdir)

    @settings(max_examples=EXAMPLES.get(name, 600), deadline=None, derandomize=True,
              database=None, suppress_health_check=list(HealthCheck))
    @given(data=st.data())
    def run(data):
        outcome = check(driver, data.draw(inputs(driver), label="input"))
        assert outcome.kind in ("accepted", "error"), f"{outcome.signature}\n{outcome.detail}"

    run()


# -- the engine ---------------------------------------------------------------------------

class Toy(Driver):
    name = "toy"
    allowed = (ValueError,)
    time_limit = 0.2

    def seeds(self):
        return [Seed((Frame(b"ok"),))]

    def run(self, data: bytes):
        if data.startswith(b"crash"):
            raise KeyError("a crash")
        if data.startswith(b"hang"):
            while True:
                time.sleep(0.01)
        if data.startswith(b"log"):
            try:
                raise RuntimeError("swallowed")
            except RuntimeError:
                logging.getLogger("toy").exception("unexpected failure")
            return None
        if data.startswith(b"bad"):
            raise ValueError("refused 12 bytes")
        return None


@pytest.mark.parametrize("data, kind", [(b"ok", "accepted"), (b"bad", "error"),
                                        (b"crash", "crash"), (b"hang", "hang"),
                                        (b"log", "crash")])
def test_the_engine_tells_crashes_hangs_and_logged_failures_from_refusals(tmp_path, data,
                                                                           kind):
    assert check(Toy(str(tmp_path)), data).kind == kind


def test_a_run_counts_and_saves_each_crash(tmp_path):
    class Crashy(Toy):
        def seeds(self):
            return [Seed((Frame(b"crash"),)), Seed((Frame(b"ok"),))]

    report = fuzz(Crashy(str(tmp_path)), 200, seed=1, crash_dir=str(tmp_path / "crashes"))
    assert report.inputs == 200 and report.accepted > 0
    assert report.crashes and all(os.path.exists(p) for p in report.crashes)
    with open(report.crashes[0], "rb") as f:
        assert check(Toy(str(tmp_path)), f.read()).kind == "crash"
    again = fuzz(Crashy(str(tmp_path)), 200, seed=1, crash_dir=str(tmp_path / "again"))
    assert (again.accepted, again.errors, again.crash_signatures) == \
        (report.accepted, report.errors, report.crash_signatures)      # reproducible


def test_a_timer_set_outside_the_engine_keeps_running(tmp_path):
    """pytest-timeout arms SIGALRM too: the engine's own time limit must not cancel it."""
    import signal

    signal.setitimer(signal.ITIMER_REAL, 50)
    try:
        check(Toy(str(tmp_path)), b"ok")
        left, _ = signal.getitimer(signal.ITIMER_REAL)
        assert 45 < left <= 50
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)


def test_a_zstd_bomb_is_refused_by_its_size_before_it_is_inflated(workdir):
    """The codec driver's bombs, each announced as 4096 bytes: 64 MiB of zeros in a frame
    that does not state its size, and a frame that states 4 MiB, are refused; a good frame
    followed by the bomb decodes to the good frame alone (what follows it is not read).
    Never more than about the announced size is allocated."""
    import tracemalloc

    from bmig.errors import ProtocolError
    from bmig.wire import codec
    from bmig.wire.protocol import unpack_data

    driver = driver_for("wire-codec", workdir)
    bombs = [s for s in driver.seed_list() if s.name.startswith(("bomb", "two-frames"))]
    assert len(bombs) == 3
    for bomb in bombs:
        head, payload = unpack_data(memoryview(bomb.data))
        assert head.raw_length == 4096
        tracemalloc.start()
        try:
            if bomb.name == "two-frames":
                assert len(codec.decode(head.codec, payload, head.raw_length)) == 4096
            else:
                with pytest.raises(ProtocolError):
                    codec.decode(head.codec, payload, head.raw_length)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert peak < 256 * 1024, f"{bomb.name}: {peak} bytes allocated"
