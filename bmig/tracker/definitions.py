"""Device definitions: one TOML file per device in breqd's config directory.

    # /etc/bmig/devices.d/vm1.toml
    name = "vm1"
    size = 10737418240          # bytes (or "10G")
    chunk_size = 65536          # optional, power of two, 4 KiB to 16 MiB
    device_id = "9f3c2a71d04e5b68"  # written by `bmigrate track add`

The file name without ``.toml`` must equal ``name``; any other key is refused. ``scan``
reads a directory. bmigrate checks device names with this module too, so it stays cheap
to import: it may read and write definition files and check names and geometry, and may
not open bitmaps, keep state, or watch the directory (registry.py does, in breqd).
"""
from __future__ import annotations

import logging
import os
import re
import secrets
from dataclasses import dataclass
from typing import Any

from bmig.chunkmath import chunk_count
from bmig.config import Key, Schema, load_toml, write_toml_atomic
from bmig.constants import (DEFAULT_CHUNK_SIZE, MAX_CHUNK_SIZE, MAX_DEVICE_NAME, MAX_DEVICE_SIZE,
                            MIN_CHUNK_SIZE)
from bmig.errors import ConfigError
from bmig.limits import MAX_CHUNKS

log = logging.getLogger("breqd")

_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")
DEVICE_NAMES = (f'of up to {MAX_DEVICE_NAME} letters, digits, "_", ".", "-", not starting '
                'with "." or "-"')
SUFFIX = ".toml"


def check_name(name: str) -> str:
    if not isinstance(name, str) or not _NAME.fullmatch(name) or len(name) > MAX_DEVICE_NAME:
        raise ConfigError(
            f"device name {name!r} is invalid: use up to {MAX_DEVICE_NAME} letters, digits, "
            "'_', '.', '-', not starting with '.' or '-'")
    return name


def check_geometry(size: int, chunk_size: int) -> None:
    if not 0 < size <= MAX_DEVICE_SIZE:
        raise ConfigError(f"device size {size} is out of range (1 byte to 2^60)")
    if chunk_size & (chunk_size - 1) or not MIN_CHUNK_SIZE <= chunk_size <= MAX_CHUNK_SIZE:
        raise ConfigError(f"chunk size {chunk_size} must be a power of two "
                          f"from {MIN_CHUNK_SIZE} to {MAX_CHUNK_SIZE}")
    chunks = chunk_count(size, chunk_size)
    if chunks > MAX_CHUNKS:
        raise ConfigError(f"{chunks} chunks of {chunk_size} bytes is more than breqd tracks "
                          f"per device ({MAX_CHUNKS}); use a larger chunk size")


_DEVICE_ID = re.compile(r"[0-9a-fA-F]{16}")


def parse_device_id(value: object) -> int:
    """A device id as written in a definition file: exactly 16 hex digits."""
    if not isinstance(value, str) or not _DEVICE_ID.fullmatch(value):
        raise ValueError(value)
    return int(value, 16)


def new_device_id() -> int:
    return secrets.randbits(64) or 1


def device_name(value: str) -> str:
    """``check_name`` for a schema: a bad name is a ValueError, and the key's error says
    what a name may be (``DEVICE_NAMES``)."""
    try:
        return check_name(value)
    except ConfigError:
        raise ValueError(value) from None


def _device_id(value: str) -> int:
    device_id = parse_device_id(value)
    if not 0 < device_id < 1 << 64:
        raise ValueError(value)
    return device_id


# What a definition file holds.
SCHEMA = Schema(
    Key.string("name", f"a device name {DEVICE_NAMES}", device_name, required=True),
    Key.size("size", 1, MAX_DEVICE_SIZE, required=True),
    Key.size("chunk_size", MIN_CHUNK_SIZE, MAX_CHUNK_SIZE, power_of_two=True,
             default=DEFAULT_CHUNK_SIZE),
    Key.string("device_id", "16 hex digits, not all zero, as a string", _device_id,
               required=True),
)


@dataclass(frozen=True)
class DeviceDefinition:
    name: str
    size: int
    chunk_size: int
    device_id: int

    @classmethod
    def from_values(cls, values: dict[str, Any], source: str) -> "DeviceDefinition":
        try:
            checked = {**SCHEMA.defaults(), **SCHEMA.check(values)}
            check_geometry(checked["size"], checked["chunk_size"])
        except ConfigError as exc:
            raise ConfigError(f"{source}: {exc.message}") from None
        return cls(checked["name"], checked["size"], checked["chunk_size"],
                   checked["device_id"])

    @classmethod
    def load(cls, path: str) -> "DeviceDefinition":
        definition = cls.from_values(load_toml(path), path)
        stem = os.path.basename(path)[:-len(SUFFIX)]
        if stem != definition.name:
            raise ConfigError(f"{path}: name {definition.name!r} does not match the file name")
        return definition

    def to_values(self) -> dict:
        return {"name": self.name, "size": self.size, "chunk_size": self.chunk_size,
                "device_id": f"{self.device_id:016x}"}

    def save(self, config_dir: str) -> str:
        path = os.path.join(config_dir, self.name + SUFFIX)
        write_toml_atomic(path, self.to_values(),
                          comment="Tracked by breqd. Size and chunk size cannot change "
                                  "while tracked;\nremove the file to stop tracking.")
        return path


def scan(config_dir: str) -> tuple[dict[str, DeviceDefinition], dict[str, str]]:
    """Definitions found in ``config_dir`` and, separately, files that failed with why."""
    found: dict[str, DeviceDefinition] = {}
    errors: dict[str, str] = {}
    try:
        names = sorted(os.listdir(config_dir))
    except OSError as exc:
        raise ConfigError(f"cannot read config directory {config_dir}: {exc.strerror}") from None
    for entry in names:
        if entry.startswith(".") or not entry.endswith(SUFFIX):
            continue
        path = os.path.join(config_dir, entry)
        try:
            definition = DeviceDefinition.load(path)
        except ConfigError as exc:
            errors[entry[:-len(SUFFIX)]] = exc.message
            continue
        found[definition.name] = definition
    return found, errors
