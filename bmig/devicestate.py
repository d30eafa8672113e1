"""The state of a device as each part of bmig sees it, in one shape: the contract
between what gathers it (breqd, bmig-nbd, breceive's records, a running ``bmigrate
run``) and what shows it (``bmigrate status``, ``bmigrate events``, ``bmigrate metrics``,
the STATUS= line and the log of ``bmigrate run``). No I/O here, and no wording: the
words are bmig.cli's.

A device's status is one JSON object::

    {"device": "vm1", "side": "source", "time": 1718000000.1,     identity (IDENTITY)
     "role": "primary", "generation": "…", "dirty_bytes": 0, …,   part "tracker": breqd
     "nbd": {"state": "tracking", "bytes_written": 0, …},         bmig-nbd (or null)
     "service": {"state": "caught up", "lag_bytes": 0, …},        bmigrate run (or null)
     "target": {"state": "consistent", "role": "secondary", …}}   the target (with --to)

**Parts.** The top-level keys other than IDENTITY whose values are not objects are the
part ``tracker`` (breqd's view, flat for the scripts that read it so); every key whose
value is an object is a part of its own, named by the key (null: the part has nothing
to say, e.g. no bmig-nbd serves the device). A part is a flat object of fields; an
object among them is a part of its own, named ``part.key`` (``nbd.ha``). Its
fields of kind ``state`` say where it stands in its own vocabulary ("caught up",
"consistent", "degraded"); ``message``, when set, says it in a sentence.

**Fields are typed.** A field's kind (``Kind``) decides how every view shows it: text
(bytes as "1.5 MiB", seconds as "12 s", a time as an age), a Prometheus sample (numbers,
flags; a state as one sample per word), and whether a change of it is an event of its
own (``Kind.noted``) or a statistic, reported with ``--statistics`` only. The kind comes
from ``FIELDS``, the declared fields of each part; a field nobody declared gets one
from its name and value (``kind_of``: ``state``, ``*_state``: state; a bool: flag; a
number named ``*_bytes``: bytes, ``*_bytes_total``: a byte counter, ``*_seconds``:
seconds, ``*_time``: a Unix time, ``*_total``: a counter, else a number; a string:
text). So a new field shows everywhere without a line of rendering code; declaring it
adds its words (``Field.text``), when it shows (``Show``) and its metric's help.

**States have a severity**: a state field declares its words (``Field.states``), each
with the level at which entering it is logged and its events' ``severity`` (debug ...
error); a word nobody declared is "info". A part's severity is its most severe word.

**Events** are what changes between two statuses of a device (``diff``), one JSON
object per part and change: ``exists`` (the first look, or ``--now``), ``create`` (a
part, or the device, appeared), ``change`` (with ``changed``: key -> [before, after]),
``destroy`` (it went). ``bmigrate run`` emits the ``change`` events of its own part
itself (bmig.sender.runstate), in the same shape.

**Adding states** (the HA replication's connected / degraded / catching up /
synchronous, its lag, the target's consistency): put the values in the object the
producer already returns -- bmig-nbd's manage ``status`` (part ``nbd``; e.g.
``"replication": "degraded"``, ``"lag_bytes"``, ``"lag_seconds"``; an object there,
such as ``"ha": {"state": "degraded", "lag_bytes": ...}``, is the part ``nbd.ha``,
declared as ``FIELDS["nbd.ha"]``: an inner part is declared under its path, and needs
no place in ``PART_ORDER``), breceive's target
record (part ``target``; its ``state`` is the consistency), or a new object under a key
of its own that bmig.sender.status puts into the device's status -- then declare the
fields in ``FIELDS``, with the words of a state and their severities (data; a new part
also goes into ``PART_ORDER``), and document them in
bmigrate(1) JSON OUTPUT (tests/docs checks FIELDS against it). The text, the events,
the metrics and the STATUS= line follow without a change to their code.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass
from typing import Any, Iterator, Mapping

IDENTITY = ("device", "side", "time")
TRACKER = "tracker"            # the part made of the top-level scalar fields


class Kind(enum.Enum):
    STATE = "state"            # a word of the part's vocabulary
    TEXT = "text"              # free text: a URL, a reason, an error
    ID = "id"                  # a hexadecimal id (all zeros: none)
    FLAG = "flag"              # true or false
    BYTES = "bytes"            # a size, now
    BYTES_TOTAL = "bytes_total"  # bytes counted since a start (only grows)
    SECONDS = "seconds"        # a duration
    TIME = "time"              # a moment, Unix time (shown as an age)
    COUNT = "count"            # a count since a start (only grows)
    RATE = "rate"              # bytes per second
    NUMBER = "number"          # any other number

    @property
    def noted(self) -> bool:
        """A change of such a field is an event of its own; a statistic's is not."""
        return self in (Kind.STATE, Kind.TEXT, Kind.ID, Kind.FLAG)

    @property
    def numeric(self) -> bool:
        return self not in (Kind.STATE, Kind.TEXT, Kind.ID)

    @property
    def counter(self) -> bool:
        return self in (Kind.BYTES_TOTAL, Kind.COUNT)


