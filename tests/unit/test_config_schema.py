"""The schema mechanism of bmig/config.py: each kind of key takes what it says and
refuses the rest with "KEY: expected ..., got VALUE", nested keys are named by their
path, and load_toml refuses what would make tomllib fail outside its own errors."""

from __future__ import annotations

import math
import time

import pytest

from bmig.config import Key, Schema, key_text, load_settings, load_toml, shown
from bmig.errors import ConfigError

TARGET = Schema(Key.path("path", required=True), Key.boolean("allow_discard", default=False))


def _even(value: str) -> str:
    if len(value) % 2:
        raise ValueError(value)
    return value


def _url(value: str) -> str:
    if not value.startswith("tcp://"):
        raise ConfigError(f"{value!r} is not a tcp:// URL")
    return value


SCHEMA = Schema(
    Key.boolean("flag", default=False),
    Key.integer("count", 1, 1024, default=16),
    Key.number("interval", 0.05, 3600),
    Key.size("window", 4 << 20, default=256 << 20),
    Key.size("chunk", 4096, 16 << 20, power_of_two=True),
    Key.choice("level", ("debug", "info")),
    Key.path("dir"),
    Key.string("even", "an even number of characters", _even),
    Key.string("to", "a URL", _url),
    Key.array("listen", Key.string("listen", '"HOST:PORT"'), default=[]),
    Key.tables("targets", TARGET, _even, "of an even length", default={}),
    Key.table_array("export", TARGET),
)

GOOD = [
    ("flag", True, True), ("flag", False, False),
    ("count", 1, 1), ("count", 1024, 1024),
    ("interval", 0.05, 0.05), ("interval", 3600, 3600.0), ("interval", 2, 2.0),
    ("window", 4 << 20, 4 << 20), ("window", "4M", 4 << 20), ("window", "1TiB", 1 << 40),
    ("chunk", "64K", 65536), ("chunk", 4096, 4096), ("chunk", "16M", 16 << 20),
    ("level", "info", "info"),
    ("dir", "/var/lib/bmig", "/var/lib/bmig"),
    ("even", "ab", "ab"),
    ("to", "tcp://h:1/x", "tcp://h:1/x"),
    ("listen", [], []), ("listen", ["a:1", "b:2"], ["a:1", "b:2"]),
    ("targets", {"vm": {"path": "/x"}}, {"vm": {"path": "/x", "allow_discard": False}}),
    ("export", [{"path": "/x", "allow_discard": True}], [{"path": "/x", "allow_discard": True}]),
]


@pytest.mark.parametrize("key,value,converted", GOOD,
                         ids=[f"{k}={v!r}" for k, v, _ in GOOD])
def test_a_good_value_is_taken_and_converted(key, value, converted):
    assert SCHEMA.check({key: value}) == {key: converted}


