"""bmigrate's usage, one way to say each thing, with the real daemons where one is asked:

- ``events``: breqd failing at the start is an ``error`` event like later ones; the
  looking goes on and the ``exists`` events come once breqd answers; with --now, the
  event, one line on stderr and the exit status.
"""

from __future__ import annotations

import json

from bmig.errors import UnreachableError
from tests.integration.sync_helpers import MiB, bmigrate
from tests.integration.test_run_status import Lines


def test_events_now_without_breqd_is_an_error_event(breqd, tmp_path):
    done = bmigrate(str(tmp_path / "nothing.sock"), "events", "--now", "--status-dir",
                    str(tmp_path), "--manage-dir", str(tmp_path), check=False)
    assert done.returncode == UnreachableError.exit_code, done.stderr
    event, = [json.loads(line) for line in done.stdout.splitlines()]
    assert event["event"] == "error" and "cannot reach breqd" in event["message"]
    assert event["exit_code"] == UnreachableError.exit_code
    line, = done.stderr.splitlines()
    assert line == f"bmigrate: {event['message']}"


def test_events_started_before_breqd_wait_for_it(breqd, tmp_path):
    breqd.client().add_device("vm1", 4 * MiB)
    breqd.stop()
    events = Lines(breqd, "events", "--interval", "0.1", "--status-dir", str(tmp_path),
                   "--manage-dir", str(tmp_path))
    try:
        error = events.wait(lambda e: e["event"] == "error", "breqd not there")
        assert "breqd" in error["message"]
        breqd.restart()
        first = events.wait(lambda e: e["event"] == "exists", "the first state")
        assert first["device"] == "vm1"
        assert [e["event"] for e in events.values].count("error") == 1
        assert events.interrupt() == 0
    finally:
        events.close()
