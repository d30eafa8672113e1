"""Devices' statuses (bmig.devicestate) in the Prometheus text exposition format, for
node_exporter's textfile collector (``bmigrate metrics --output FILE``).

Every field that is a number, a flag or a state becomes a sample labelled with the
device, named from its part and key by Prometheus' conventions:

    tracker   dirty_bytes            bmig_dirty_bytes{device="vm1"}
    service   lag_seconds            bmig_service_lag_seconds{device="vm1"}
    service   last_pass_time         bmig_service_last_pass_timestamp_seconds{...}
    service   errors_total           bmig_service_errors_total{...}          (counter)
    nbd       bytes_written          bmig_nbd_bytes_written_total{...}       (counter)
    nbd       read_only (a flag)     bmig_nbd_read_only{...} 0 or 1
    service   state (a state)        bmig_service_state{device="vm1",state="caught up"} 1,
                                     and 0 for each other word the field declares

``bmig_part_up{device,part}`` is 1 for each part that has something to say, 0 for one
that has not (no bmig-nbd serves the device, no ``bmigrate run`` published its state),
and
``bmig_breqd_up`` 0 when breqd did not answer (then no device is listed). Nothing here
knows a field by name: a field added to a part (bmig.devicestate) is a metric at once.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

from bmig.devicestate import TRACKER, Field, Kind, field_of, ordered_keys, parts

PREFIX = "bmig"
_INVALID = re.compile(r"[^a-zA-Z0-9_]")


@dataclass
class _Family:
    type: str
    help: str
    samples: list[str] = field(default_factory=list)


def metric_name(part: str, f: Field) -> str:
    """The name of a field's metric, with the unit and suffix its kind asks for."""
    base = _INVALID.sub("_", f.key)
    kind = f.kind
    if kind is Kind.TIME:
        base = base[:-len("_time")] if base.endswith("_time") else base
        base += "_timestamp_seconds"
    elif kind is Kind.SECONDS and not base.endswith("_seconds"):
        base += "_seconds"
    elif kind is Kind.BYTES and not base.endswith("_bytes"):
        base += "_bytes"
    elif kind is Kind.RATE and not base.endswith("_bytes_per_second"):
        base += "_bytes_per_second"
    if kind.counter and not base.endswith("_total"):
        base += "_total"
    middle = "" if part == TRACKER else _INVALID.sub("_", part) + "_"
    return f"{PREFIX}_{middle}{base}"


def _label(value: Any) -> str:
    text = str(value)
    return text.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(pairs: Mapping[str, Any]) -> str:
    if not pairs:
        return ""
    return "{" + ",".join(f'{k}="{_label(v)}"' for k, v in pairs.items()) + "}"


def _number(value: Any) -> str | None:
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "NaN"
        if math.isinf(value):
            return "+Inf" if value > 0 else "-Inf"
        return repr(value)
    return None


class Exposition:
    """Metric families, each with its samples together, in the order first seen."""

    def __init__(self) -> None:
        self._families: dict[str, _Family] = {}

    def add(self, name: str, type_: str, help_: str, labels: Mapping[str, Any],
            value: str) -> None:
        family = self._families.setdefault(name, _Family(type_, help_))
        family.samples.append(f"{name}{_labels(labels)} {value}")

    def text(self) -> str:
        out: list[str] = []
        for name, family in self._families.items():
            help_ = family.help.replace("\\", "\\\\").replace("\n", "\\n")
            out.append(f"# HELP {name} {help_}")
            out.append(f"# TYPE {name} {family.type}")
            out.extend(family.samples)
        return "\n".join(out) + "\n"


def _part(out: Exposition, device: str, part: str, fields: Mapping[str, Any]) -> None:
    for key in ordered_keys(part, fields):
        value = fields[key]
        f = field_of(part, key, value)
        if not f.metric or value is None:
            continue
        labels = {"device": device}
        if f.kind is Kind.STATE:
            name = metric_name(part, f)
            words = [w for w, _ in f.states]
            if str(value) not in words:
                words.append(str(value))
            for word in words:
                out.add(name, "gauge", f.help, {**labels, _INVALID.sub("_", key): word},
                        "1" if word == str(value) else "0")
        elif f.kind.numeric:
            number = _number(value)
            if number is not None:
                out.add(metric_name(part, f), "counter" if f.kind.counter else "gauge",
                        f.help, labels, number)


def prometheus(statuses: Iterable[Mapping[str, Any]], breqd_up: bool = True) -> str:
    """The exposition of ``statuses`` (bmigrate status objects, one per device)."""
    out = Exposition()
    out.add(f"{PREFIX}_breqd_up", "gauge", "1 when breqd answered", {}, "1" if breqd_up
            else "0")
    for status in statuses:
        device = str(status["device"])
        seen = dict(parts(status))
        for name, fields in seen.items():
            if name != TRACKER:
                out.add(f"{PREFIX}_part_up", "gauge",
                        "1 when the part has something to say about the device",
                        {"device": device, "part": name}, "0" if fields is None else "1")
        for name, fields in seen.items():
            if fields is not None:
                _part(out, device, name, fields)
    return out.text()
