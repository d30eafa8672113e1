"""The catch-up service's state machine (bmig.sender.runstate) on a clock of the test's:
which state each turn of run_forever leads to, at which log level it is said, what is
published and when, the periodic summary."""

from __future__ import annotations

import pytest

from bmig.sender import runstate
from bmig.sender.runstate import ServiceState

MiB = 1 << 20
RATE = 10 * MiB


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def svc():
    clock = Clock()
    events: list[tuple[dict, str]] = []
    published: list[dict] = []
    state = ServiceState("vm1", "tcp://backup:10810/vm1",
                         on_event=lambda e, s: events.append((e, s)),
                         on_publish=published.append, clock=clock)
    state.clock, state.events, state.published = clock, events, published
    return state


def said(svc) -> list[tuple[str, str]]:
    """(state, log level) of each change event so far."""
    return [(e["status"]["state"], level) for e, level in svc.events if e["event"] == "change"]


def test_connect_catch_up_and_bursts(svc):
    svc.start()
    assert svc.published[-1]["state"] == "starting"
    svc.connected("new")
    svc.looked(64 * MiB, 0.0)
    svc.pass_done(64 * MiB, 64 * MiB, 0, 0, 0, RATE)
    svc.idle(0, RATE)
    assert said(svc) == [("catching up", "notice"), ("caught up", "notice")]
    change = svc.events[-1][0]
    assert change["changed"]["state"] == ["catching up", "caught up"]
    assert change["device"] == "vm1" and change["part"] == "service"
    assert change["severity"] == "notice"
    # A burst of more than CATCH_UP_SECONDS of shipping: routine, at info both ways.
    svc.looked(int(RATE * (runstate.CATCH_UP_SECONDS + 1)), RATE)
    svc.pass_done(10 * MiB, 10 * MiB, 0, 0, 0, RATE)
    svc.idle(0, RATE)
    assert said(svc)[2:] == [("catching up", "info"), ("caught up", "info")]
    # Small writes while caught up change nothing.
    before = len(svc.events)
    svc.looked(MiB, RATE)
    svc.pass_done(MiB, MiB, 0, 0, 0, RATE)
    svc.idle(0, RATE)
    assert len(svc.events) == before
    assert svc.part()["passes_total"] == 3
    assert svc.part()["committed_bytes_total"] == 75 * MiB


def test_every_failure_is_a_warning_with_the_lag_and_reconnecting_is_a_notice(svc):
    svc.connected("same")
    svc.idle(0, RATE)
    svc.failed("receiver", "cannot connect to backup:10810: Connection refused", 1,
               2 * MiB, RATE)
    svc.failed("receiver", "cannot connect to backup:10810: Connection refused", 2,
               3 * MiB, RATE)
    svc.failed(None, "the target is full", 5, 3 * MiB, RATE)
    assert said(svc)[2:] == [("retrying", "warning")] * 3
    first, second, third = (e for e, _ in svc.events[2:])
    assert first["status"]["message"] == "receiver unreachable, retry in 1 s"
    assert first["status"]["lag_bytes"] == 2 * MiB
    assert first["status"]["lag_seconds"] == pytest.approx(0.2)
    assert second["status"]["message"] == "receiver unreachable, retry in 2 s"
    assert third["status"]["message"] == "failed, retry in 5 s"
    assert third["status"]["error"] == "the target is full"
    assert svc.part()["errors_total"] == 3
    # The same failure again, same delay: still an event (each retry is logged).
    svc.failed(None, "the target is full", 5, 3 * MiB, RATE)
    assert said(svc)[-1] == ("retrying", "warning")
    assert svc.events[-1][0]["changed"] == {"errors_total": [3, 4]}
    # Waiting: the lag is read again and published, no event.
    events = len(svc.events)
    svc.clock.now += 2
    svc.lag_seen(5 * MiB, RATE)
    assert len(svc.events) == events and svc.published[-1]["lag_bytes"] == 5 * MiB
    svc.connected("same")
    svc.idle(0, RATE)
    assert said(svc)[-2:] == [("catching up", "notice"), ("caught up", "notice")]
    assert svc.part()["error"] is None and svc.part()["retry_in_seconds"] is None


def test_a_backlog_that_does_not_shrink_is_not_converging(svc):
    svc.connected("same")
    threshold = MiB
    for lag in (100 * MiB, 95 * MiB, 97 * MiB):
        svc.pass_done(MiB, MiB, lag, 0, threshold, RATE)
    assert said(svc) == [("catching up", "notice")]
    svc.pass_done(MiB, MiB, 96 * MiB, 0, threshold, RATE)
    assert said(svc)[-1] == ("not converging", "warning")
    assert "writes outpace shipping" in svc.part()["message"]
    svc.idle(0, RATE)
    assert said(svc)[-1] == ("caught up", "notice")


def test_held_chunks_or_a_lag_under_the_threshold_are_not_a_failure_to_converge(svc):
    svc.connected("same")
    for _ in range(10):
        svc.pass_done(MiB, MiB, 8 * MiB, 8 * MiB, 0, RATE)       # all held by a writer
        svc.pass_done(MiB, MiB, MiB // 2, 0, MiB, RATE)          # under the threshold
    assert said(svc) == [("catching up", "notice")]


def test_the_periodic_summary_and_the_rate_of_publishing(svc):
    svc.connected("same")
    svc.idle(0, RATE)
    published = len(svc.published)
    for _ in range(5):
        svc.progress(MiB)                      # within a second: nothing published
    assert len(svc.published) == published
    svc.clock.now += runstate.PUBLISH_EVERY
    svc.progress(MiB)
    assert len(svc.published) == published + 1
    svc.pass_done(3 * MiB, MiB, 0, 0, 0, RATE)
    svc.clock.now += runstate.SUMMARY_EVERY
    svc.looked(0, RATE)
    summary, level = svc.events[-1]
    assert summary["event"] == "status" and level == "info"
    assert summary["passes"] == 1 and summary["committed_bytes"] == 3 * MiB
    assert summary["period_seconds"] == runstate.SUMMARY_EVERY
    assert summary["status"]["state"] == "caught up"
    svc.clock.now += runstate.SUMMARY_EVERY
    svc.looked(0, RATE)
    assert svc.events[-1][0]["passes"] == 0


def test_progress_brings_the_lag_down_during_a_pass(svc):
    svc.connected("new")
    svc.looked(100 * MiB, 0.0)
    svc.clock.now += 5
    svc.progress(40 * MiB)
    assert svc.published[-1]["lag_bytes"] == 60 * MiB


def test_stopping_cleanly_and_failing(svc):
    svc.connected("same")
    svc.stopped(0)
    assert said(svc)[-1] == ("stopped", "notice")
    assert svc.published[-1]["state"] == "stopped" and svc.published[-1]["lag_bytes"] == 0
    svc.stopped(None, "no tracked device named 'vm1'")
    assert said(svc)[-1] == ("failed", "debug")           # the command says it at <3>
    assert svc.published[-1]["error"] == "no tracked device named 'vm1'"
    assert svc.events[-1][0]["severity"] == "error"
