"""Random TOML documents for every file kind: keys from its schema (and a few others),
values of every TOML type, nested tables where the schema has them. Each document is
written to a file and read by that kind's loader, then used as the program uses it:
it loads, or it is a ConfigError; never anything else."""

from __future__ import annotations

import copy
import datetime
import math
import os
from typing import Any

import pytest

from hypothesis import HealthCheck, event, given, settings, strategies as st

from bmig.cli import breceive, breqd, nbd
from bmig.cli.common import host_port
from bmig.config import Key, Schema, load_settings, parse_size
from bmig.errors import ConfigError
from bmig.sender import settings as sync
from bmig.sender.converge import SyncSettings
from bmig.sender.passes import PassSettings
from bmig.tracker import definitions as devices
from bmig.wire.urls import parse_target_url

# -- writing TOML ---------------------------------------------------------------------


def toml_string(text: str) -> str:
    """A TOML basic string: quote, backslash and control characters escaped."""
    out = []
    for c in text:
        if c in '"\\':
            out.append("\\" + c)
        elif ord(c) < 0x20 or ord(c) == 0x7F:
            out.append(f"\\u{ord(c):04x}")
        else:
            out.append(c)
    return '"' + "".join(out) + '"'


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return "nan" if math.isnan(value) else "inf" if value == math.inf else \
            "-inf" if value == -math.inf else repr(value)
    if isinstance(value, str):
        return toml_string(value)
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{toml_string(k)} = {toml_value(v)}"
                               for k, v in value.items()) + "}"
    return value.isoformat()        # datetime, date, time


def toml_document(values: dict[str, Any]) -> str:
    return "".join(f"{toml_string(k)} = {toml_value(v)}\n" for k, v in values.items())


# -- random values --------------------------------------------------------------------

# Strings that mean something to some key, so that documents also load.
PLAUSIBLE = ["", "0600", "0777", "0999", "info", "debug", "loud", "64K", "4M", "256M", "1G",
             "3000", "2s", "0.5s", "²s", "-1", "100M/s", "1e3", "127.0.0.1:10810",
             "0.0.0.0:0", "[::1]:1", "h:p", ":", "/tmp/x", "a\0b", "vm1", "a b", ".x",
             "tcp://127.0.0.1:10810/vm1", "ssh://h/vm1", "nbd+unix:///x?socket=/s", "require",
             "on", "off", "paramiko", "openssh", "00000000000000a1", "0000000000000000",
             "true", "false"]

scalars = st.one_of(
    st.booleans(),
    st.integers(-2, 70000),
    st.integers(-(1 << 63), (1 << 63) - 1),
    st.sampled_from([0, 1, 16, 1024, 1025, 4096, 1 << 20, 1 << 60, (1 << 60) + 1]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from(PLAUSIBLE),
    st.text(max_size=20),
    st.datetimes(timezones=st.none() | st.just(datetime.timezone.utc)),
    st.dates(),
    st.times(),
)
values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=3) |
    st.dictionaries(st.sampled_from(["path", "device", "backing", "x"]) | st.text(max_size=5),
                    inner, max_size=3),
    max_leaves=6)


# Candidates for "a value this key takes": those its own check accepts are drawn for
# it most of the time, so that whole documents load too, not only fail.
CANDIDATES = PLAUSIBLE + [0, 1, 16, 64, 1024, 4096, 65536, 1 << 20, 4 << 20, 1 << 30, True,
                          False, 0.5, 1.0, 30, [], ["127.0.0.1:1"], ["0.0.0.0:0", "[::1]:2"]]


def accepted(key: Key) -> list[Any]:
    good = []
    for value in CANDIDATES:
        try:
            key.load(value, key.name)
        except Exception:       # what the tests below look for; here only a selection
            continue
        good.append(value)
    return good


def for_key(key: Key) -> st.SearchStrategy[Any]:
    good = accepted(key)
    return st.one_of(st.sampled_from(good), st.sampled_from(good), values) if good else values


MISSING = object()


