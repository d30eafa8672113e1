"""How fast a pass sends and how much of it is compressed.

The bandwidth limit: a new rate (SIGHUP, `systemctl reload`) applies at once. A frame
larger than a second's worth waits as long as it takes to send it at the rate: 4 MiB at
4 KiB/s is more than a quarter of an hour. A reload that lifts the limit must not leave
that frame waiting out the old rate.

The compression pacer: every frame compressed while the link is the slower side even so,
next to none while the encoder is the slower side without compressing, the share where
both take as long in between, and none while a CPU is short. CPU waits: Linux's
schedstat of a thread, as a share of the wall-clock time.
"""

from __future__ import annotations

import os
import threading

import pytest

from bmig.sender.pacing import (RATE_RECHECK, SCHEDSTAT, CompressionPacer, CpuWaits,
                                RateLimit)


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


# -- how much is compressed ------------------------------------------------------------
#
# Figures per raw byte as measured here: reading and hashing ~0.3 ns, zstd level 1 ~1.5 ns
# more, ext4 data to ~0.4 of its size; loopback sends ~1 ns per wire byte, a 100 MiB/s
# link ~10.

FRAME = 4 << 20
NS = 1e-9


def fed(send_ns: float, base_ns: float = 0.3, zstd_ns: float = 1.5, ratio: float = 0.4,
        frames: int = 40, encoder_waits: float = 0.0,
        sender_waits: float = 0.0) -> CompressionPacer:
    """A pacer told of ``frames`` frames each way, half of them compressed."""
    pacer = CompressionPacer()
    pacer.begin_pass()
    for i in range(frames):
        compressed = i % 2 == 0
        wire = int(FRAME * ratio) if compressed else FRAME
        pacer.sent(wire, send_ns * NS * wire, sender_waits)
        pacer.encoded(FRAME, (base_ns + (zstd_ns if compressed else 0)) * NS * FRAME,
                      zstd_ns * NS * FRAME if compressed else None, wire, encoder_waits)
    return pacer


def test_on_a_slow_link_every_frame_is_compressed():
    # compressing all: the encoder takes 1.8 ns a byte, the sender 4: still the slower
    assert fed(send_ns=10).share == 1.0


def test_where_the_encoder_is_slower_than_the_link_without_compressing_next_to_nothing_is():
    assert fed(send_ns=0.2).share == CompressionPacer.FLOOR


def test_in_between_the_share_makes_encoder_and_sender_take_as_long():
    pacer = fed(send_ns=1.0)
    p = pacer.share
    assert CompressionPacer.FLOOR < p < 1.0
    encoder = 0.3 + p * 1.5
    sender = 1.0 * (1 - p * (1 - 0.4))
    assert encoder == pytest.approx(sender, rel=1e-3)


@pytest.mark.parametrize("who", ["encoder", "sender"])
def test_while_a_cpu_is_short_nothing_is_compressed_even_on_a_slow_link(who):
    waits = {f"{who}_waits": CompressionPacer.CONTENDED + 0.05}
    assert fed(send_ns=10, **waits).share == 0.0
    assert fed(send_ns=10, **{f"{who}_waits": CompressionPacer.CONTENDED}).share == 1.0


def test_the_first_data_frame_is_compressed_to_measure_then_little_until_measured():
    pacer = CompressionPacer()
    assert pacer.compress()
    assert sum(pacer.compress() for _ in range(100)) <= 100 * CompressionPacer.FLOOR + 1


def test_a_share_is_spread_evenly_over_the_frames():
    pacer = fed(send_ns=1.0)
    pacer._credit = 0.0
    picks = [pacer.compress() for _ in range(1000)]
    assert sum(picks) == pytest.approx(1000 * pacer.share, abs=1)
    assert sum(picks[:100]) == pytest.approx(100 * pacer.share, abs=1)


