"""Devices' statuses and their events in words: ``bmigrate status``, the STATUS= line
and the log lines of ``bmigrate run``.

Generic over bmig.devicestate's model: a part's line is its lead (its ``message``, or
its state words) and then its fields that are set, each shown by its kind (``Field.text``
says the words around the value). Nothing here knows a field by name, so a field or a
state added to a part shows without a change here.

What is worded here comes from peers and files (a receiver's record, bmig-nbd, a status
file), so wording never fails on a value of the wrong type or a number that is not
finite, and every line is made printable: a control character (an escape sequence for
the terminal, a newline that would forge a line) or an invisible format character is
shown escaped (``\x1b``), never raw.
"""

from __future__ import annotations

import json
import math
import time
from typing import Any, Mapping

from bmig.cli.common import human_bytes
from bmig.devicestate import TRACKER, Kind, Show, field_of, is_set, ordered_keys, parts, states

TITLES = {"nbd": "bmig-nbd", "service": "bmigrate run", "target": "target"}
# What a part that is null (there, with nothing to say) reads as; not shown if absent.
EMPTY = {"target": "no record of this export"}
_UNITS = ("_bytes_per_second", "_bytes_total", "_bytes", "_seconds", "_time", "_total")


def duration(seconds: float) -> str:
    s = abs(seconds)
    if s < 10:
        return f"{s:.1f} s"
    if s < 120:
        return f"{s:.0f} s"
    if s < 7200:
        return f"{s / 60:.0f} min"
    if s < 172800:
        return f"{s / 3600:.1f} h"
    return f"{s / 86400:.1f} d"


def age(moment: float, now: float) -> str:
    gone = now - moment
    return "just now" if gone < 0.5 else f"{duration(gone)} ago"


def printable(text: str) -> str:
    """``text`` with every character that is not printable (str.isprintable: control and
    format characters, line and paragraph separators) escaped as Python would."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii")
                   for c in text)


def finite(value: Any) -> float | None:
    """``value`` as a finite number, or None (not a number, a bool, NaN, infinite)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    try:
        number = float(value)
    except OverflowError:            # an integer beyond every float
        return None
    return number if math.isfinite(number) else None


def value_text(kind: Kind, value: Any, now: float) -> str:
    number = finite(value)
    if kind in (Kind.BYTES, Kind.BYTES_TOTAL) and number is not None:
        return human_bytes(int(number))
    if kind is Kind.RATE and number is not None:
        return f"{human_bytes(int(number))}/s"
    if kind is Kind.SECONDS and number is not None:
        return duration(number)
    if kind is Kind.TIME and number is not None:
        return age(number, now)
    if isinstance(value, (list, dict)):
        return json.dumps(value, sort_keys=True, default=str)
    return str(value)


def words(key: str) -> str:
    """An undeclared field's words: ``catch_up_bytes`` -> "catch up"."""
    for unit in _UNITS:
        if key.endswith(unit) and key != unit.lstrip("_"):
            key = key[:-len(unit)]
            break
    return key.replace("_", " ")


def field_text(part: str, key: str, value: Any, now: float) -> str | None:
    """The words of one field, or None when it is not shown."""
    f = field_of(part, key, value)
    if f.kind is Kind.STATE or f.show is Show.NEVER or value is None:
        return None
    if f.show is Show.IF_SET and not is_set(f.kind, value):
        return None
    if f.kind is Kind.FLAG:
        return (f.text or words(key)) if value else None
    shown = value_text(f.kind, value, now)
    return f.text.format(shown) if f.text else f"{words(key)} {shown}"


def part_line(part: str, fields: Mapping[str, Any], now: float | None = None) -> str:
    """``lead; field, field, ...``: the message (or the state words), then the fields
    that are set; printable."""
    now = time.time() if now is None else now
    lead = str(fields.get("message") or ", ".join(str(s) for s in states(part, fields)))
    shown = [t for t in (field_text(part, str(key), fields[key], now)
                         for key in ordered_keys(part, fields) if key != "message")
             if t]
    if lead and shown:
        return printable(f"{lead}; {', '.join(shown)}")
    return printable(lead or ", ".join(shown))


def title(part: str) -> str:
    """``bmig-nbd``; an inner part (``nbd.ha``) after its parent's: ``bmig-nbd ha``."""
    parent, dot, key = part.rpartition(".")
    if dot and part not in TITLES:
        return f"{title(parent)} {key.replace('_', ' ')}"
    return printable(TITLES.get(part, part))


def device_text(status: Mapping[str, Any], now: float | None = None) -> str:
    """Every part of a device's status: the tracker's line after the device's name,
    then one line per part."""
    now = (finite(status.get("time")) or time.time()) if now is None else now
    lines = []
    for name, fields in parts(status):
        if name == TRACKER:
            lines.append(f"{printable(str(status['device']))}: "
                         f"{part_line(name, fields or {}, now)}")
        elif fields is not None:
            lines.append(f"  {title(name)}: {part_line(name, fields, now)}")
        elif name in EMPTY:
            lines.append(f"  {title(name)}: {EMPTY[name]}")
    return "\n".join(lines)


def status_line(device: str, part: str, fields: Mapping[str, Any],
                now: float | None = None) -> str:
    """One line for STATUS= and the log: ``vm1: caught up; lag 0 B, last pass 2 s ago``."""
    device = printable(device)
    prefix = f"{device}: " if part in (TRACKER, "service") else f"{device}: {title(part)}: "
    return prefix + part_line(part, fields, now)


def event_line(event: Mapping[str, Any]) -> str:
    """A log line for an event of bmig.devicestate's shape."""
    device, part = str(event.get("device")), str(event.get("part"))
    status = event.get("status")
    now = finite(event.get("time")) or time.time()
    if event.get("event") == "destroy" or status is None:
        return f"{printable(device)}: {title(part)}: gone"
    if not isinstance(status, Mapping):
        status = {"message": f"a status that is not an object: {status!r}"}
    line = status_line(device, part, status, now)
    period = finite(event.get("period_seconds"))
    if event.get("event") == "status" and period:
        passes = finite(event.get("passes")) or 0
        line += (f"; {passes:.0f} pass(es), "
                 f"{human_bytes(int(finite(event.get('committed_bytes')) or 0))} shipped "
                 f"in the last {duration(period)}")
    return line

