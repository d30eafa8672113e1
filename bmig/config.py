"""TOML configuration files and the values in them, with one-line errors."""

from __future__ import annotations

import json
import os
import re
import stat
import tomllib
from typing import Any

from bmig.errors import ConfigError

_SIZE = re.compile(r"^\s*(\d+)\s*([KMGTP]?)(i?B?)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40, "P": 1 << 50}


def parse_size(text: str | int) -> int:
    """Bytes from ``123``, ``64K``, ``10G``, ``1TiB`` (binary units)."""
    if isinstance(text, int) and not isinstance(text, bool):
        return text
    match = _SIZE.match(str(text))
    if not match:
        raise ConfigError(f"{text!r} is not a size (examples: 4096, 64K, 10G, 1TiB)")
    return int(match.group(1)) * _UNITS[match.group(2).upper()]


# A configuration file is small; anything bigger is not one of ours.
MAX_CONFIG_FILE = 1 << 20


def read_small_file(path: str, max_bytes: int, what: str = "") -> tuple[bytes, os.stat_result]:
    """A regular file's bytes and stat, refusing a FIFO, a device, a directory or
    anything larger than ``max_bytes`` without blocking on it or reading it all."""
    label = f"{what} {path}" if what else path
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        raise ConfigError(f"{label}: no such file") from None
    except PermissionError:
        raise ConfigError(f"{label}: permission denied") from None
    except OSError as exc:
        raise ConfigError(f"{label}: cannot open: {exc.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ConfigError(f"{label}: not a regular file")
        if st.st_size > max_bytes:
            raise ConfigError(f"{label}: {st.st_size} bytes is too large (at most {max_bytes})")
        try:
            data = os.read(fd, max_bytes + 1)
        except OSError as exc:
            raise ConfigError(f"{label}: cannot read: {exc.strerror}") from None
        if len(data) > max_bytes:
            raise ConfigError(f"{label}: larger than {max_bytes} bytes")
        return data, st
    finally:
        os.close(fd)


def load_toml(path: str) -> dict[str, Any]:
    """Parse a TOML file; a FIFO, device or huge file is refused without blocking on it."""
    data, _ = read_small_file(path, MAX_CONFIG_FILE)
    try:
        return tomllib.loads(data.decode())
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: cannot be read as TOML: {exc}") from None


def load_settings(path: str, keys: set[str] | frozenset[str]) -> dict[str, Any]:
    """A TOML settings file whose keys must all be known."""
    values = load_toml(path)
    unknown = set(values) - set(keys)
    if unknown:
        raise ConfigError(f"{path}: unknown setting(s): {', '.join(sorted(unknown))}")
    return values


def toml_value(value: Any) -> str:
    """A TOML literal for the simple values bmig writes (str, int, bool)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        escaped = value.replace("\\", "\\\\").replace('"', '\\"')
        return f'"{escaped}"'
    raise TypeError(f"cannot write {type(value).__name__} as TOML")


def write_toml_atomic(path: str, values: dict[str, Any], comment: str = "") -> None:
    """Write a flat TOML file: temp file, fsync, rename, directory fsync."""
    lines = [f"# {line}".rstrip() for line in comment.splitlines()]
    lines += [f"{key} = {toml_value(value)}" for key, value in values.items()]
    write_atomic(path, ("\n".join(lines) + "\n").encode(), mode=0o644)


def write_atomic(path: str, data: bytes, mode: int = 0o600) -> None:
    """Replace ``path`` with ``data`` so that a crash leaves the old or the new file:
    temp file, fsync, rename, directory fsync."""
    directory = os.path.dirname(path) or "."
    tmp = os.path.join(directory, f".{os.path.basename(path)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.rename(tmp, path)
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def read_json_state(path: str, max_bytes: int = 1 << 20) -> dict[str, Any] | None:
    """A small JSON state file written by ``write_atomic``: None if it does not exist,
    ConfigError if it is damaged (the caller decides what damage means)."""
    try:
        with open(path, "rb") as f:
            data = f.read(max_bytes + 1)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None
    if len(data) > max_bytes:
        raise ConfigError(f"{path}: larger than {max_bytes} bytes")
    try:
        value = json.loads(data)
    except ValueError as exc:
        raise ConfigError(f"{path}: not valid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise ConfigError(f"{path}: not a JSON object")
    return value


def merge(file_values: dict[str, Any], flags: dict[str, Any]) -> dict[str, Any]:
    """CLI flags (those given, i.e. not None) override values from a file."""
    merged = dict(file_values)
    merged.update({k: v for k, v in flags.items() if v is not None})
    return merged
