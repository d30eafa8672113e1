"""What bmig knows about an attached device: one JSON record per device in the dm state
directory (written with write_atomic), and one lock per device, so that one process at a
time changes its tables or imports its eras.

The record is the importer's memory across crashes: ``imported_era`` is the first era
not yet known to be in breqd. It only ever moves forward after breqd has acknowledged
the marks (durable) of every era before it.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, fields

from bmig.config import read_json_state, write_atomic
from bmig.errors import ConfigError, InterceptError, StateError
from bmig.statelock import flock_within

ATTACHED, LOST, DETACHED = "attached", "lost", "detached"
LOCK_TIMEOUT = 120.0


@dataclass
class Record:
    name: str
    device: str                  # the user's dm device (its table now maps onto era_device)
    era_device: str              # bmig-NAME-era: dm-era over origin_device
    origin_device: str           # bmig-NAME-origin: the device's original table
    metadata: str                # dm-era's metadata device
    metadata_file: str | None    # the file behind metadata, when bmig made it
    block_sectors: int
    size: int                    # bytes
    device_id: str               # breqd's device id the eras are imported into
    imported_era: int            # every write of an era before this one is in breqd
    boot_id: str                 # the kernel the tables were made in
    state: str = ATTACHED
    why: str = ""                # LOST: what broke the chain of eras
    last_import: float = 0.0     # wall-clock time of the last import
    last_import_bytes: int = 0   # bytes it marked
    imports: int = 0
    # While the device maps onto the kernel's NBD device for a cutover through bmig-nbd
    # (bmig/dm/via_nbd.py): which one, the bmig-nbd serving it (pid and start time, so
    # that a reused pid is never taken for it), and the first era whose writes all came
    # through bmig-nbd, which marked them itself (0 until an import after the switch).
    nbd_device: str = ""
    nbd_pid: int = 0
    nbd_started: int = 0
    nbd_from_era: int = 0

    def to_json(self) -> dict:
        return asdict(self)


DEFAULT_DM_STATE_DIR = "/var/lib/bmig/dm"


def state_dir() -> str:
    return os.environ.get("BMIG_DM_STATE") or DEFAULT_DM_STATE_DIR


def record_path(directory: str, name: str) -> str:
    return os.path.join(directory, f"{name}.json")


def load(directory: str, name: str) -> Record | None:
    path = record_path(directory, name)
    raw = read_json_state(path)
    if raw is None:
        return None
    known = {f.name for f in fields(Record)}
    try:
        return Record(**{k: v for k, v in raw.items() if k in known})
    except TypeError as exc:
        raise ConfigError(f"{path}: not a dm intercept record ({exc})") from None


def save(directory: str, record: Record) -> None:
    import json

    os.makedirs(directory, mode=0o700, exist_ok=True)
    try:
        write_atomic(record_path(directory, record.name),
                     (json.dumps(record.to_json(), indent=1, sort_keys=True) + "\n").encode())
    except OSError as exc:
        raise StateError(f"cannot write {record_path(directory, record.name)}: "
                         f"{exc.strerror}") from None


def boot_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return "unknown"


class DeviceLock:
    """An flock on NAME.lock: the kernel drops it when its holder dies (kill -9 too)."""

    def __init__(self, directory: str, name: str, timeout: float = LOCK_TIMEOUT):
        self.path = os.path.join(directory, f"{name}.lock")
        self.timeout = timeout
        self._fd = -1

    def __enter__(self) -> "DeviceLock":
        try:
            os.makedirs(os.path.dirname(self.path), mode=0o700, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise StateError(f"cannot open {self.path}: {exc.strerror}") from None
        if not flock_within(fd, self.timeout):
            os.close(fd)
            raise InterceptError(f"{self.path} is held by another bmig process "
                                 f"for more than {self.timeout:g} s")
        self._fd = fd
        return self

    def __exit__(self, *exc: object) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