class Show(enum.Enum):
    ALWAYS = "always"          # in the text even when zero or empty (not when null)
    IF_SET = "if set"          # only when true, non-zero, non-empty (an id: non-zero)
    NEVER = "never"            # JSON, events and metrics only


@dataclass(frozen=True)
class Field:
    key: str
    kind: Kind
    help: str                  # one line: the metric's HELP (the man page says more)
    text: str = ""             # how the text shows it: "{} dirty"; "" for the key's words
    show: Show = Show.IF_SET
    # A state's words, each with its severity (SEVERITIES): the level at which entering
    # it is logged, and its events' severity. A word not listed is "info".
    states: tuple[tuple[str, str], ...] = ()
    metric: bool = True        # a number or state that is also a Prometheus sample

    def severity(self, word: Any) -> str:
        return dict(self.states).get(str(word), "info")


def _f(key: str, kind: Kind, help: str, text: str = "", show: Show = Show.IF_SET,
       states: Mapping[str, str] | None = None, metric: bool = True) -> Field:
    return Field(key, kind, help, text, show, tuple((states or {}).items()), metric)


K = Kind
# The declared fields of each part, in the order the text shows them. Undeclared
# fields follow, by name.
FIELDS: dict[str, tuple[Field, ...]] = {
    TRACKER: (
        _f("role", K.STATE, "primary, or handed-over after a cutover",
           states={"primary": "info", "handed-over": "notice"}),
        _f("generation", K.ID, "the lineage of the device's data", "generation {}",
           Show.ALWAYS),
        _f("successor", K.ID, "the generation a cutover handed over to",
           "handed over to generation {}"),
        _f("device_id", K.ID, "the device id of the definition file", show=Show.NEVER),
        _f("size", K.BYTES, "the device size", show=Show.NEVER),
        _f("dirty_bytes", K.BYTES, "bytes in dirty chunks", "{} dirty", Show.ALWAYS),
        _f("inflight_bytes", K.BYTES, "bytes checked out by a sender, not yet committed",
           "{} in flight"),
        _f("held_bytes", K.BYTES, "bytes in chunks a writer holds", "{} being written"),
        _f("mirrored_bytes", K.BYTES, "bytes dirty only for synchronous writes under way",
           "{} being replicated"),
    ),
    "nbd": (
        _f("state", K.STATE, "what bmig-nbd does with the writes",
           states={"tracking": "info", "replicating": "info", "frozen": "notice",
                   "read-only": "notice", "writes blocked": "error",
                   "source failed": "error", "not answering": "error"}),
        _f("replication", K.STATE, "the replication's state",
           states={"connected": "info", "degraded": "warning"}),
        _f("device", K.TEXT, "the device", show=Show.NEVER),
        _f("export", K.TEXT, "the NBD export name", show=Show.NEVER),
        _f("replicating", K.FLAG, "writes are replicated", show=Show.NEVER),
        _f("protocol", K.TEXT, "the replication protocol (A, B or C)", "protocol {}"),
        _f("target", K.TEXT, "the replication's target", "to {}"),
        _f("policy", K.TEXT, "what a failed replication does", show=Show.NEVER),
        _f("failed", K.TEXT, "why replication failed", "replication failed: {}"),
        _f("blocked", K.FLAG, "writes fail until replication works again",
           show=Show.NEVER),
        _f("frozen", K.FLAG, "writes are held back (a cutover)", "frozen"),
        _f("read_only", K.FLAG, "writes are refused (handed over)", "read-only"),
        _f("source_failed", K.TEXT, "why the source failed", "the source failed: {}"),
        _f("bytes_written", K.BYTES_TOTAL, "bytes the application wrote through bmig-nbd",
           "{} written"),
        _f("error", K.TEXT, "why bmig-nbd did not answer", "{}"),
    ),
    # The HA replication (bmigrate replicate --keep), as it tells bmig-nbd (manage's
    # ha-state, bmig.sender.ha): every key of bmig.nbd.manage.HA_FIELDS.
    "nbd.ha": (
        _f("state", K.STATE, "the HA replication's state",
           states={"connecting": "notice", "catching up": "notice", "synchronous": "info",
                   "degraded": "warning"}),
        _f("lag_bytes", K.BYTES, "bytes written and not on the target yet", "lag {}",
           Show.ALWAYS),
        _f("lag_seconds", K.SECONDS, "lag_bytes at the rate measured", "{} to ship"),
        _f("since", K.TIME, "when the HA replication entered its state", "since {}"),
        _f("retry_in", K.SECONDS, "the wait before it connects again", "retry in {}"),
        _f("target", K.TEXT, "the target URL", "to {}"),
        _f("protocol", K.TEXT, "the replication protocol (A, B or C)", "protocol {}"),
        _f("error", K.TEXT, "why it is degraded", "{}"),
    ),
    "service": (
        _f("state", K.STATE, "the catch-up service's state",
           states={"starting": "info", "catching up": "notice", "caught up": "notice",
                   "not converging": "warning", "retrying": "warning",
                   "paused": "notice", "stopped": "notice", "failed": "error", "not running": "warning",
                   "unreadable": "warning"}),
        _f("message", K.TEXT, "the state in a sentence", show=Show.NEVER),
        _f("lag_bytes", K.BYTES, "dirty and in flight at the last look", "lag {}",
           Show.ALWAYS),
        _f("lag_seconds", K.SECONDS, "lag_bytes at the rate measured", "{} to ship"),
        _f("last_pass_time", K.TIME, "when the last pass ended", "last pass {}",
           Show.ALWAYS),
        _f("rate_bytes_per_second", K.RATE, "the shipping rate measured", "at {}"),
        _f("retry_in_seconds", K.SECONDS, "the wait before the next attempt",
           show=Show.NEVER),
        _f("target", K.TEXT, "the target URL", "to {}"),
        _f("error", K.TEXT, "the last failure", "{}"),
        _f("since_time", K.TIME, "when the state began", show=Show.NEVER),
        _f("started_time", K.TIME, "when the service started", show=Show.NEVER),
        _f("updated_time", K.TIME, "when the service last published its state",
           show=Show.NEVER),
        _f("pid", K.NUMBER, "the process id of bmigrate run", show=Show.NEVER,
           metric=False),
        _f("passes_total", K.COUNT, "passes made since the start", show=Show.NEVER),
        _f("committed_bytes_total", K.BYTES_TOTAL, "bytes shipped and committed",
           show=Show.NEVER),
        _f("sent_bytes_total", K.BYTES_TOTAL, "payload bytes sent on the wire",
           show=Show.NEVER),
        _f("errors_total", K.COUNT, "failed attempts since the start", show=Show.NEVER),
    ),
    "target": (
        _f("state", K.STATE, "the target's state: its consistency, or unreachable",
           states={"new": "info", "consistent": "info", "in-sync": "info",
                   "inconsistent": "warning", "unreachable": "warning",
                   "error": "warning"}),
        _f("role", K.STATE, "secondary, or primary after a cutover",
           states={"secondary": "info", "primary": "notice", "handed-over": "notice"}),
        _f("error", K.TEXT, "why the target could not be asked", "{}"),
        _f("export", K.TEXT, "the export name", "export {}"),
        _f("generation", K.ID, "the generation the target holds", "generation {}"),
        _f("source_device_id", K.ID, "the device id of its source", "of device {}"),
        _f("successor", K.ID, "the generation it handed over to", show=Show.NEVER),
        _f("size", K.BYTES, "the size recorded", show=Show.NEVER),
        _f("passes", K.COUNT, "passes completed", "{} passes"),
        _f("last_pass", K.TIME, "when a pass last completed", "last pass {}"),
        _f("promoted", K.TIME, "when it became primary", "promoted {}"),
        _f("previous", K.TEXT, "older generations", show=Show.NEVER),
        _f("identity", K.TEXT, "the file or device the record describes",
           show=Show.NEVER),
    ),
}
del K

