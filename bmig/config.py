"""TOML configuration files and the values in them, with one-line errors.

Each program declares what its settings file may hold as a ``Schema`` of ``Key``s (name,
type, range or choices, default) next to its options; ``load_settings`` reads the file
and checks every value against it, so a wrong value is one line naming the file, the key
and what it takes, never a traceback or a value silently read as something else.
"""

from __future__ import annotations

import json
import os
import re
import stat
from dataclasses import dataclass
from typing import Any, Callable, Iterable

from bmig.errors import ConfigError
from bmig.limits import MAX_CONFIG_FILE, MAX_STATE_FILE

# At most 24 digits on either side of the point: more than any size (2**64 has 20), and
# never so many that int() refuses them (its 4300-digit limit, a ValueError).
_SIZE = re.compile(r"^\s*(\d{1,24}(?:\.\d{1,24})?|\.\d{1,24})\s*([KMGTP]?)(i?B?)?\s*$",
                   re.IGNORECASE | re.ASCII)
_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40, "P": 1 << 50}


def parse_size(text: str | int) -> int:
    """Bytes from ``123``, ``64K``, ``1.5G``, ``1TiB`` (binary units); a fraction only
    where it comes to a whole number of bytes."""
    if isinstance(text, int) and not isinstance(text, bool):
        return text
    match = _SIZE.match(str(text))
    if not match:
        raise ConfigError(f"{text!r} is not a size (examples: 4096, 64K, 1.5G, 1TiB)")
    number, unit = match.group(1), _UNITS[match.group(2).upper()]
    whole, _, fraction = number.partition(".")
    # Exact arithmetic: 1.5G is 1610612736 bytes, never a float's neighbour of it.
    scale = 10 ** len(fraction)
    value = int(whole or "0") * scale + int(fraction or "0")
    if value * unit % scale:
        raise ConfigError(f"{text!r} is not a whole number of bytes")
    return value * unit // scale


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


# tomllib needs memory quadratic in the number of parts of one dotted key (20,000 parts,
# 40 KB of text, take 1.5 GB); no key of ours has more than three. A chain this long is
# refused before parsing. Possessive parts and the look-behind keep the search linear.
MAX_KEY_PARTS = 32
_KEY_PART = r"""(?:[A-Za-z0-9_-]++|"(?:[^"\\\n]|\\.)*+"|'[^'\n]*+')"""
_DEEP_KEY = re.compile(r"""(?<![A-Za-z0-9_"'\\-])(?:""" + _KEY_PART + r"[ \t]*+\.[ \t]*+){"
                       + str(MAX_KEY_PARTS) + "}")


def load_toml(path: str) -> dict[str, Any]:
    """Parse a TOML file; a FIFO, device or huge file is refused without blocking on it."""
    data, _ = read_small_file(path, MAX_CONFIG_FILE)
    try:
        text = data.decode()
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: cannot be read as TOML: {exc}") from None
    if _DEEP_KEY.search(text):
        raise ConfigError(f"{path}: a dotted key (or a string that reads like one) of more "
                          f"than {MAX_KEY_PARTS} parts")
    import tomllib      # here: a command given no file does not need it
    try:
        return tomllib.loads(text)
    except ValueError as exc:   # TOMLDecodeError, or an integer of more than 4300 digits
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    except RecursionError:
        raise ConfigError(f"{path}: not valid TOML: arrays or tables nested too deeply") from None


def load_settings(path: str, schema: "Schema") -> dict[str, Any]:
    """A TOML settings file whose keys are all in ``schema`` and whose values are all
    what it says they take, converted as it says (sizes to bytes, say)."""
    values = load_toml(path)
    try:
        return schema.check(values)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc.message}") from None


# -- what a settings file may hold ----------------------------------------------------

_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")
MAX_SHOWN = 60


