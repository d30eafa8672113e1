"""bmig.toml(5) against the schemas of the code, both ways.

Every settings file kind has a section of man/bmig.toml.5 (FILE_KINDS); each key of its
``Schema`` is a ``.TP`` item there, and each item is a key of the schema. The keys of a
nested table (``[targets.EXPORT]``, ``[[export]]``) are items of the ``.SS`` named after
the table. Each item says what the key takes in the words of the key's error (Type:),
its default as TOML, "none", or "Required.", and an example line that the key accepts.
Every ``Schema`` the bmig package defines belongs to a section, and every example in the
page and in daemons/examples/ loads as its kind.
"""

from __future__ import annotations

import importlib
import pkgutil
import re
import tomllib
from pathlib import Path
from typing import Any

import pytest

import bmig
from bmig.cli import breceive, breqd, nbd
from bmig.config import Key, Schema
from bmig.sender import settings
from bmig.tracker import definitions
from tests.docs import roff

ROOT = Path(__file__).resolve().parents[2]
PAGE = ROOT / "man" / "bmig.toml.5"
EXAMPLES = ROOT / "daemons" / "examples"

# Each file kind: its section of the page, its schema, and the path under /etc/bmig
# its files have (by which the examples name their kind).
FILE_KINDS = [
    ("BREQD SETTINGS", breqd.SCHEMA, "/etc/bmig/breqd.toml"),
    ("BRECEIVE SETTINGS", breceive.SCHEMA, "/etc/bmig/breceive.toml"),
    ("BMIG-NBD SETTINGS", nbd.SCHEMA, "/etc/bmig/nbd/"),
    ("DEVICE DEFINITIONS", definitions.SCHEMA, "/etc/bmig/devices.d/"),
    ("MIGRATION FILES", settings.SCHEMA, "/etc/bmig/migrate.d/"),
]
IDS = [kind[0] for kind in FILE_KINDS]


def page_sections() -> dict[str, list[str]]:
    return roff.split(PAGE.read_text().splitlines(), ".SH")[1]


def nested(schema: Schema) -> dict[str, Schema]:
    """The keys of ``schema`` that hold tables, and the schema of those tables."""
    return {name: key.schema for name, key in schema.keys.items()
            if isinstance(getattr(key, "schema", None), Schema)}


def table_name(title: str) -> str:
    """The key an .SS title names: "[targets.EXPORT] tables" -> "targets"."""
    match = re.match(r"\[+([A-Za-z0-9_]+)", title)
    assert match, f"bmig.toml(5): .SS {title!r} names no table"
    return match.group(1)


def documented(section: str) -> list[tuple[Schema, list[roff.Item], str]]:
    """(schema, its items, where) for a section and each table of it."""
    schema = {kind[0]: kind[1] for kind in FILE_KINDS}[section]
    assert section in page_sections(), f"bmig.toml(5) has no section {section!r}"
    head, tables = roff.split(page_sections()[section], ".SS")
    found = [(schema, roff.items(head), section)]
    inner = nested(schema)
    for title, lines in tables.items():
        name = table_name(title)
        assert name in inner, f"bmig.toml(5), {section}: .SS {title!r} is no table key"
        found.append((inner[name], roff.items(lines), f"{section}, {title}"))
    missing = sorted(set(inner) - {table_name(t) for t in tables})
    assert not missing, f"bmig.toml(5), {section}: no .SS for the table(s) {missing}"
    return found


def key_of(item: roff.Item) -> str:
    return item.tag.split()[0] if item.tag.split() else ""


@pytest.mark.parametrize("section", IDS)
def test_every_key_is_documented_and_nothing_else(section):
    for schema, found, where in documented(section):
        names = [key_of(item) for item in found]
        twice = sorted({n for n in names if names.count(n) > 1})
        assert not twice, f"bmig.toml(5), {where}: documented twice: {twice}"
        missing = sorted(schema.names - set(names))
        assert not missing, f"bmig.toml(5), {where}: undocumented key(s) {missing}"
        extra = sorted(set(names) - schema.names)
        assert not extra, f"bmig.toml(5), {where}: documents key(s) the code lacks: {extra}"


def field(item: roff.Item, label: str) -> list[str]:
    """The text after ``label`` on each body line that starts with it."""
    return [line[len(label):].strip() for line in item.body if line.startswith(label)]


def loaded(key: Key, value: Any) -> Any:
    return key.load(value, key.name)