SEVERITIES = ("debug", "info", "notice", "warning", "error")

# The parts in the order the text shows them; a key named here is a part even when null.
PART_ORDER = (TRACKER, "nbd", "service", "target")


# -- fields and kinds ---------------------------------------------------------------------

def declared(part: str, key: str) -> Field | None:
    for f in FIELDS.get(part, ()):
        if f.key == key:
            return f
    return None


def kind_of(part: str, key: str, value: Any = None) -> Kind:
    """The declared kind of ``key`` in ``part``, else one from its name and value."""
    f = declared(part, key)
    if f is not None:
        return f.kind
    if key == "state" or key.endswith("_state"):
        return Kind.STATE
    if isinstance(value, bool):
        return Kind.FLAG
    if isinstance(value, (int, float)):
        for suffix, kind in (("_bytes_total", Kind.BYTES_TOTAL), ("_bytes", Kind.BYTES),
                             ("_per_second", Kind.RATE), ("_seconds", Kind.SECONDS),
                             ("_time", Kind.TIME), ("_total", Kind.COUNT)):
            if key.endswith(suffix):
                return kind
        return Kind.NUMBER
    return Kind.TEXT


def field_of(part: str, key: str, value: Any = None) -> Field:
    """The declared field, or one made up for an undeclared key (shown when set)."""
    return declared(part, key) or Field(key, kind_of(part, key, value), key)


