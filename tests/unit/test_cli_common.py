"""What every command shares (bmig/cli/common.py) and the sizes they take (bmig/config.py).

- A usage error is one line, ``PROG: message (see COMMAND --help)``, exit 2.
- The log level has one way on each bmigrate command: --log-level on sync, run, cutover
  and replicate (as a migration file's log_level), -v/--verbose and -q/--quiet on the
  others. A daemon takes both, not together.
- After --json, an error is also an "error" event on stdout, with its exit status and
  a time.
- Sizes take a decimal fraction when it comes to whole bytes: 1.5G.
"""

from __future__ import annotations

import json
import logging
import sys

import click
import pytest

from bmig.cli import common
from bmig.cli.breceive import breceive
from bmig.cli.breqd import breqd
from bmig.cli.common import add_verbosity, run
from bmig.cli.dm import dm
from bmig.cli.main import cli
from bmig.cli.nbd import nbd
from bmig.config import parse_size
from bmig.errors import ConfigError, UnreachableError


def leaves(command: click.Command, name: str):
    if isinstance(command, click.Group):
        ctx = click.Context(command, info_name=name)
        for sub_name in command.list_commands(ctx):
            yield from leaves(command.get_command(ctx, sub_name), f"{name} {sub_name}")
    else:
        yield name, command


def run_cli(monkeypatch, capsys, command: click.Command, prog: str, *argv: str):
    """``run`` as a program's main would call it: (exit status, stdout, stderr)."""
    monkeypatch.setattr(sys, "argv", [prog, *argv])
    monkeypatch.setattr(common, "_json_errors", False)
    monkeypatch.setattr(common, "_result_printed", False)
    with pytest.raises(SystemExit) as exited:
        run(command, prog)
    out, err = capsys.readouterr()
    return exited.value.code, out, err


@pytest.mark.parametrize("argv,words", [
    (["sync", "--no-such-flag"], "no such option"),
    (["track", "add"], "missing argument 'NAME'"),
    (["cutover", "d", "--source", "s", "--to", "tcp://h:1/d", "--timeout", "zero"],
     "'zero' is not a valid float"),
    (["track", "add", "d", "--size", "12Q"], "is not a size"),
    (["no-such-command"], "no such command"),
])
def test_a_usage_error_is_one_line(monkeypatch, capsys, argv, words):
    code, out, err = run_cli(monkeypatch, capsys, cli, "bmigrate", *argv)
    assert code == 2 and out == ""
    line, = err.splitlines()
    assert line.startswith("bmigrate: ") and words in line, line
    assert line.endswith(" --help)"), line


COMMANDS = [*leaves(cli, "bmigrate"), ("breqd", breqd), ("bmig-nbd", nbd),
            ("breceive", breceive), ("bmig-dm", dm)]


VERBOSITY = {"-v", "--verbose", "-q", "--quiet"}
# bmigrate's commands with a migration file's log_level (or, cutover, its steps' log):
# --log-level is the one way to say it there.
LOG_LEVEL_COMMANDS = {"bmigrate sync", "bmigrate run", "bmigrate cutover",
                      "bmigrate replicate"}


@pytest.mark.parametrize("name,command", COMMANDS, ids=[n for n, _ in COMMANDS])
def test_every_command_says_its_log_level_one_way(name, command):
    names = {o for p in command.params for o in getattr(p, "opts", [])}
    if name in LOG_LEVEL_COMMANDS:
        assert "--log-level" in names and not names & VERBOSITY, (name, sorted(names))
    elif name.startswith("bmigrate "):
        assert VERBOSITY <= names and "--log-level" not in names, (name, sorted(names))
    else:                      # a daemon: -v/-q stand in for its --log-level
        assert VERBOSITY | {"--log-level"} <= names, (name, sorted(names))


def test_verbose_is_no_option_of_a_command_with_log_level(monkeypatch, capsys):
    code, out, err = run_cli(monkeypatch, capsys, cli, "bmigrate", "sync", "d", "-v")
    assert code == 2 and "no such option '-v'" in err, err


def verbosity_probe(default: str):
    seen: dict = {}

    @click.command()
    @click.option("--log-level")
    def probe(log_level):
        seen["level"] = log_level

    @click.command()
    def bare():
        seen["root"] = logging.getLogger().level

    add_verbosity(probe, default)
    add_verbosity(bare, default)
    return probe, bare, seen


@pytest.mark.parametrize("default,argv,level", [
    ("warning", [], None), ("warning", ["-v"], "info"), ("warning", ["-vv"], "debug"),
    ("warning", ["-vvv"], "debug"), ("warning", ["-q"], "error"),
    ("info", ["-v"], "debug"), ("info", ["-q"], "warning"), ("info", ["-qq"], "error"),
    ("info", ["--log-level", "error"], "error"),
])
def test_verbose_and_quiet_choose_the_log_level(default, argv, level):
    probe, _, seen = verbosity_probe(default)
    probe.main(argv, standalone_mode=False)
    assert seen["level"] == level


def test_a_command_without_log_level_is_set_up_by_verbose():
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    try:
        _, bare, seen = verbosity_probe("warning")
        bare.main(["-vv"], standalone_mode=False)
        assert seen["root"] == logging.DEBUG
    finally:
        root.handlers[:], root.level = handlers, level


def test_verbose_and_log_level_together_are_a_usage_error():
    probe, _, _ = verbosity_probe("warning")
    with pytest.raises(click.UsageError, match="not both"):
        probe.main(["-v", "--log-level", "info"], standalone_mode=False)


def test_an_error_after_json_is_an_error_event(monkeypatch, capsys, tmp_path):
    code, out, err = run_cli(monkeypatch, capsys, cli, "bmigrate", "track", "status",
                             "--json", "--control", str(tmp_path / "none.sock"))
    assert code == UnreachableError.exit_code == 4
    event, = [json.loads(line) for line in out.splitlines()]
    assert event["event"] == "error" and event["exit_code"] == 4
    assert "cannot reach breqd" in event["message"] and event["time"] > 0
    line, = err.splitlines()
    assert line == f"bmigrate: {event['message']}"


def test_an_error_without_json_is_only_a_line(monkeypatch, capsys, tmp_path):
    code, out, err = run_cli(monkeypatch, capsys, cli, "bmigrate", "track", "status",
                             "--control", str(tmp_path / "none.sock"))
    assert code == 4 and out == "" and len(err.splitlines()) == 1


@pytest.mark.parametrize("text,value", [
    ("1.5G", 3 << 29), ("0.5K", 512), (".5K", 512), ("1.25M", 1310720), ("2.0T", 2 << 40),
    ("1.5 GiB", 3 << 29), ("4096", 4096), ("10G", 10 << 30),
])
def test_sizes_take_fractions_that_come_to_whole_bytes(text, value):
    assert parse_size(text) == value


@pytest.mark.parametrize("text", ["1.5", "0.3K", "1.", "1..5G", "1,5G", "-1.5G", "1e3",
                                  "9" * 5000, "1." + "0" * 5000 + "G"])
def test_sizes_that_are_not_whole_bytes_are_refused(text):
    with pytest.raises(ConfigError):
        parse_size(text)
