"""Status words from peers and files (bmig.cli.statustext): whatever a receiver's record,
bmig-nbd or a status file says, the text is printable (no escape sequence or forged line
reaches the terminal raw) and wording it never raises (numbers that are not finite,
values of the wrong type)."""

from __future__ import annotations

import math

import pytest

from bmig.cli.statustext import device_text, event_line, part_line, printable, status_line

HOSTILE = "\x1b]0;pwned\x07x\nvm9: caught up\u202e\x00"


def assert_printable(text: str) -> None:
    for line in text.split("\n"):
        assert line.isprintable(), repr(line)


def test_control_and_format_characters_are_shown_escaped():
    assert printable("vm1: caught up") == "vm1: caught up"
    shown = printable(HOSTILE)
    assert shown.isprintable() and "\\x1b]0;pwned\\x07x\\nvm9" in shown
    assert "\\u202e" in shown and "\\x00" in shown


def test_a_receivers_record_is_printed_without_its_control_characters():
    status = {"device": "vm1", "role": "primary", "dirty_bytes": 0,
              "target": {"export": HOSTILE, "state": HOSTILE, "message": HOSTILE,
                         HOSTILE: HOSTILE, "nested": {"x": HOSTILE}}}
    text = device_text(status, now=1000.0)
    assert_printable(text)
    assert "\x1b" not in text and "\x07" not in text
    assert len(text.split("\n")) == 3      # tracker, target, target nested: no forged line


@pytest.mark.parametrize("value", [math.inf, -math.inf, math.nan, 10 ** 400, "5", True,
                                   [1], {"a": 1}, None])
@pytest.mark.parametrize("key", ["size_x_bytes", "rate_bytes_per_second", "lag_seconds",
                                 "since_time", "lag_bytes", "since", "retry_in"])
def test_any_value_of_any_field_is_worded_without_raising(key, value):
    for part in ("target", "service", "nbd", "nbd.ha", "tracker"):
        assert_printable(part_line(part, {"state": "x", key: value}, now=1000.0))
    assert_printable(device_text({"device": "vm1", "time": value, key: value,
                                  "target": {key: value}}))


def test_an_event_with_bad_numbers_or_shapes_is_still_a_line():
    assert_printable(event_line({"device": HOSTILE, "part": "service", "event": "status",
                                 "time": math.nan, "period_seconds": math.inf,
                                 "passes": "many", "committed_bytes": 1e300 * 1e300,
                                 "status": {"state": HOSTILE, "lag_bytes": math.inf}}))
    assert_printable(event_line({"device": "vm1", "part": "target", "event": "change",
                                 "time": "yesterday", "status": [HOSTILE]}))
    assert_printable(status_line(HOSTILE, "nbd", {"state": HOSTILE}))
