"""Lineage (invariant 7): which generation of the data each side holds.

A generation is a random 64-bit id naming one lineage of a device's data. The source
side (breqd, per tracked device) records its device id, its generation and its role; the
target side (breceive, per target) records the source device id and generation it holds,
and the state of its copy. A receiver refuses a stream of another lineage unless told to
discard its data, so an old source can never overwrite a newer copy. The target's record
also names the file or device it describes (its identity, bmig.identity): a record is
only ever true of that target (invariant 9).

Both records are small JSON files written atomically (bmig.config.write_atomic). A record
that cannot be read is never guessed at: the caller refuses to go on and says why.
"""

from __future__ import annotations

import json
import os
import secrets
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from bmig.config import read_json_state, write_atomic
from bmig.errors import ConfigError, StateError
from bmig.identity import TargetIdentity

ROLE_PRIMARY = "primary"            # the source: writes happen here
ROLE_SECONDARY = "secondary"        # a target: receives what the primary ships
ROLE_HANDED_OVER = "handed-over"    # a former source after cutover: read-only by default
ROLE_REJOINING = "rejoining"        # a former primary waiting to become a secondary
ROLES = (ROLE_PRIMARY, ROLE_SECONDARY, ROLE_HANDED_OVER)
TARGET_ROLES = (ROLE_PRIMARY, ROLE_SECONDARY, ROLE_HANDED_OVER, ROLE_REJOINING)

STATE_NEW = "new"                   # nothing written by bmig yet
STATE_INCONSISTENT = "inconsistent"  # a pass is being applied, or ended with the source
#                                      changed meanwhile: chunks of different moments
STATE_CONSISTENT = "consistent"     # a copy of one moment of the source (up to its last
#                                     durable write, when replication carried it)
STATE_IN_SYNC = "in-sync"           # consistent, and synchronous replication runs
TARGET_STATES = (STATE_NEW, STATE_INCONSISTENT, STATE_CONSISTENT, STATE_IN_SYNC)
USABLE_STATES = (STATE_CONSISTENT, STATE_IN_SYNC)   # what a promotion may take as it is
REPLICATION_PROTOCOLS_SEEN = ("A", "B", "C")        # what a target record may name

SOURCE_SUFFIX = ".lineage"
TARGET_SUFFIX = ".target"


def new_generation() -> int:
    return secrets.randbits(64) or 1


def hex_id(value: int) -> str:
    return f"{value:016x}"


_HEX_DIGITS = frozenset("0123456789abcdefABCDEF")


def parse_id(value: object, what: str) -> int:
    """Exactly 16 hex digits: int() alone would also take " 0x_b0" and the like."""
    if not isinstance(value, str) or len(value) != 16 or not _HEX_DIGITS.issuperset(value):
        raise ConfigError(f"{what} must be 16 hex digits, not {value!r}")
    return int(value, 16)


# -- the source side ------------------------------------------------------------------

@dataclass
class SourceLineage:
    device_id: int
    generation: int
    role: str = ROLE_PRIMARY
    previous: list[str] = field(default_factory=list)   # older generations, newest first
    successor: int = 0        # handed-over: the generation the target took at cutover
    # The HA replication mode runs (bmigrate replicate --keep): the target may be promoted
    # while this side is away, so bmig-nbd serves it read-only at start until its role is
    # confirmed (the HA replication finds the target still its secondary, or an operator).
    ha: bool = False

    def to_json(self) -> dict[str, Any]:
        return {"device_id": hex_id(self.device_id), "generation": hex_id(self.generation),
                "role": self.role, "previous": self.previous[:16],
                "successor": hex_id(self.successor), "ha": self.ha}


def source_path(state_dir: str, name: str) -> str:
    return os.path.join(state_dir, name + SOURCE_SUFFIX)


def load_source(state_dir: str, name: str,
                device_id: int) -> tuple[SourceLineage, str | None]:
    """The device's lineage record. Returns (record, why) where ``why`` says why a new
    generation was started (None when the saved record was used). A damaged record, or
    one of another device id, is kept aside and replaced by a new lineage: targets then
    refuse the device until told to discard their data, which is the safe side."""
    path = source_path(state_dir, name)
    why: str | None
    try:
        raw = read_json_state(path)
        if raw is None:
            why = "no lineage record"
        else:
            successor = raw.get("successor")
            record = SourceLineage(parse_id(raw.get("device_id"), "device_id"),
                                   parse_id(raw.get("generation"), "generation"),
                                   _role(raw, ROLE_PRIMARY), _generations(raw),
                                   parse_id(successor, "successor") if successor else 0,
                                   raw.get("ha", False) is True)
            if record.device_id == device_id:
                return record, None
            why = f"the lineage record is of device id {hex_id(record.device_id)}"
    except ConfigError as exc:
        why = f"the lineage record is damaged ({exc.message})"
    if os.path.exists(path):
        os.replace(path, f"{path}.bad-{int(time.time())}")
    record = SourceLineage(device_id, new_generation())
    save_source(state_dir, name, record)
    return record, why


