"""What one MARK may cost breqd in memory (invariant 8), measured on the real daemon.

A MARK frame carries up to 65536 ranges, and each may span the whole device. Applied one
range at a time, with a bit array per range, a 2 KiB frame of overlapping whole-device
ranges (hold and sync, as bmig-nbd sends while replicating) cost a 1 TiB device's breqd
hundreds of MiB. breqd merges the ranges first and works on bounded pieces: its peak RSS
(VmHWM, reset just before the frame) must grow by less than a few MiB. The device has
4 KiB chunks, so that one bit array over all of it (32 MiB) is itself more than that:
a step over a whole range at once, not in pieces, shows.
"""

from __future__ import annotations

import os

from bmig.tracker.blocking_client import TrackerClient

TiB = 1 << 40
MiB = 1 << 20
RANGES = 128                  # 16 bytes each: a 2 KiB frame
CHUNK = 4096                  # 1 TiB is 2**28 chunks: 32 MiB per bit array
ALLOWED_GROWTH = 16 * MiB     # half of one bit array over the whole device


def peak_rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM in /proc/PID/status")


def reset_peak_rss(pid: int) -> None:
    """Writing 5 to clear_refs resets VmHWM to the current RSS (Linux 4.0 and later)."""
    with open(f"/proc/{pid}/clear_refs", "w") as f:
        f.write("5")


def test_a_frame_of_whole_device_ranges_costs_breqd_a_bounded_amount_of_memory(breqd):
    pid = breqd.daemon.proc.pid
    with TrackerClient(breqd.control, timeout=120) as client:
        client.add_device("big", TiB, chunk_size=CHUNK)   # a large device: a size only
        client.clear_all("big", force=True)            # so the marks have bits to set
        client.mark("big", [(0, 4096)])                # warm up the code paths
        reset_peak_rss(pid)
        before = peak_rss(pid)
        client.mark("big", [(0, TiB)] * RANGES, hold=True, sync=True)
        grown = peak_rss(pid) - before
        stats = client.stats("big")
    assert stats["held_bytes"] == TiB and stats["dirty_bytes"] == TiB
    print(f"peak RSS grew by {grown / MiB:.1f} MiB")
    assert grown < ALLOWED_GROWTH, f"one MARK raised breqd's peak RSS by {grown // MiB} MiB"
    assert os.path.exists(f"/proc/{pid}")
