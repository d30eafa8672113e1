"""RecordLock (bmig/receiver/target.py): the lock that orders changes of a target's
lineage against the writes checked against it (invariant 7).

Sessions that write data hold it shared for a batch of writes; one that changes the
record (a promotion, a pass of another lineage, a rejoin) takes it exclusively. flock
alone gives a waiting exclusive taker no priority, so two sessions streaming batches
could keep it out for good: it must go before shared takers that come after it, and
wait only for the batches under way.
"""

from __future__ import annotations

import os
import threading
import time

import pytest

from bmig.receiver.target import RecordLock, is_locked

WAIT = 10.0       # seconds before a thing that should happen soon fails the test
STILL = 0.3       # how long a taker that must be waiting is watched


def test_an_exclusive_taker_goes_before_shared_ones_that_come_after_it(tmp_path):
    state = str(tmp_path)
    under_way = RecordLock(state, "t")
    under_way.acquire(exclusive=False)              # a batch being written
    events: list[str] = []
    exclusive_in, shared_in, done = threading.Event(), threading.Event(), threading.Event()
    changer, late = RecordLock(state, "t"), RecordLock(state, "t")

    def change() -> None:
        changer.acquire(exclusive=True)
        events.append("exclusive")
        exclusive_in.set()
        done.wait(WAIT)
        changer.release()

    def write() -> None:
        late.acquire(exclusive=False)
        events.append("shared")
        shared_in.set()
        late.release()

    threads = [threading.Thread(target=change, daemon=True)]
    threads[0].start()
    intent = os.path.join(state, "t.record-intent.lock")
    deadline = time.monotonic() + WAIT
    while not is_locked(intent):                    # the change is waiting now
        assert time.monotonic() < deadline, "the change never came to wait"
        time.sleep(0.001)
    assert not exclusive_in.is_set()                # for the batch under way
    threads.append(threading.Thread(target=write, daemon=True))
    threads[1].start()
    try:
        assert not shared_in.wait(STILL), "a new batch got in before the waiting change"
        under_way.release()
        assert exclusive_in.wait(WAIT)
        assert not shared_in.is_set()
        done.set()
        assert shared_in.wait(WAIT)
        assert events == ["exclusive", "shared"]
    finally:
        done.set()
        if under_way._held:
            under_way.release()
        for t in threads:
            t.join(WAIT)
        for lock in (under_way, changer, late):
            lock.close()


def test_a_session_cannot_take_the_record_lock_it_holds_again(tmp_path):
    """Taking it again on the same file would turn a batch's shared hold exclusive, and
    its release would drop the batch's hold with it: refused."""
    lock = RecordLock(str(tmp_path), "t")
    try:
        lock.acquire(exclusive=False)
        with pytest.raises(RuntimeError, match="held already"):
            lock.acquire(exclusive=True)
        lock.release()
        with lock.held(exclusive=True):
            pass
    finally:
        lock.close()