def save_source(state_dir: str, name: str, record: SourceLineage) -> None:
    try:
        write_atomic(source_path(state_dir, name), json.dumps(record.to_json()).encode())
    except OSError as exc:
        raise StateError(f"cannot write the lineage record of {name}: {exc.strerror}") from None


# -- the target side ------------------------------------------------------------------

@dataclass
class TargetRecord:
    export: str
    source_device_id: int = 0          # 0: none yet
    generation: int = 0
    state: str = STATE_NEW
    role: str = ROLE_SECONDARY
    size: int = 0
    last_pass: float | None = None     # time a pass last completed
    passes: int = 0
    previous: list[str] = field(default_factory=list)   # older generations, newest first
    successor: int = 0                 # handed-over: the generation that took over
    promoted: float | None = None      # time the target became primary
    identity: TargetIdentity | None = None   # the file or device the record describes
    # The last replication session (bmig-nbd's): what a promotion without the source
    # may have lost. ``window``: bytes its writers could be answered for before the
    # target had them (protocol A's queue; 0 for B and C).
    protocol: str | None = None
    window: int = 0
    replicating_since: float | None = None
    replication_ended: float | None = None
    catchup_bytes: int = 0             # what the last pass set out to ship
    # rejoining: the chunks this copy changed that its new primary never had (in
    # EXPORT.resync: "ranges"), or "all" when that is not known; ``discard``: its own
    # changes may be thrown away even where both sides wrote as primary (split brain).
    resync: str | None = None
    discard: bool = False

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["source_device_id"] = hex_id(self.source_device_id)
        d["generation"] = hex_id(self.generation)
        d["successor"] = hex_id(self.successor)
        d["previous"] = self.previous[:16]
        d["identity"] = self.identity.to_json() if self.identity is not None else None
        return d

    def not_bound_to(self, found: TargetIdentity | None) -> str | None:
        """Why this record does not describe the target as it is now (``found``; None:
        the target does not exist), or None when it does (invariant 9)."""
        if self.identity is None:
            return "its record does not say which file or device it describes"
        return self.identity.mismatch(found)

    def shares_lineage(self, device_id: int, generation: int) -> bool:
        return (self.state != STATE_NEW and self.source_device_id == device_id
                and self.generation == generation)

    def descends_to(self, generation: int, previous: list[int]) -> bool:
        """This copy was handed over to ``generation`` and not written since, and that
        generation descends from ours: a fail-back may ship only what changed."""
        return (self.role == ROLE_HANDED_OVER and self.successor == generation
                and self.generation in previous and self.state == STATE_CONSISTENT)


def relation(record: TargetRecord, device_id: int, generation: int,
             previous: list[int]) -> str:
    """How a source relates to what a target's record says it holds (see
    docs/wire-protocol.md, Open). The receiver then checks that the record still
    describes the target (TargetRecord.not_bound_to): "same", "descendant" and "rejoin"
    hold only for the very file or device the record was written for."""
    if record.state == STATE_NEW:
        return "new"
    if record.role == ROLE_REJOINING:
        return rejoin_relation(record, generation, previous)
    if record.shares_lineage(device_id, generation) and record.role != ROLE_PRIMARY:
        return "same"
    if record.descends_to(generation, previous):
        return "descendant"
    return "foreign"


def rejoin_relation(record: TargetRecord, generation: int, previous: list[int]) -> str:
    """A former primary waits to become the secondary of a new one (bmigrate rejoin).

    rejoin       its generation is one the new primary descends from: it wrote nothing
                 as primary since, but the chunks it had not shipped (its resync set)
    split-brain  both sides descend from a common generation and each took a new one
                 since: both were written as primary; refused unless the rejoining side
                 said its changes may be discarded (then: rejoin)
    foreign      nothing in common, or the rejoining side is the newer one"""
    if record.generation in previous or record.generation == generation:
        return "rejoin"
    ours = {record.generation} | {parse_id(g, "previous") for g in record.previous}
    if ours & ({generation} | set(previous)) and generation not in ours:
        return "rejoin" if record.discard else "split-brain"
    return "foreign"


def common_ancestor(record: TargetRecord, generation: int, previous: list[int]) -> int:
    """The newest generation both a rejoining copy and a source descend from (0: none)."""
    theirs = {generation} | set(previous)
    for g in [record.generation] + [parse_id(p, "previous") for p in record.previous]:
        if g in theirs:
            return g
    return 0


