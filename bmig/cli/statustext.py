"""Devices' statuses and their events in words: ``bmigrate status``, the STATUS= line
and the log lines of ``bmigrate run``.

Generic over bmig.devicestate's model: a part's line is its lead (its ``message``, or
its state words) and then its fields that are set, each shown by its kind (``Field.text``
says the words around the value). Nothing here knows a field by name, so a field or a
state added to a part shows without a change here.
"""

from __future__ import annotations

import json
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


def value_text(kind: Kind, value: Any, now: float) -> str:
    if kind in (Kind.BYTES, Kind.BYTES_TOTAL) and isinstance(value, (int, float)):
        return human_bytes(int(value))
    if kind is Kind.RATE and isinstance(value, (int, float)):
        return f"{human_bytes(int(value))}/s"
    if kind is Kind.SECONDS and isinstance(value, (int, float)):
        return duration(float(value))
    if kind is Kind.TIME and isinstance(value, (int, float)):
        return age(float(value), now)
    if isinstance(value, (list, dict)):
        return json.dumps(value, sort_keys=True)
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
    that are set."""
    now = time.time() if now is None else now
    lead = fields.get("message") or ", ".join(states(part, fields))
    shown = [t for t in (field_text(part, key, fields[key], now)
                         for key in ordered_keys(part, fields) if key != "message")
             if t]
    if lead and shown:
        return f"{lead}; {', '.join(shown)}"
    return lead or ", ".join(shown)


def title(part: str) -> str:
    """``bmig-nbd``; an inner part (``nbd.ha``) after its parent's: ``bmig-nbd ha``."""
    parent, dot, key = part.rpartition(".")
    if dot and part not in TITLES:
        return f"{title(parent)} {key.replace('_', ' ')}"
    return TITLES.get(part, part)


def device_text(status: Mapping[str, Any], now: float | None = None) -> str:
    """Every part of a device's status: the tracker's line after the device's name,
    then one line per part."""
    now = float(status.get("time") or time.time()) if now is None else now
    lines = []
    for name, fields in parts(status):
        if name == TRACKER:
            lines.append(f"{status['device']}: {part_line(name, fields or {}, now)}")
        elif fields is not None:
            lines.append(f"  {title(name)}: {part_line(name, fields, now)}")
        elif name in EMPTY:
            lines.append(f"  {title(name)}: {EMPTY[name]}")
    return "\n".join(lines)


def status_line(device: str, part: str, fields: Mapping[str, Any],
                now: float | None = None) -> str:
    """One line for STATUS= and the log: ``vm1: caught up; lag 0 B, last pass 2 s ago``."""
    prefix = f"{device}: " if part in (TRACKER, "service") else f"{device}: {title(part)}: "
    return prefix + part_line(part, fields, now)


def event_line(event: Mapping[str, Any]) -> str:
    """A log line for an event of bmig.devicestate's shape."""
    device, part = str(event.get("device")), str(event.get("part"))
    status = event.get("status")
    now = float(event.get("time") or time.time())
    if event.get("event") == "destroy" or status is None:
        return f"{device}: {title(part)}: gone"
    line = status_line(device, part, status, now)
    if event.get("event") == "status" and event.get("period_seconds"):
        line += (f"; {event.get('passes', 0)} pass(es), "
                 f"{human_bytes(int(event.get('committed_bytes') or 0))} shipped in the "
                 f"last {duration(float(event['period_seconds']))}")
    return line