def table(schema: Schema, nested: dict[str, st.SearchStrategy] | None = None
          ) -> st.SearchStrategy[dict[str, Any]]:
    """A table with some keys of ``schema``, each with a value it takes two times in
    three (``nested`` for tables of tables), the keys it requires most of the time, and
    now and then a key it does not know."""
    nested = nested or {}
    strategies = {name: nested[name] | values if name in nested else for_key(key)
                  for name, key in schema.keys.items()}
    known = st.fixed_dictionaries(
        {name: st.one_of(strategies[name], strategies[name], strategies[name], st.just(MISSING))
         for name, key in schema.keys.items() if key.required},
        optional={name: strategies[name]
                  for name, key in schema.keys.items() if not key.required})
    unknown = st.dictionaries(st.sampled_from(["colour", "a b"]) | st.text(max_size=4), values,
                              min_size=1, max_size=1)
    return st.tuples(known, st.integers(0, 9), unknown).map(
        lambda t: {k: v for k, v in {**t[0], **(t[2] if t[1] == 0 else {})}.items()
                   if v is not MISSING})


# -- the loaders, and the program's use of what they load ----------------------------

def load_breqd(path: str) -> None:
    got = {**breqd.SCHEMA.defaults(), **load_settings(path, breqd.SCHEMA)}
    breqd._octal(got["socket_mode"])
    os.fsencode(got["state_dir"]), os.fsencode(got["control"])


def load_breceive(path: str) -> None:
    got = {**breceive.SCHEMA.defaults(), **load_settings(path, breceive.SCHEMA)}
    try:
        event(f"{len(breceive._targets(got, (), False))} target(s)")
    except ConfigError as exc:
        assert exc.message.startswith("no targets"), exc
    for address in got["listen"]:
        host_port(address, "--listen", any_port=True)
    assert 1 <= int(got["max_sessions"]) <= 1024


def load_nbd(path: str) -> None:
    got = {**nbd.SCHEMA.defaults(), **load_settings(path, nbd.SCHEMA)}
    if got.get("tcp"):
        host_port(got["tcp"], "--tcp")
    for spec in got["export"]:
        str(spec.get("name") or spec["device"]), bool(spec["read_only"])
        os.fsencode(spec["backing"])
    event(f"{len(got['export'])} export(s)")
    assert isinstance(got["track"], bool) and isinstance(got["read_only"], bool)


def load_migration(path: str) -> None:
    got = sync.settings_from(path, {})
    sync.apply_reloadable(SyncSettings(passes=PassSettings()), got)
    assert parse_size(got["window"]) >= 4 << 20
    if "to" in got:
        parse_target_url(got["to"])


def load_device(path: str) -> None:
    devices.DeviceDefinition.load(path)


GOOD_NAMES = st.sampled_from(["vm1", "vm2", "a.b-c_d"])
TARGETS = st.dictionaries(
    st.one_of(GOOD_NAMES, GOOD_NAMES, st.sampled_from(["a b", ".x", "x" * 65]),
              st.text(max_size=4)),
    st.one_of(table(breceive.TARGET_SCHEMA), table(breceive.TARGET_SCHEMA), values), max_size=2)
EXPORTS = st.lists(st.one_of(table(nbd.EXPORT_SCHEMA), table(nbd.EXPORT_SCHEMA), values),
                   max_size=2)

# A good document of each kind, which ``near`` changes in a key or two (nested ones too):
# the inputs closest to what loads.
VALID: dict[str, dict[str, Any]] = {
    "breqd": {"state_dir": "/tmp/s", "socket_mode": "0640", "log_level": "debug"},
    "breceive": {"listen": ["127.0.0.1:0", "[::1]:10810"], "max_sessions": 4,
                 "targets": {"vm1": {"path": "/tmp/t", "allow_discard": True},
                             "vm2": {"path": "/tmp/u"}}},
    "bmig-nbd": {"tcp": "127.0.0.1:10809", "hold_chunks": 16, "tls": "off",
                 "export": [{"device": "vm1", "backing": "/tmp/b", "read_only": False},
                            {"device": "vm2", "backing": "/tmp/c", "name": "x"}]},
    "migration": {"name": "vm1", "source": "/tmp/s", "to": "tcp://127.0.0.1:10810/vm1",
                  "bwlimit": "100M", "threshold": "2s", "window": "8M", "level": 3,
                  "interval": 0.5, "direct": True, "ssh_program": "openssh"},
    "device": {"name": "device", "size": "16M", "chunk_size": 4096,
               "device_id": "00000000000000a1"},
}


