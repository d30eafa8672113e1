"""What a pass tells the compression pacer (bmig/sender/passes.py).

A real pass against breqd and a real source file, a target that records what it is sent
and answers every FLUSH at once, and a pacer that records what it hears: for each data
frame, the raw length, the bytes that went on the wire and whether zstd was tried (the
encoder's thread), and what the sender took to send it (the sender's thread); one
``begin_pass`` before each pass.
"""

from __future__ import annotations

import os
import threading

from bmig.sender.lockedtracker import LockedTracker
from bmig.sender.pacing import CompressionPacer, RateLimit
from bmig.sender.passes import Pass, PassSettings
from bmig.sender.source import Source
from bmig.tracker.blocking_client import TrackerClient
from bmig.wire.client import SourceInfo
from tests.integration.sync_helpers import HeldTarget

MiB = 1 << 20
SIZE = 4 * MiB
TEXT = b"the quick brown fox jumps over the lazy dog, and again; " * 20000


class AnsweringTarget(HeldTarget):
    """Compresses, answers every FLUSH at once and keeps each frame's wire size."""

    compresses = True

    def __init__(self) -> None:
        super().__init__()
        self.sent: dict[int, int] = {}          # offset: bytes on the wire

    def send_data(self, seq, offset, codec_id, payload, raw_length, digest) -> None:
        super().send_data(seq, offset, codec_id, payload, raw_length, digest)
        self.sent[offset] = len(payload)

    def request_durable(self, seq: int) -> None:
        super().request_durable(seq)
        self.acks.durable(seq)


class RecordingPacer(CompressionPacer):
    def __init__(self) -> None:
        super().__init__()
        self.share = 0.5                        # every other frame compressed, the first
        self._credit = 0.5
        self.encodings: list[tuple[int, bool, int, str]] = []
        self.sends: list[tuple[int, str]] = []
        self.passes = 0

    def begin_pass(self) -> None:
        self.passes += 1
        super().begin_pass()

    def encoded(self, raw, seconds, zstd_seconds, wire, cpu_wait=0.0) -> None:
        self.encodings.append((raw, zstd_seconds is not None, wire,
                               threading.current_thread().name))

    def sent(self, wire, seconds, cpu_wait=0.0) -> None:
        self.sends.append((wire, threading.current_thread().name))


def test_each_data_frame_tells_the_pacer_its_sizes_from_the_thread_that_did_the_work(
        breqd, tmp_path):
    path = tmp_path / "src.img"
    path.write_bytes((TEXT * 4)[:SIZE - MiB] + os.urandom(MiB))   # text, then random
    client = breqd.client()
    client.add_device("d", SIZE)                # new: every chunk dirty
    stats = client.stats("d")
    client.close()
    info = SourceInfo("d", int(stats["device_id"], 16), int(stats["generation"], 16),
                      SIZE, 64 * 1024)
    target, pacer = AnsweringTarget(), RecordingPacer()
    tracker = LockedTracker(TrackerClient(breqd.control))
    try:
        for number in (1, 2):
            if number == 2:
                tracker.client.mark("d", [(0, SIZE)])
            result = Pass(number, tracker, Source(str(path), SIZE), target, info,
                          PassSettings(frame_size=MiB), RateLimit(), pacer=pacer).run(SIZE)
            assert result.error is None and result.bytes_committed == SIZE
    finally:
        tracker.client.close()
    assert pacer.passes == 2
    assert len(pacer.encodings) == len(pacer.sends) == 8       # 4 frames a pass
    assert {raw for raw, _, _, _ in pacer.encodings} == {MiB}
    assert {who for _, _, _, who in pacer.encodings} == {"encoder"}
    assert {who for _, who in pacer.sends} == {"sender"}
    # what went on the wire, frame by frame in the order sent
    assert [wire for _, _, wire, _ in pacer.encodings] == [wire for wire, _ in pacer.sends]
    tried = [t for _, t, _, _ in pacer.encodings]
    assert tried == [True, False, True, False] * 2
    wires = [wire for _, _, wire, _ in pacer.encodings]
    assert wires[0] < MiB // 4 and wires[1] == MiB                 # text zstd, text raw
    assert wires[3] == MiB                                         # random, not tried