BAD = [
    # TOML booleans only: a string or a number is not a boolean.
    ("flag", "false", 'flag: expected true or false, got "false"'),
    ("flag", 0, "flag: expected true or false, got 0"),
    # Integers: not strings, not booleans (bool is an int in Python), not floats, in range.
    ("count", "abc", 'count: expected an integer from 1 to 1024, got "abc"'),
    ("count", "16", 'count: expected an integer from 1 to 1024, got "16"'),
    ("count", True, "count: expected an integer from 1 to 1024, got true"),
    ("count", 16.0, "count: expected an integer from 1 to 1024, got 16.0"),
    ("count", 0, "count: expected an integer from 1 to 1024, got 0"),
    ("count", 1025, "count: expected an integer from 1 to 1024, got 1025"),
    ("count", 1 << 64, "count: expected an integer from 1 to 1024, got 18446744073709551616"),
    ("interval", math.nan, "interval: expected a number from 0.05 to 3600, got nan"),
    ("interval", math.inf, "interval: expected a number from 0.05 to 3600, got inf"),
    ("interval", False, "interval: expected a number from 0.05 to 3600, got false"),
    ("interval", "1", 'interval: expected a number from 0.05 to 3600, got "1"'),
    ("interval", 0, "interval: expected a number from 0.05 to 3600, got 0"),
    # Sizes: an integer or a string with a unit, in range.
    ("window", "1K", 'window: expected a size of at least 4M in bytes'),
    ("window", True, "window: expected a size of at least 4M in bytes"),
    ("window", 4.5, "window: expected a size of at least 4M in bytes"),
    ("window", "ten", 'got "ten"'),
    ("window", "٤M", "window: expected a size"),           # digits, but not ASCII ones
    ("chunk", "3K", "chunk: expected a size from 4K to 16M, a power of two, in bytes"),
    ("chunk", "32M", "chunk: expected a size from 4K to 16M, a power of two,"),
    ("chunk", -4096, "got -4096"),
    ("level", "INFO", 'level: expected one of "debug", "info", got "INFO"'),
    ("level", 1, "level: expected one of"),
    # Paths: a non-empty string without NUL (no file name holds one).
    ("dir", "", 'dir: expected a path (a non-empty string), got ""'),
    ("dir", "a\0b", r'dir: expected a path (a non-empty string), got "a\u0000b"'),
    ("dir", 5, "dir: expected a path (a non-empty string), got 5"),
    ("dir", ["/x"], "dir: expected a path (a non-empty string), got an array"),
    ("dir", {"a": 1}, "dir: expected a path (a non-empty string), got a table"),
    ("even", "abc", 'even: expected an even number of characters, got "abc"'),
    # A check's own ConfigError says what is wrong, after the key.
    ("to", "udp://x", "to: 'udp://x' is not a tcp:// URL"),
    # Arrays: an array, of elements of the right type, each named by its index.
    ("listen", "h:p", 'listen: expected an array, each element "HOST:PORT", got "h:p"'),
    ("listen", ["a:1", 2], 'listen[1]: expected "HOST:PORT", got 2'),
    # Tables of tables: each named by its path; their keys checked like the top's.
    ("targets", ["x"], "targets: expected a table of [targets.NAME] tables, got an array"),
    ("targets", {"vm": "x"}, 'targets.vm: expected a table, got "x"'),
    ("targets", {"abc": {"path": "/x"}}, 'targets: expected names of an even length, got "abc"'),
    ("targets", {"vm": {"path": "/x", "allow_discard": "false"}},
     'targets.vm.allow_discard: expected true or false, got "false"'),
    ("targets", {"vm": {"allow_discard": True}}, "targets.vm: missing key 'path'"),
    ("targets", {"vm": {"path": "/x", "size": 1}}, "targets.vm: unknown setting(s): size"),
    ("targets", {"a.b!": {"path": 5}}, 'targets."a.b!".path: expected a path'),
    ("export", {"path": "/x"}, "export: expected an array of [[export]] tables, got a table"),
    ("export", [{"path": "/x"}, 5], "export[1]: expected a table, got 5"),
    ("export", [{"path": "/x"}, {"path": 5}], "export[1].path: expected a path"),
]


@pytest.mark.parametrize("key,value,message", BAD, ids=[f"{k}={v!r}" for k, v, _ in BAD])
def test_a_bad_value_is_one_line_naming_the_key_and_what_it_takes(key, value, message):
    with pytest.raises(ConfigError) as refused:
        SCHEMA.check({key: value})
    assert message in refused.value.message
    assert refused.value.message.startswith(key)
    assert "\n" not in refused.value.message


def test_unknown_keys_are_refused_and_shown_on_one_line():
    with pytest.raises(ConfigError, match="unknown setting\\(s\\): colour, count2"):
        SCHEMA.check({"colour": 1, "count2": 2, "count": 3})
    with pytest.raises(ConfigError) as refused:
        SCHEMA.check({"a\nb": 1})
    assert refused.value.message == r'unknown setting(s): "a\u000ab"'


def test_the_first_bad_key_in_schema_order_is_the_one_reported():
    with pytest.raises(ConfigError, match="^flag:"):
        SCHEMA.check({"count": 0, "flag": 1})


def test_defaults_are_fresh_copies():
    defaults = SCHEMA.defaults()
    assert defaults == {"flag": False, "count": 16, "window": 256 << 20, "listen": [],
                        "targets": {}}
    defaults["listen"].append("x")
    assert SCHEMA.defaults()["listen"] == []


def test_load_settings_names_the_file(tmp_path):
    path = tmp_path / "b.toml"
    path.write_text('count = "abc"\n')
    with pytest.raises(ConfigError) as refused:
        load_settings(str(path), SCHEMA)
    assert refused.value.message == f'{path}: count: expected an integer from 1 to 1024, got "abc"'
    path.write_text('count = 4\nwindow = "8M"\n[targets.vm]\npath = "/x"\n')
    assert load_settings(str(path), SCHEMA) == {
        "count": 4, "window": 8 << 20, "targets": {"vm": {"path": "/x", "allow_discard": False}}}


