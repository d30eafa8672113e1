"""breceive logs failed handshakes a few per window and sums up the rest, so a flood of
strangers cannot flood the log."""

from __future__ import annotations

import logging

import pytest

from bmig.receiver.service import RefusalLog


def test_failed_handshakes_are_logged_a_few_per_window_and_summed_up(caplog):
    now = [1000.0]
    refusals = RefusalLog(burst=3, window=60.0, clock=lambda: now[0])
    with caplog.at_level(logging.WARNING, logger="breceive"):
        for i in range(50):
            refusals.note(f"10.0.0.{i}:1", "authentication failed")
        assert len(caplog.records) == 3
        assert refusals.flush() == pytest.approx(60.0)
        now[0] += 61
        assert refusals.flush() is None
    assert len(caplog.records) == 4
    assert "47 more failed handshakes" in caplog.records[-1].getMessage()
    assert "10.0.0.49:1" in caplog.records[-1].getMessage()