def test_the_first_frame_of_a_pass_is_not_taken_as_the_links_pace():
    pacer = fed(send_ns=0.2)                  # a fast link
    pacer.begin_pass()
    pacer.sent(FRAME, 0.5, 0.0)               # the receiver starting: 120 ns a byte
    pacer.encoded(FRAME, 0.3 * NS * FRAME, 1.5 * NS * FRAME, FRAME // 2, 0.0)
    assert pacer.share == CompressionPacer.FLOOR
    assert pacer.send == pytest.approx(0.2 * NS)


@pytest.mark.parametrize("zstd_ns", [0.05, 0.0])
def test_incompressible_data_on_a_slow_link_is_still_tried_it_costs_the_sender_nothing(
        zstd_ns):
    # zstd's sample says no (ratio 1) at a small cost: trying every frame keeps the share
    # ready for data that compresses, and the sender is the slower side anyway
    assert fed(send_ns=10, zstd_ns=zstd_ns, ratio=1.0).share == 1.0


# -- CPU waits ---------------------------------------------------------------------------

class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def schedstat(path, waited_ns: int) -> None:
    path.write_text(f"123456789 {waited_ns} 42\n")


def fake_waits(tmp_path, interval: float = 0.05):
    """(the fake schedstat file, its clock, a CpuWaits reading them), at 0 ns waited."""
    stat, clock = tmp_path / "schedstat", Clock()
    schedstat(stat, 0)
    return stat, clock, CpuWaits(interval=interval, path=str(stat), clock=clock)


def test_cpu_waits_are_a_share_of_the_wall_clock_time(tmp_path):
    stat, clock, waits = fake_waits(tmp_path)
    clock.now += 0.1
    schedstat(stat, 25_000_000)               # 25 ms of 100 runnable and waiting
    assert waits.update() == pytest.approx(0.25)


def test_cpu_waits_are_read_again_only_after_the_interval(tmp_path):
    stat, clock, waits = fake_waits(tmp_path)
    clock.now += 0.01
    schedstat(stat, 10_000_000)
    assert waits.update() == 0.0              # too soon: the last share
    clock.now += 0.04
    assert waits.update() == pytest.approx(0.2)


def test_an_older_reading_weighs_half_as_much(tmp_path):
    stat, clock, waits = fake_waits(tmp_path)
    clock.now += 0.1
    schedstat(stat, 100_000_000)              # all of it waiting
    assert waits.update() == pytest.approx(1.0)
    clock.now += 0.1                          # then none of it
    assert waits.update() == pytest.approx(0.05 / 0.15)


def test_without_the_kernels_figures_cpu_waits_are_none(tmp_path):
    clock = Clock()
    waits = CpuWaits(path=str(tmp_path / "missing"), clock=clock)
    clock.now += 1
    assert waits.update() == 0.0
    garbled = tmp_path / "garbled"
    garbled.write_text("nothing here\n")
    assert CpuWaits(path=str(garbled), clock=clock).update() == 0.0


def test_a_failed_reading_is_skipped_not_kept(tmp_path):
    stat, clock, waits = fake_waits(tmp_path)
    clock.now += 0.1
    schedstat(stat, 50_000_000)
    assert waits.update() == pytest.approx(0.5)
    stat.unlink()                             # once: too many open files, say
    clock.now += 0.1
    assert waits.update() == pytest.approx(0.5)
    schedstat(stat, 50_000_000)               # then no more waiting
    for _ in range(6):
        clock.now += 0.1
        waits.update()
    assert waits.share < 0.02


def test_a_clock_that_has_not_moved_reads_nothing(tmp_path):
    stat, clock, waits = fake_waits(tmp_path, interval=0.0)
    schedstat(stat, 10_000_000)
    assert waits.update() == 0.0


def test_this_threads_cpu_waits_are_the_kernels_run_queue_figure():
    if not os.path.exists(SCHEDSTAT):
        pytest.skip(f"{SCHEDSTAT}: this kernel keeps no schedstat (CONFIG_SCHED_INFO)")
    with open(SCHEDSTAT) as f:
        before = int(f.read().split()[1])
    reading = CpuWaits()._read()
    with open(SCHEDSTAT) as f:
        after = int(f.read().split()[1])
    assert reading is not None and before <= reading <= after


def test_a_cpu_stays_short_until_the_waits_are_well_below_the_line():
    line = CompressionPacer.CONTENDED
    pacer = fed(send_ns=10)
    assert pacer.share == 1.0
    frame = (FRAME, 1.8 * NS * FRAME, 1.5 * NS * FRAME, int(FRAME * 0.4))
    pacer.encoded(*frame, line * 1.5)
    assert pacer.share == 0.0
    pacer.encoded(*frame, line * 0.7)         # below the line, not well below
    assert pacer.share == 0.0
    pacer.encoded(*frame, line * 0.4)
    assert pacer.share == 1.0


def test_a_new_pass_forgets_the_last_senders_waits():
    pacer = fed(send_ns=10)
    pacer.sent(FRAME, 10 * NS * FRAME, 0.9)   # the last frame of a pass on a busy CPU
    pacer.begin_pass()
    pacer.encoded(FRAME, 1.8 * NS * FRAME, 1.5 * NS * FRAME, int(FRAME * 0.4), 0.0)
    assert pacer.share == 1.0
