"""The man pages and protocol docs against the code, so that neither drifts alone.

- Every long option of every command in the click trees of ``bmigrate`` and ``breqd``
  is documented in its man page, and every option the page documents exists. In
  man/bmigrate.1 each command has its own ``.SS`` subsection under OPTIONS, titled with
  its full path (``.SS "bmigrate track add"``), and its options must appear there; the
  help option and the shared ones are also described under ``.SS "Common options"``.
- Every command appears in the SYNOPSIS.
- The EXIT_* codes of bmig.errors are unique and are exactly the codes listed under
  EXIT STATUS in man/bmigrate.1 (plus 130, interrupted).
- Every error class has a wire code of its own, and docs/control-protocol.md lists them.
- The fields of ``bmigrate track status --json`` and breqd's settings keys are documented.
- Every page in man/ has a SECURITY section.

Roff is compared after removing font escapes and backslashes, so ``\\-\\-chunk\\-size``
reads as ``--chunk-size``.
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import click
import pytest

import bmig
import bmig.errors
from bmig.cli.breqd import KEYS as BREQD_KEYS
from bmig.cli.breqd import breqd
from bmig.cli.main import cli
from bmig.cli.breceive import KEYS as BRECEIVE_KEYS
from bmig.cli.breceive import breceive
from bmig.cli.nbd import TOP_KEYS as NBD_KEYS
from bmig.cli.nbd import nbd
from bmig.cli.dm import dm
from bmig.errors import BY_WIRE_CODE, BmigError

ROOT = Path(__file__).resolve().parents[2]
BMIGRATE_PAGE = ROOT / "man" / "bmigrate.1"
BREQD_PAGE = ROOT / "man" / "breqd.8"
NBD_PAGE = ROOT / "man" / "bmig-nbd.8"
BRECEIVE_PAGE = ROOT / "man" / "breceive.8"
DM_PAGE = ROOT / "man" / "bmig-dm.8"
CONTROL_DOC = ROOT / "docs" / "control-protocol.md"
WIRE_DOC = ROOT / "docs" / "wire-protocol.md"
INTERRUPTED = 130  # bmig.cli.common.run: Ctrl-C

_FONT = re.compile(r"\\f(\[[^\]]*\]|\(..|.)")


# -- reading roff ---------------------------------------------------------------------

_MACRO = re.compile(r"^\.[A-Za-z]+[ \t]*", re.MULTILINE)


def plain(roff: str) -> str:
    """Roff as a reader sees the words: no macro names, font escapes, backslashes or quotes."""
    text = _FONT.sub("", _MACRO.sub("", roff)).replace("\\", "").replace('"', " ")
    return re.sub(r"[ \t]+", " ", text)


def split(lines: list[str], macro: str) -> dict[str, list[str]]:
    """Lines of each ``.SH`` or ``.SS`` part, keyed by its plain title."""
    parts: dict[str, list[str]] = {}
    current: list[str] | None = None
    for line in lines:
        if line.startswith(macro + " ") or line == macro:
            title = plain(line[len(macro):]).strip()
            current = parts.setdefault(title, [])
        elif current is not None:
            current.append(line)
    return parts


def sections(page: Path) -> dict[str, list[str]]:
    return split(page.read_text().splitlines(), ".SH")


def mentions(lines: list[str], word: str) -> bool:
    """``word`` appears as a whole option or command name (not inside a longer one)."""
    pattern = r"(?<![\w-])" + re.escape(word) + r"(?![\w-])"
    return re.search(pattern, plain("\n".join(lines))) is not None


def tags(lines: list[str]) -> list[str]:
    """The tag line of every ``.TP`` item, as plain text."""
    return [plain(lines[i + 1]).strip() for i, line in enumerate(lines[:-1])
            if line.strip() == ".TP"]


def long_options(text: str) -> set[str]:
    return set(re.findall(r"(?<![\w-])--[a-z0-9][a-z0-9-]*", text))


# -- walking the click trees ----------------------------------------------------------

def walk(command: click.Command, name: str, parent: click.Context | None = None):
    """(path, command, context) for ``command`` and every command below it."""
    ctx = click.Context(command, info_name=name, parent=parent, **command.context_settings)
    yield ctx.command_path, command, ctx
    if isinstance(command, click.Group):
        for sub_name in sorted(command.list_commands(ctx)):
            yield from walk(command.get_command(ctx, sub_name), sub_name, ctx)


def options_of(command: click.Command, ctx: click.Context) -> tuple[set[str], set[str]]:
    """(long options, long names of the help option) of ``command``."""
    help_option = command.get_help_option(ctx)
    help_names = {o for o in (help_option.opts if help_option else []) if o.startswith("--")}
    found: set[str] = set()
    for param in command.get_params(ctx):
        if isinstance(param, click.Option) and param is not help_option:
            found |= {o for o in param.opts + param.secondary_opts if o.startswith("--")}
    return found, help_names


BMIGRATE_COMMANDS = list(walk(cli, "bmigrate"))
# Options every command has (bmig.cli.common.add_verbosity): described once, under
# Common options, rather than under each command.
EVERYWHERE = {"--verbose", "--quiet"}
BREQD_COMMANDS = list(walk(breqd, "breqd"))


def test_the_trees_have_what_the_pages_describe():
    paths = [path for path, _, _ in BMIGRATE_COMMANDS]
    for expected in ("bmigrate track add", "bmigrate track remove", "bmigrate track list",
                     "bmigrate track status", "bmigrate track set-dirty",
                     "bmigrate track clear"):
        assert expected in paths
    assert [path for path, _, _ in BREQD_COMMANDS] == ["breqd"]


@pytest.mark.parametrize("path,command,ctx", BMIGRATE_COMMANDS,
                         ids=[p for p, _, _ in BMIGRATE_COMMANDS])
def test_every_bmigrate_option_is_documented_under_its_command(path, command, ctx):
    options = split(sections(BMIGRATE_PAGE)["OPTIONS"], ".SS")
    assert path in options, f'man/bmigrate.1 has no .SS "{path}" under OPTIONS'
    own, help_names = options_of(command, ctx)
    missing = sorted(o for o in own - EVERYWHERE if not mentions(options[path], o))
    assert not missing, f"man/bmigrate.1, {path}: undocumented option(s) {missing}"
    for name in help_names | (own & EVERYWHERE):
        assert mentions(options["Common options"], name), \
            f"man/bmigrate.1: {name} is not under Common options"


@pytest.mark.parametrize("path,command,ctx", BMIGRATE_COMMANDS,
                         ids=[p for p, _, _ in BMIGRATE_COMMANDS])
def test_every_bmigrate_option_the_page_documents_exists(path, command, ctx):
    options = split(sections(BMIGRATE_PAGE)["OPTIONS"], ".SS")
    own, help_names = options_of(command, ctx)
    documented = set().union(*(long_options(tag) for tag in tags(options.get(path, []))))
    extra = sorted(documented - own - help_names)
    assert not extra, f"man/bmigrate.1, {path}: documents options it does not have: {extra}"


def test_common_bmigrate_options_exist():
    common = split(sections(BMIGRATE_PAGE)["OPTIONS"], ".SS")["Common options"]
    everywhere: set[str] = set()
    for _, command, ctx in BMIGRATE_COMMANDS:
        own, help_names = options_of(command, ctx)
        everywhere |= own | help_names
    documented = set().union(*(long_options(tag) for tag in tags(common)))
    assert documented and documented <= everywhere, sorted(documented - everywhere)


@pytest.mark.parametrize("path", [p for p, _, _ in BMIGRATE_COMMANDS])
def test_every_bmigrate_command_is_in_the_synopsis(path):
    assert mentions(sections(BMIGRATE_PAGE)["SYNOPSIS"], path), \
        f"man/bmigrate.1: {path} is not in the SYNOPSIS"


# One page per daemon: (name, click command, page, keys of its --config file).
DAEMONS = [("breqd", breqd, BREQD_PAGE, BREQD_KEYS), ("bmig-nbd", nbd, NBD_PAGE, NBD_KEYS),
           ("breceive", breceive, BRECEIVE_PAGE, BRECEIVE_KEYS),
           ("bmig-dm", dm, DM_PAGE, ())]


@pytest.mark.parametrize("name,command,page_path,keys", DAEMONS, ids=[d[0] for d in DAEMONS])
def test_every_daemon_option_is_documented_and_nothing_else(name, command, page_path, keys):
    page = sections(page_path)
    (_, command, ctx), = list(walk(command, name))
    own, help_names = options_of(command, ctx)
    missing = sorted(o for o in own | help_names if not mentions(page["OPTIONS"], o))
    assert not missing, f"{page_path.name}: undocumented option(s) {missing}"
    missing = sorted(o for o in own if not mentions(page["SYNOPSIS"], o) and o != "--version")
    assert not missing, f"{page_path.name}: option(s) missing from the SYNOPSIS {missing}"
    documented = set().union(*(long_options(tag) for tag in tags(page["OPTIONS"])))
    extra = sorted(documented - own - help_names)
    assert not extra, f"{page_path.name} documents options {name} does not have: {extra}"


@pytest.mark.parametrize("name,command,page_path,keys", DAEMONS, ids=[d[0] for d in DAEMONS])
def test_every_daemon_setting_key_is_documented(name, command, page_path, keys):
    options = sections(page_path)["OPTIONS"]
    missing = sorted(key for key in keys if not mentions(options, key))
    assert not missing, f"{page_path.name}: --config key(s) not documented: {missing}"


# -- exit codes -----------------------------------------------------------------------

def exit_codes() -> dict[str, int]:
    return {name: value for name, value in vars(bmig.errors).items()
            if name.startswith("EXIT_") and isinstance(value, int)}


def test_exit_codes_are_unique():
    codes = exit_codes()
    assert codes
    by_value: dict[int, list[str]] = {}
    for name, value in codes.items():
        by_value.setdefault(value, []).append(name)
    shared = {value: names for value, names in by_value.items() if len(names) > 1}
    assert not shared, f"exit codes used twice: {shared}"
    assert INTERRUPTED not in by_value


def test_every_exit_code_is_in_bmigrate_exit_status():
    listed = tags(sections(BMIGRATE_PAGE)["EXIT STATUS"])
    assert all(t.isdigit() for t in listed), listed
    assert len(listed) == len(set(listed)), f"a code is listed twice: {listed}"
    expected = {str(v) for v in exit_codes().values()} | {str(INTERRUPTED)}
    missing = sorted(expected - set(listed), key=int)
    assert not missing, f"man/bmigrate.1 EXIT STATUS lacks {missing}"
    extra = sorted(set(listed) - expected, key=int)
    assert not extra, f"man/bmigrate.1 EXIT STATUS lists codes the code lacks: {extra}"
    for name, value in exit_codes().items():
        for cls in all_error_classes():
            if cls.exit_code == value:
                break
        else:
            from bmig.sender.precheck import EXIT_OF      # cutover --check's statuses
            assert value in (bmig.errors.EXIT_OK, bmig.errors.EXIT_USAGE,
                             bmig.errors.EXIT_LIVE, *EXIT_OF.values()), \
                f"{name} = {value} is used by no error class"


def test_breqd_exit_status_lists_only_real_codes():
    listed = tags(sections(BREQD_PAGE)["EXIT STATUS"])
    known = {str(v) for v in exit_codes().values()} | {str(INTERRUPTED)}
    assert listed and set(listed) <= known, sorted(set(listed) - known)


# -- security -------------------------------------------------------------------------

@pytest.mark.parametrize("page", sorted((ROOT / "man").iterdir()), ids=lambda p: p.name)
def test_every_page_has_a_security_section(page):
    """What each program authenticates and protects, and what it does not, is written
    down on its page (as OpenSSH and nbdkit document theirs)."""
    security = sections(page).get("SECURITY")
    assert security and len(plain("\n".join(security)).split()) > 50, \
        f"{page.name} has no SECURITY section (or an empty one)"


# -- wire codes -----------------------------------------------------------------------

def all_error_classes() -> list[type[BmigError]]:
    """BmigError and every subclass defined anywhere in the bmig package."""
    for info in pkgutil.walk_packages(bmig.__path__, "bmig."):
        importlib.import_module(info.name)
    seen: list[type[BmigError]] = []
    todo = [BmigError]
    while todo:
        cls = todo.pop()
        if cls not in seen:
            seen.append(cls)
            todo.extend(cls.__subclasses__())
    return seen


def test_wire_codes_are_unique():
    by_code: dict[str, list[str]] = {}
    for cls in all_error_classes():
        by_code.setdefault(cls.__dict__.get("wire_code", ""), []).append(
            f"{cls.__module__}.{cls.__qualname__}")
    assert "" not in by_code, f"error classes without a wire code of their own: {by_code['']}"
    shared = {code: names for code, names in by_code.items() if len(names) > 1}
    assert not shared, f"wire codes used twice: {shared}"


def test_every_error_of_bmig_errors_can_be_rebuilt_from_its_wire_code():
    for code, cls in BY_WIRE_CODE.items():
        assert cls.wire_code == code
    defined = [cls for _, cls in inspect.getmembers(bmig.errors, inspect.isclass)
               if issubclass(cls, BmigError) and cls.__module__ == "bmig.errors"]
    missing = sorted(cls.__name__ for cls in defined if BY_WIRE_CODE.get(cls.wire_code) is not cls)
    assert not missing, f"not in bmig.errors.BY_WIRE_CODE: {missing}"


def test_every_wire_code_is_in_a_protocol_doc():
    text = CONTROL_DOC.read_text() + WIRE_DOC.read_text()
    missing = sorted(code for code in BY_WIRE_CODE if f"`{code}`" not in text)
    assert not missing, f"docs/control-protocol.md and wire-protocol.md lack {missing}"


# -- JSON output ----------------------------------------------------------------------

def test_every_status_field_is_in_json_output(tmp_path):
    from bmig.tracker.tracked import TrackedDevice
    from bmig.tracker.definitions import DeviceDefinition
    from bmig.tracker.sessions import Sessions

    with ThreadPoolExecutor(1) as executor:
        device = TrackedDevice(DeviceDefinition("d", 1 << 20, 4096, 1), str(tmp_path), executor)
        fields = set(device.stats()) | {"intercept"}     # added by bmigrate track status
        fields |= set(Sessions(None).slot("d"))           # breqd adds the sender slot
        device.bitmap.close(clean=True)
    lines = sections(BMIGRATE_PAGE)["JSON OUTPUT"]
    status_part = lines[:next((i for i, line in enumerate(lines) if line.startswith(".SS")),
                              len(lines))]
    documented = set(tags(status_part))
    missing = sorted(fields - documented)
    assert not missing, f"man/bmigrate.1 JSON OUTPUT lacks field(s) {missing}"
    extra = sorted(documented - fields)
    assert not extra, f"man/bmigrate.1 JSON OUTPUT documents unknown field(s) {extra}"


def test_every_migration_file_key_is_documented():
    from bmig.sender.settings import KEYS

    section = sections(BMIGRATE_PAGE)["MIGRATION FILES"]
    missing = sorted(key for key in KEYS if not mentions(section, key))
    assert not missing, f"man/bmigrate.1 MIGRATION FILES lacks {missing}"


def test_every_summary_field_is_in_json_output():
    from bmig.sender.converge import Summary

    fields = set(Summary("d", "t").to_json()) - {"event"}
    text = "\n".join(sections(BMIGRATE_PAGE)["JSON OUTPUT"])
    missing = sorted(f for f in fields if not mentions(text.splitlines(), f))
    assert not missing, f"man/bmigrate.1 JSON OUTPUT lacks summary field(s) {missing}"


def _subsection(title: str) -> list[str]:
    return split(sections(BMIGRATE_PAGE)["JSON OUTPUT"], ".SS")[title]


def test_every_device_status_field_is_in_json_output_and_nothing_else():
    """bmig.devicestate.FIELDS (every part's fields, which status, events and metrics
    show) against man/bmigrate.1's "Device status": a part's field is named by its path
    (``service.lag_bytes``), breqd's by its key."""
    from bmig.devicestate import FIELDS, IDENTITY, PART_ORDER, TRACKER

    expected = set(IDENTITY) | {f.key for f in FIELDS[TRACKER]}
    for part, fields in FIELDS.items():
        if part != TRACKER:
            expected |= {part} | {f"{part}.{f.key}" for f in fields}
    assert set(PART_ORDER) - {TRACKER} <= expected
    documented = set(tags(_subsection("Device status")))
    missing = sorted(expected - documented)
    assert not missing, f"man/bmigrate.1 JSON OUTPUT, Device status lacks {missing}"
    extra = sorted(documented - expected)
    assert not extra, f"man/bmigrate.1 JSON OUTPUT, Device status documents {extra}, " \
                      "which bmig.devicestate.FIELDS does not declare"