def is_set(kind: Kind, value: Any) -> bool:
    if value is None or value is False or value == "" or value == [] or value == {}:
        return False
    if kind is Kind.ID and isinstance(value, str) and not value.strip("0"):
        return False
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return value != 0 and not (isinstance(value, float) and math.isnan(value))
    return True


# -- parts of a device's status ---------------------------------------------------------------

def parts(status: Mapping[str, Any]) -> Iterator[tuple[str, dict[str, Any] | None]]:
    """(part name, its fields) of a device's status: the tracker first, then the parts
    in PART_ORDER, then any other object, by name. A part that is null is given as None;
    one that is absent is not given. An object inside a part is a part of its own,
    ``PART.KEY`` (e.g. ``nbd.ha``), right after it."""
    nested = [k for k, v in status.items()
              if k not in IDENTITY and (isinstance(v, dict) or k in PART_ORDER)]
    yield TRACKER, {k: v for k, v in status.items()
                    if k not in IDENTITY and k not in nested}
    order = {name: i for i, name in enumerate(PART_ORDER)}
    for key in sorted(nested, key=lambda k: (order.get(k, len(order)), k)):
        value = status[key]
        yield from _with_inner(key, dict(value) if isinstance(value, dict) else None)


def _with_inner(name: str, fields: dict[str, Any] | None,
                depth: int = 0) -> Iterator[tuple[str, dict[str, Any] | None]]:
    """A part, then each object among its fields as the part ``name.key`` (two levels
    at most; deeper objects stay fields, shown as JSON)."""
    if fields is None:
        yield name, None
        return
    inner = sorted(k for k, v in fields.items() if isinstance(v, dict)) if depth < 2 else []
    yield name, {k: v for k, v in fields.items() if k not in inner}
    for key in inner:
        yield from _with_inner(f"{name}.{key}", dict(fields[key]), depth + 1)


