"""The bandwidth limit: a new rate (SIGHUP, `systemctl reload`) applies at once.

A frame larger than a second's worth waits as long as it takes to send it at the rate:
4 MiB at 4 KiB/s is more than a quarter of an hour. A reload that lifts the limit must
not leave that frame waiting out the old rate.
"""

from __future__ import annotations

import threading

from bmig.sender.pacing import RATE_RECHECK, RateLimit


def test_a_frame_waiting_at_a_low_rate_goes_once_the_limit_is_lifted():
    limit = RateLimit(4096)
    stop = threading.Event()
    done = threading.Event()
    worker = threading.Thread(target=lambda: (limit.consume(4 << 20, stop), done.set()),
                              daemon=True)
    worker.start()
    try:
        assert not done.wait(0.2)               # waiting: 1024 s at this rate
        limit.rate = None                       # what a reload to "no limit" does
        assert done.wait(RATE_RECHECK + 10), "the frame still waits at the old rate"
    finally:
        stop.set()
        worker.join(timeout=10)


def test_a_stop_ends_the_wait():
    limit = RateLimit(1)
    stop = threading.Event()
    worker = threading.Thread(target=limit.consume, args=(1 << 20, stop), daemon=True)
    worker.start()
    stop.set()
    worker.join(timeout=10)
    assert not worker.is_alive()