def key_paths(doc: Any, prefix: tuple = ()) -> list[tuple]:
    """Every key of ``doc``, in nested tables and arrays of tables too, as a path."""
    found = []
    items = doc.items() if isinstance(doc, dict) else enumerate(doc)
    for key, value in items:
        if isinstance(doc, dict):
            found.append(prefix + (key,))
        if isinstance(value, (dict, list)):
            found += key_paths(value, prefix + (key,))
    return found


@st.composite
def near(draw: st.DrawFn, kind: str, schema: Schema) -> dict[str, Any]:
    doc = copy.deepcopy(VALID[kind])
    places = key_paths(doc) + [(name,) for name in sorted(schema.names)]
    for _ in range(draw(st.integers(0, 2))):
        path = draw(st.sampled_from(places))
        parent: Any = doc
        for step in path[:-1]:
            if not isinstance(parent, dict) or step not in parent:
                parent = None
                break
            parent = parent[step]
        if isinstance(parent, dict):
            if draw(st.booleans()):
                parent.pop(path[-1], None)
            else:
                parent[path[-1]] = draw(values)
    return doc


def kind(name: str, schema: Schema, nested: dict[str, st.SearchStrategy] | None = None):
    return st.one_of(near(name, schema), table(schema, nested))


KINDS = {
    "breqd": (load_breqd, kind("breqd", breqd.SCHEMA)),
    "breceive": (load_breceive, kind("breceive", breceive.SCHEMA, {"targets": TARGETS})),
    "bmig-nbd": (load_nbd, kind("bmig-nbd", nbd.SCHEMA, {"export": EXPORTS})),
    "migration": (load_migration, kind("migration", sync.SCHEMA)),
    "device": (load_device, kind("device", devices.SCHEMA)),
}

@pytest.fixture(scope="module")
def directory(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("config-fuzz"))


def check_kind(kind: str, data: st.DataObject, directory: str) -> None:
    load, strategy = KINDS[kind]
    doc = data.draw(strategy, label=kind)
    stem = kind
    if kind == "device":     # a definition's file is named after it, when it can be
        name = doc.get("name")
        if isinstance(name, str) and name.strip("./") and "/" not in name and \
                "\0" not in name and len(name.encode()) < 200:
            stem = name
    path = os.path.join(directory, stem + ".toml")
    with open(path, "w", encoding="utf-8") as f:
        f.write(toml_document(doc))
    try:
        load(path)
        event("loaded")
    except ConfigError as exc:
        assert "\n" not in exc.message, exc.message
        event("refused")
    finally:
        os.unlink(path)


FUZZ = settings(max_examples=150, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])


@FUZZ
@given(data=st.data())
def test_breqd_config_loads_or_is_a_config_error(data, directory):
    check_kind("breqd", data, directory)


@FUZZ
@given(data=st.data())
def test_breceive_config_loads_or_is_a_config_error(data, directory):
    check_kind("breceive", data, directory)


@FUZZ
@given(data=st.data())
def test_bmig_nbd_config_loads_or_is_a_config_error(data, directory):
    check_kind("bmig-nbd", data, directory)


@FUZZ
@given(data=st.data())
def test_migration_file_loads_or_is_a_config_error(data, directory):
    check_kind("migration", data, directory)


@FUZZ
@given(data=st.data())
def test_device_definition_loads_or_is_a_config_error(data, directory):
    check_kind("device", data, directory)


def test_a_file_name_with_a_newline_still_gives_a_one_line_error(directory):
    """Found by the fuzzer: a definition named "\\n" (its file "\\n.toml") with a bad value
    made an error of two lines, which splits a log line."""
    path = os.path.join(directory, "\n.toml")
    with open(path, "w", encoding="utf-8") as f:
        f.write('name = "\\n"\nsize = "many"\n')
    with pytest.raises(ConfigError) as caught:
        load_device(path)
    assert "\n" not in caught.value.message and "\\n.toml" in caught.value.message