def shown(value: Any) -> str:
    """A value from a file as an error shows it: short, on one line, TOML-like."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value) if abs(value) < 10 ** 40 else "an integer of more than 40 digits"
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, str):
        text = value if len(value) <= MAX_SHOWN else value[:MAX_SHOWN] + "..."
        return '"' + "".join(_escaped(c) for c in text) + '"'
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "a table"
    return f"a date or time ({value})"


def _escaped(c: str) -> str:
    """A character as a TOML basic string shows it; no control or format character
    (newline, escape, right-to-left override) reaches a terminal or a log raw."""
    if c in '"\\':
        return "\\" + c
    if c.isprintable():
        return c
    return f"\\u{ord(c):04x}" if ord(c) < 0x10000 else f"\\U{ord(c):08x}"


def key_text(key: str) -> str:
    """A key as TOML writes it: bare when it can be, else quoted."""
    return key if _BARE_KEY.fullmatch(key) else shown(key)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def size_text(n: int) -> str:
    """4096 as "4K", 1 << 60 as "1024P": the largest unit that divides it."""
    for unit in "PTGMK":
        factor = _UNITS[unit]
        if n >= factor and n % factor == 0:
            return f"{n // factor}{unit}"
    return str(n)


@dataclass(frozen=True)
class Key:
    """One key of a settings file: its name, what it takes (``expected``, as the error
    says it: "an integer from 1 to 1024"), its default and whether it must be there.

    ``convert`` turns a value from the file into the value the program uses. It raises
    ValueError or TypeError for a value that is not what ``expected`` says (the error
    then shows both), or ConfigError when its own message says better what is wrong.
    The constructors below (``Key.integer``, ``Key.size``...) are the usual kinds.
    """

    name: str
    expected: str
    convert: Callable[[Any], Any]
    default: Any = None
    required: bool = False

    def load(self, value: Any, where: str) -> Any:
        """The converted value, or a ConfigError naming ``where`` (the key's path)."""
        try:
            return self.convert(value)
        except (TypeError, ValueError, ArithmeticError):
            raise ConfigError(f"{where}: expected {self.expected}, got {shown(value)}") from None
        except ConfigError as exc:
            raise ConfigError(f"{where}: {exc.message}") from None

    # -- the usual kinds --

    @classmethod
    def string(cls, name: str, expected: str = "a string",
               check: Callable[[str], Any] | None = None, default: Any = None,
               required: bool = False) -> "Key":
        """A string (without NUL characters: no path or command can hold one), passed
        through ``check`` if given."""
        def convert(value: Any) -> Any:
            if not isinstance(value, str) or "\0" in value:
                raise TypeError(value)
            return check(value) if check else value
        return cls(name, expected, convert, default, required)

    @classmethod
    def path(cls, name: str, default: str | None = None, required: bool = False) -> "Key":
        """A file or directory name: a string, not empty."""
        def nonempty(value: str) -> str:
            if not value:
                raise ValueError(value)
            return value
        return cls.string(name, "a path (a non-empty string)", nonempty, default, required)

    @classmethod
    def boolean(cls, name: str, default: bool | None = None) -> "Key":
        """true or false; "false" and 0 are not booleans."""
        def convert(value: Any) -> bool:
            if not isinstance(value, bool):
                raise TypeError(value)
            return value
        return cls(name, "true or false", convert, default)

    @classmethod
    def integer(cls, name: str, low: int, high: int, default: int | None = None) -> "Key":
        """An integer from ``low`` to ``high`` (true and false are not integers)."""
        def convert(value: Any) -> int:
            if not _is_int(value) or not low <= value <= high:
                raise ValueError(value)
            return value
        return cls(name, f"an integer from {low} to {high}", convert, default)

    @classmethod
    def number(cls, name: str, low: float, high: float,
               default: float | None = None) -> "Key":
        """An integer or a float from ``low`` to ``high``, as a float."""
        def convert(value: Any) -> float:
            if not (_is_int(value) or isinstance(value, float)) or not low <= value <= high:
                raise ValueError(value)
            return float(value)
        return cls(name, f"a number from {low:g} to {high:g}", convert, default)

    @classmethod
    def size(cls, name: str, low: int = 0, high: int | None = None,
             power_of_two: bool = False, default: int | None = None,
             required: bool = False) -> "Key":
        """Bytes: an integer, or a string with a binary unit ("64K", "10G"), as an int."""
        where = (f"from {size_text(low)} to {size_text(high)}" if high is not None else
                 f"of at least {size_text(low)}")
        two = ", a power of two," if power_of_two else ""

        def convert(value: Any) -> int:
            if not (_is_int(value) or isinstance(value, str)):
                raise TypeError(value)
            try:
                n = parse_size(value)
            except ConfigError:
                raise ValueError(value) from None
            if n < low or (high is not None and n > high) or (power_of_two and n & (n - 1)):
                raise ValueError(value)
            return n
        return cls(name, f'a size {where}{two} in bytes (an integer, or a string with a '
                         f'unit such as "64K")', convert, default, required)

    @classmethod
    def choice(cls, name: str, choices: Iterable[str], default: str | None = None) -> "Key":
        """One of a few strings, exactly as written."""
        options = tuple(choices)

        def convert(value: Any) -> str:
            if not isinstance(value, str) or value not in options:
                raise ValueError(value)
            return value
        return cls(name, "one of " + ", ".join(f'"{o}"' for o in options), convert, default)

    @classmethod
    def array(cls, name: str, item: "Key", expected: str = "",
              default: list | None = None) -> "Key":
        """An array whose every element ``item`` takes (``item``'s name is not used)."""
        return _Array(name, expected or f"an array, each element {item.expected}",
                      _no_convert, default, False, item)

    @classmethod
    def tables(cls, name: str, schema: "Schema", names: Callable[[str], Any],
               names_expected: str, default: dict | None = None) -> "Key":
        """A table of tables, ``[NAME.X]`` each, with X accepted by ``names`` (which
        raises ValueError) and each table checked by ``schema``, its defaults filled in."""
        return _Tables(name, f"a table of [{name}.NAME] tables", _no_convert, default, False,
                       schema, names, names_expected)

    @classmethod
    def table_array(cls, name: str, schema: "Schema", default: list | None = None) -> "Key":
        """An array of tables, ``[[NAME]]`` each, checked by ``schema``, its defaults
        filled in."""
        return _TableArray(name, f"an array of [[{name}]] tables", _no_convert, default,
                           False, schema)


def _no_convert(value: Any) -> Any:
    return value


@dataclass(frozen=True)
class _Array(Key):
    item: Key | None = None

    def load(self, value: Any, where: str) -> Any:
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected {self.expected}, got {shown(value)}")
        assert self.item is not None
        return [self.item.load(v, f"{where}[{i}]") for i, v in enumerate(value)]


@dataclass(frozen=True)
class _Tables(Key):
    schema: "Schema | None" = None
    names: Callable[[str], Any] | None = None
    names_expected: str = ""

    def load(self, value: Any, where: str) -> Any:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected {self.expected}, got {shown(value)}")
        assert self.schema is not None and self.names is not None
        checked = {}
        for name, table in value.items():
            try:
                self.names(name)
            except (TypeError, ValueError, ConfigError):
                raise ConfigError(f"{where}: expected names {self.names_expected}, got "
                                  f"{shown(name)}") from None
            inner = f"{where}.{key_text(name)}"
            if not isinstance(table, dict):
                raise ConfigError(f"{inner}: expected a table, got {shown(table)}")
            checked[name] = {**self.schema.defaults(), **self.schema.check(table, inner)}
        return checked


@dataclass(frozen=True)
class _TableArray(Key):
    schema: "Schema | None" = None

    def load(self, value: Any, where: str) -> Any:
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected {self.expected}, got {shown(value)}")
        assert self.schema is not None
        checked = []
        for i, table in enumerate(value):
            inner = f"{where}[{i}]"
            if not isinstance(table, dict):
                raise ConfigError(f"{inner}: expected a table, got {shown(table)}")
            checked.append({**self.schema.defaults(), **self.schema.check(table, inner)})
        return checked


class Schema:
    """The keys a settings file (or a table in it) may hold. Unknown keys are refused;
    keys are checked in the order given, so the first bad one is the one reported."""

    def __init__(self, *keys: Key):
        self.keys = {key.name: key for key in keys}

    @property
    def names(self) -> frozenset[str]:
        return frozenset(self.keys)

    def defaults(self) -> dict[str, Any]:
        """Every key that has a default, with a fresh copy of it."""
        return {name: (type(key.default)(key.default) if isinstance(key.default, (list, dict))
                       else key.default)
                for name, key in self.keys.items() if key.default is not None}

    def check(self, values: dict[str, Any], where: str = "") -> dict[str, Any]:
        """The values given, each converted by its key; ConfigError ("where.key:
        expected ..., got ...") for the first that is unknown, missing or wrong."""
        prefix = f"{where}: " if where else ""
        unknown = sorted(set(values) - set(self.keys))
        if unknown:
            raise ConfigError(f"{prefix}unknown setting(s): "
                              f"{', '.join(key_text(k) for k in unknown)}")
        checked: dict[str, Any] = {}
        for name, key in self.keys.items():
            if name in values:
                checked[name] = key.load(values[name], f"{where}.{name}" if where else name)
            elif key.required:
                raise ConfigError(f"{prefix}missing key {name!r}")
        return checked


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


def read_json_state(path: str, max_bytes: int = MAX_STATE_FILE) -> dict[str, Any] | None:
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
    except RecursionError:
        raise ConfigError(f"{path}: not valid JSON: nested too deeply") from None
    if not isinstance(value, dict):
        raise ConfigError(f"{path}: not a JSON object")
    return value


def merge(file_values: dict[str, Any], flags: dict[str, Any]) -> dict[str, Any]:
    """CLI flags (those given, i.e. not None) override values from a file."""
    merged = dict(file_values)
    merged.update({k: v for k, v in flags.items() if v is not None})
    return merged