def target_path(state_dir: str, export: str) -> str:
    return os.path.join(state_dir, export + TARGET_SUFFIX)


def load_target(state_dir: str, export: str) -> TargetRecord:
    path = target_path(state_dir, export)
    try:
        raw = read_json_state(path)
    except ConfigError as exc:
        raise StateError(f"target record damaged: {exc.message}; it is not guessed at: "
                         "move it away and sync again with --discard-target-data") from None
    if raw is None:
        return TargetRecord(export)
    try:
        state = str(raw.get("state", STATE_NEW))
        if state not in TARGET_STATES:
            raise ConfigError(f"{path}: unknown state {state!r}")
        last = raw.get("last_pass")
        promoted = raw.get("promoted")
        successor = raw.get("successor")
        identity = raw.get("identity")
        resync = raw.get("resync")
        if resync not in (None, "ranges", "all"):
            raise ConfigError(f"{path}: unknown resync {resync!r}")
        protocol = raw.get("protocol")
        if protocol not in (None, *REPLICATION_PROTOCOLS_SEEN):
            raise ConfigError(f"{path}: unknown protocol {protocol!r}")
        return TargetRecord(export, parse_id(raw.get("source_device_id"), "source_device_id"),
                            parse_id(raw.get("generation"), "generation"), state,
                            _role(raw, ROLE_SECONDARY, TARGET_ROLES), _count(raw, "size"),
                            float(last) if last is not None else None,
                            _count(raw, "passes"), _generations(raw),
                            parse_id(successor, "successor") if successor else 0,
                            float(promoted) if promoted is not None else None,
                            TargetIdentity.from_json(identity) if identity is not None
                            else None,
                            protocol, _count(raw, "window"),
                            _time(raw.get("replicating_since")),
                            _time(raw.get("replication_ended")),
                            _count(raw, "catchup_bytes"), resync,
                            bool(raw.get("discard", False)))
    except (ConfigError, TypeError, ValueError) as exc:
        message = exc.message if isinstance(exc, ConfigError) else str(exc)
        raise StateError(f"target record {path} damaged: {message}") from None


def _time(value: object) -> float | None:
    return float(value) if value is not None else None  # type: ignore[arg-type]


def _role(raw: dict[str, Any], default: str, roles: tuple[str, ...] = ROLES) -> str:
    role = raw.get("role", default)
    if role not in roles:
        raise ConfigError(f"unknown role {role!r}")
    return role


def _count(raw: dict[str, Any], key: str) -> int:
    value = raw.get(key, 0)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ConfigError(f"{key} must be a whole number, not {value!r}")
    return value


def _generations(raw: dict[str, Any]) -> list[str]:
    """``previous``: a list of generations (16 hex digits each), newest first."""
    value = raw.get("previous", [])
    if not isinstance(value, list):
        raise ConfigError(f"previous must be a list of generations, not {value!r}")
    for generation in value:
        parse_id(generation, "a previous generation")
    return value[:16]


def save_target(state_dir: str, record: TargetRecord) -> None:
    try:
        write_atomic(target_path(state_dir, record.export),
                     json.dumps(record.to_json()).encode())
    except OSError as exc:
        raise StateError(f"cannot write the target record of {record.export}: "
                         f"{exc.strerror}") from None


def now() -> float:
    return time.time()


# -- a rejoining copy's own changes (EXPORT.resync beside its record) ---------------------

RESYNC_SUFFIX = ".resync"


def resync_path(state_dir: str, export: str) -> str:
    return os.path.join(state_dir, export + RESYNC_SUFFIX)


def save_resync(state_dir: str, export: str, ranges: list[tuple[int, int]]) -> None:
    """The byte ranges a rejoining copy changed that its new primary never had."""
    try:
        write_atomic(resync_path(state_dir, export),
                     json.dumps({"ranges": [list(r) for r in ranges]}).encode())
    except OSError as exc:
        raise StateError(f"cannot write the resync set of {export}: {exc.strerror}") from None


def load_resync(state_dir: str, export: str) -> list[tuple[int, int]] | None:
    """The resync set, or None when it is missing or damaged (never guessed at)."""
    try:
        raw = read_json_state(resync_path(state_dir, export))
        if raw is None:
            return None
        ranges = [(int(o), int(n)) for o, n in raw["ranges"]]
    except (ConfigError, KeyError, TypeError, ValueError):
        return None
    if any(o < 0 or n <= 0 for o, n in ranges):
        return None
    return ranges


def drop_resync(state_dir: str, export: str) -> None:
    try:
        os.unlink(resync_path(state_dir, export))
    except FileNotFoundError:
        pass