def test_every_state_word_is_documented():
    """The words a declared state field may take are in its entry."""
    from bmig.devicestate import FIELDS, TRACKER

    lines = _subsection("Device status")
    entries: dict[str, str] = {}
    for i, line in enumerate(lines[:-1]):
        if line.strip() == ".TP":
            end = next((j for j in range(i + 2, len(lines)) if lines[j].strip() == ".TP"),
                       len(lines))
            entries[plain(lines[i + 1]).strip()] = plain("\n".join(lines[i + 2:end]))
    for part, fields in FIELDS.items():
        for f in fields:
            path = f.key if part == TRACKER else f"{part}.{f.key}"
            for word, _ in f.states:
                assert word in entries[path], f"man/bmigrate.1: {path} lacks {word!r}"


def test_every_event_field_is_in_json_output():
    from bmig.devicestate import event

    fields = set(event("change", "d", "service", {"state": "x"}, 0.0, changed={})) \
        - {"event"}
    for title in ("Events of bmigrate events", "Events of sync and run"):
        text = _subsection(title)
        missing = sorted(f for f in fields if not mentions(text, f))
        assert not missing, f"man/bmigrate.1 JSON OUTPUT, {title} lacks {missing}"
    for kind in ("exists", "create", "change", "destroy", "error"):
        assert kind in tags(_subsection("Events of bmigrate events")), kind
    for kind in ("change", "status"):
        assert kind in tags(_subsection("Events of sync and run")), kind
    for extra in ("period_seconds", "passes", "committed_bytes"):
        assert mentions(_subsection("Events of sync and run"), extra), extra


def test_every_inner_part_a_producer_sends_is_declared():
    """An object inside a part is a part of its own (``nbd.ha``): what bmig-nbd's manage
    status carries under ``ha`` (its HA_FIELDS) is declared field by field, and every
    state the HA replication enters is one of its declared words, so status, events and
    metrics show it with its kind and severity, and the man page documents it (the
    tests above check FIELDS, inner parts included, against the page)."""
    from bmig.devicestate import FIELDS, Kind, declared
    from bmig.nbd.manage import HA_FIELDS
    from bmig.sender.ha import STATES

    assert "nbd.ha" in FIELDS
    assert {f.key for f in FIELDS["nbd.ha"]} == set(HA_FIELDS)
    state = declared("nbd.ha", "state")
    assert state is not None and state.kind is Kind.STATE
    assert {word for word, _ in state.states} == set(STATES)
    assert state.severity("degraded") == "warning"
    assert declared("nbd.ha", "since").kind is Kind.TIME
    assert declared("nbd.ha", "retry_in").kind is Kind.SECONDS
    # One spelling: the HA replication's words are those of the other parts.
    assert "catching up" in STATES
    assert "catching up" in dict(declared("service", "state").states)