def states(part: str, fields: Mapping[str, Any]) -> list[str]:
    """The words of the part's state fields, in the order the fields are declared."""
    return [str(fields[key]) for key in ordered_keys(part, fields)
            if kind_of(part, key, fields[key]) is Kind.STATE and fields[key] is not None]


def ordered_keys(part: str, fields: Mapping[str, Any]) -> list[str]:
    """Declared fields first (in their order), then the others by name."""
    known = [f.key for f in FIELDS.get(part, ()) if f.key in fields]
    return known + sorted(k for k in fields if k not in known)


def severity(part: str, fields: Mapping[str, Any] | None) -> str:
    """The most severe of the part's state words (each state field's ``states``);
    "info" for a word nobody declared."""
    if not fields:
        return "info"
    found = [field_of(part, key, fields[key]).severity(fields[key])
             for key in ordered_keys(part, fields)
             if kind_of(part, key, fields[key]) is Kind.STATE and fields[key] is not None]
    return max(found, key=SEVERITIES.index, default="info")


# -- events ------------------------------------------------------------------------------------

def event(kind: str, device: str, part: str, fields: Mapping[str, Any] | None,
          time: float, **extra: Any) -> dict[str, Any]:
    """One event object: ``event``, ``time``, ``device``, ``part``, ``severity`` and the
    part's fields now under ``status`` (null for destroy)."""
    return {"event": kind, "time": round(time, 3), "device": device, "part": part,
            "severity": severity(part, fields) if kind != "destroy" else "notice",
            "status": dict(fields) if fields is not None else None, **extra}


def exists(status: Mapping[str, Any], time: float) -> list[dict[str, Any]]:
    """The ``exists`` events of one device: every part that is there."""
    device = str(status["device"])
    return [event("exists", device, name, fields, time)
            for name, fields in parts(status) if fields is not None]


def changes(part: str, before: Mapping[str, Any], after: Mapping[str, Any],
            statistics: bool = False) -> dict[str, list[Any]]:
    """key -> [before, after] for each field whose change is an event (every field's
    with ``statistics``)."""
    out: dict[str, list[Any]] = {}
    for key in ordered_keys(part, {**before, **after}):
        old, new = before.get(key), after.get(key)
        if old == new:
            continue
        if statistics or kind_of(part, key, new if new is not None else old).noted:
            out[key] = [old, new]
    return out


def diff(before: Mapping[str, Any] | None, after: Mapping[str, Any] | None, time: float,
         statistics: bool = False) -> list[dict[str, Any]]:
    """The events that lead from one status of a device to the next (None: the device
    is not there)."""
    if before is None and after is None:
        return []
    device = str((after or before or {})["device"])
    old = dict(parts(before)) if before is not None else {}
    new = dict(parts(after)) if after is not None else {}
    out: list[dict[str, Any]] = []
    names = list(new) + [n for n in old if n not in new]
    for name in names:
        was, now = old.get(name), new.get(name)
        if was is None and now is not None:
            out.append(event("create", device, name, now, time))
        elif was is not None and now is None:
            out.append(event("destroy", device, name, None, time))
        elif was is not None and now is not None:
            changed = changes(name, was, now, statistics)
            if changed:
                out.append(event("change", device, name, now, time, changed=changed))
    return out