def check_item(key: Key, item: roff.Item, where: str) -> None:
    where = f"bmig.toml(5), {where}, {key.name}"
    assert item.body and not item.body[0].startswith(("Type:", "Default:", "Required")), \
        f"{where}: no description"

    types = field(item, "Type:")
    assert len(types) == 1, f"{where}: wants one line 'Type: {key.expected}.'"
    said = types[0].rstrip(".")
    assert said == key.expected or said.startswith(key.expected + ";"), \
        f"{where}: the type reads {said!r}; the code says {key.expected!r}"

    defaults = field(item, "Default:")
    required = [line for line in item.body if line.rstrip(".") == "Required"]
    assert len(defaults) + len(required) == 1, \
        f"{where}: wants one line 'Default: VALUE', 'Default: none (...)' or 'Required.'"
    if key.required:
        assert required, f"{where}: the key is required; the page gives a default"
    elif key.default is None:
        assert defaults and re.match(r"none\b", defaults[0]), \
            f"{where}: the key has no default; the page says {defaults or 'Required'}"
    else:
        assert defaults and not re.match(r"none\b", defaults[0]), \
            f"{where}: the default is {key.default!r}; the page says {defaults or 'Required'}"
        try:
            value = tomllib.loads(f"v = {defaults[0]}")["v"]
        except tomllib.TOMLDecodeError:
            raise AssertionError(f"{where}: default {defaults[0]!r} is not a TOML value") from None
        assert loaded(key, value) == loaded(key, key.default), \
            f"{where}: the page's default {defaults[0]} is not the code's {key.default!r}"

    examples = field(item, "Example:")
    assert len(examples) == 1, f"{where}: wants one line 'Example: {key.name} = ...'"
    try:
        values = tomllib.loads(examples[0])
    except tomllib.TOMLDecodeError as exc:
        raise AssertionError(f"{where}: example {examples[0]!r} is not TOML: {exc}") from None
    assert list(values) == [key.name], f"{where}: the example sets {list(values)}"
    loaded(key, values[key.name])       # a ConfigError here: the example is refused


@pytest.mark.parametrize("section", IDS)
def test_every_key_has_its_type_default_and_an_example(section):
    for schema, found, where in documented(section):
        for item in found:
            if key_of(item) in schema.keys:
                check_item(schema.keys[key_of(item)], item, where)


def schemas_in(schema: Schema) -> list[Schema]:
    return [schema] + [s for inner in nested(schema).values() for s in schemas_in(inner)]


def test_every_schema_of_the_code_has_a_section():
    covered = {id(s) for kind in FILE_KINDS for s in schemas_in(kind[1])}
    found = []
    for info in pkgutil.walk_packages(bmig.__path__, "bmig."):
        module = importlib.import_module(info.name)
        found += [f"{info.name}.{name}" for name, value in vars(module).items()
                  if isinstance(value, Schema) and id(value) not in covered]
    assert not found, f"settings file kinds bmig.toml(5) does not describe: {found}"


def kind_of(text: str, where: str) -> tuple[str, Schema]:
    """The file kind whose path the first comment lines name."""
    head = "\n".join(line for line in text.splitlines()[:3] if line.startswith("#"))
    kinds = [(section, schema) for section, schema, path in FILE_KINDS if path in head]
    assert len(kinds) == 1, f"{where}: its first comment names no single kind's path " \
                            f"({[path for _, _, path in FILE_KINDS]})"
    return kinds[0]


def check_file(text: str, where: str) -> None:
    section, schema = kind_of(text, where)
    values = tomllib.loads(text)
    if schema is definitions.SCHEMA:
        definitions.DeviceDefinition.from_values(values, where)
    else:
        schema.check(values)


def test_the_page_examples_load_as_their_kind():
    blocks = [b for b in roff.examples(page_sections()["EXAMPLES"])]
    assert len(blocks) >= len(FILE_KINDS)
    kinds = set()
    for i, block in enumerate(blocks):
        check_file(block, f"bmig.toml(5) EXAMPLES, block {i + 1}")
        kinds.add(kind_of(block, "")[0])
    assert kinds == set(IDS), f"bmig.toml(5) EXAMPLES lacks {sorted(set(IDS) - kinds)}"


@pytest.mark.parametrize("path", sorted(EXAMPLES.glob("*.toml")), ids=lambda p: p.name)
def test_the_example_files_load_as_their_kind(path):
    check_file(path.read_text(), f"daemons/examples/{path.name}")


def test_there_is_an_example_file_for_bmig_nbd():
    """bmig-nbd@.service reads /etc/bmig/nbd/NAME.toml: an installation starts from one."""
    kinds = {kind_of(p.read_text(), p.name)[0] for p in EXAMPLES.glob("*.toml")}
    assert "BMIG-NBD SETTINGS" in kinds