@pytest.mark.parametrize("value,text", [
    ("a\x1b[31m\u202e", r'"a\u001b[31m\u202e"'),    # no escape or bidi control reaches a tty
    ('q"\\', r'"q\"\\"'),
    ("x" * 100, '"' + "x" * 60 + '..."'),
    (10 ** 50, "an integer of more than 40 digits"),
    (-1.5, "-1.5"),
])
def test_values_are_shown_short_and_on_one_line(value, text):
    assert shown(value) == text


def test_keys_are_shown_bare_when_they_can_be():
    assert key_text("allow_discard") == "allow_discard"
    assert key_text("a.b") == '"a.b"'


# -- what tomllib itself does not survive ----------------------------------------------

@pytest.mark.parametrize("text,words", [
    ("a = " + "1" * 5000, "not valid TOML"),                        # ValueError in tomllib
    ("a = " + "[" * 5000 + "]" * 5000, "nested too deeply"),        # RecursionError
    ("a = " + "{b=" * 5000 + "1" + "}" * 5000, "nested too deeply"),
    ("a." * 5000 + "b = 1", "dotted key"),   # 0.1 GB to parse; 1.5 GB at 20,000 parts
    ('x = {' + '"k".' * 40 + 'z = 1}', "dotted key"),
], ids=["huge-integer", "deep-arrays", "deep-tables", "deep-dotted-key", "quoted-dotted-key"])
def test_what_tomllib_would_fail_on_is_a_config_error(tmp_path, text, words):
    path = tmp_path / "x.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=words):
        load_toml(str(path))


def test_dotted_keys_of_up_to_32_parts_are_read(tmp_path):
    path = tmp_path / "x.toml"
    path.write_text("a." * 31 + "b = 1\n" + 'c = "1.2.3.4:5"\n')
    assert load_toml(str(path))["c"] == "1.2.3.4:5"


@pytest.mark.parametrize("text", [
    '"\\' * (1 << 19), "\\\"" * (1 << 19), 'a."' * (1 << 18), "a" + " " * (1 << 20) + ".",
    ("a." * 31 + "b=1\n") * (1 << 14), ('"' + "x" * 30000 + '".') * 31 + "b",
], ids=["quote-backslash", "backslash-quote", "dot-quote", "spaces", "many-chains", "long-parts"])
def test_the_dotted_key_check_is_linear(tmp_path, text):
    """A megabyte of the worst text found takes well under a second (a quadratic search
    would take minutes); the bound is loose for a loaded machine."""
    path = tmp_path / "x.toml"
    path.write_text(text)
    start = time.monotonic()
    try:
        load_toml(str(path))
    except ConfigError:
        pass
    assert time.monotonic() - start < 10


# -- the examples the tree ships ------------------------------------------------------

def test_the_example_files_load():
    """daemons/examples/ is where an installation starts: each file loads as its kind."""
    from pathlib import Path

    from bmig.cli import breceive, breqd
    from bmig.tracker.definitions import DeviceDefinition

    examples = Path(__file__).resolve().parents[2] / "daemons" / "examples"
    assert load_settings(str(examples / "breqd.toml"), breqd.SCHEMA)["socket_mode"] == "0600"
    got = load_settings(str(examples / "breceive.toml"), breceive.SCHEMA)
    assert got["targets"]["vm1"] == {"path": "/dev/vg0/vm1", "allow_discard": False,
                                     "allow_discard_primary": False}
    assert DeviceDefinition.load(str(examples / "vm1.toml")).size == 20 << 30


def test_the_migration_file_of_the_manual_loads(tmp_path):
    from bmig.sender import settings as sync

    path = tmp_path / "vm1.toml"
    path.write_text('name = "vm1"\nsource = "/dev/vg0/vm1"\n'
                    'to = "tls://backup.example.com:10810/vm1"\n'
                    'tls_ca = "/etc/bmig/tls/ca-cert.pem"\nsecret_file = "/etc/bmig/secret"\n'
                    'bwlimit = "200M"\nlevel = 1\n')
    assert load_settings(str(path), sync.SCHEMA)["bwlimit"] == "200M"
