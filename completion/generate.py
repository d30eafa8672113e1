#!/usr/bin/env python3
"""Shell completion for bmig's commands, written from their click trees.

    generate.py bash FILE    # for bash-completion: one file, linked under every command name
    generate.py zsh FILE     # _bmigrate, for a directory in zsh's fpath

``make install`` runs it with the interpreter of the installed commands, so the
completion knows exactly the commands and options installed; nothing generated is kept
in the tree. Commands, subcommands, options and choices come from the trees; the values
of options and arguments are completed by kind: files, directories, choices, or the
names of the devices breqd tracks (``bmigrate track list``, asked at completion time
with the ``--control`` socket given on the line, or BMIG_CONTROL). The shell functions
themselves are in ``bmig.bash`` and ``bmig.zsh`` beside this file.
"""

from __future__ import annotations

import argparse
import importlib
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

import click

HERE = Path(__file__).resolve().parent

# Every installed command: its name and the click command its entry point runs.
PROGRAMS = (
    ("bmigrate", "bmig.cli.main", "cli"),
    ("breqd", "bmig.cli.breqd", "breqd"),
    ("breceive", "bmig.cli.breceive", "breceive"),
    ("bmig-nbd", "bmig.cli.nbd", "nbd"),
    ("bmig-dm", "bmig.cli.dm", "dm"),
)

# Kinds of values; any other value is a list of choices.
FILE, DIR, DEVICE, TEXT = "@file", "@dir", "@device", "@text"
# Options whose value is a path, by metavar; DIR is a directory.
FILE_METAVARS = {"FILE", "PATH", "SOCK", "RECORD", "DEV", "DEVICE"}
# Options whose value is a tracked device's name.
DEVICE_OPTIONS = {"--device"}
# Arguments named NAME are tracked devices, except where a command names a new one.
DEVICE_ARGUMENTS = {"name", "names"}
NEW_NAMES = {"bmigrate track add"}


@dataclass
class Option:
    names: list[str]          # every spelling: --json, -h, --no-track
    help: str
    kind: str | None = None   # None: a flag; else what its value is
    metavar: str = ""
    multiple: bool = False


@dataclass
class Argument:
    name: str
    kind: str
    required: bool
    repeated: bool


@dataclass
class Command:
    path: str                                   # "bmigrate track add"
    help: str
    options: list[Option] = field(default_factory=list)
    arguments: list[Argument] = field(default_factory=list)
    subcommands: dict[str, str] = field(default_factory=dict)   # name: short help


def first_sentence(text: str | None) -> str:
    """The first sentence of a help text, on one line."""
    text = " ".join((text or "").split())
    match = re.match(r"(.+?[.!?])(\s|$)", text)
    return (match.group(1) if match else text).rstrip(".")


def choices_kind(choices) -> str:
    words = [str(c) for c in choices]
    bad = [w for w in words if not re.fullmatch(r"[A-Za-z0-9_.:+-]+", w)]
    assert not bad, f"choices a completion word list cannot hold: {bad}"
    return "|".join(words)


def value_kind(param: click.Parameter, path: str) -> str:
    """What a value of ``param`` is: FILE, DIR, DEVICE, TEXT or "a|b|c" choices."""
    if isinstance(param.type, click.Choice):
        return choices_kind(param.type.choices)
    if isinstance(param.type, click.Path):
        return DIR if param.type.dir_okay and not param.type.file_okay else FILE
    if isinstance(param, click.Argument):
        if param.name in DEVICE_ARGUMENTS and path not in NEW_NAMES:
            return DEVICE
        return TEXT
    if set(param.opts) & DEVICE_OPTIONS:
        return DEVICE
    metavar = (param.metavar or "").upper()
    if metavar == "DIR":
        return DIR
    if metavar in FILE_METAVARS:
        return FILE
    return TEXT


def command(cmd: click.Command, ctx: click.Context) -> Command:
    path = ctx.command_path
    found = Command(path, first_sentence(cmd.get_short_help_str(limit=200)))
    for param in cmd.get_params(ctx):
        if isinstance(param, click.Option):
            names = list(param.opts) + list(param.secondary_opts)
            if param.is_flag or param.count:
                found.options.append(Option(names, first_sentence(param.help)))
            else:
                found.options.append(Option(names, first_sentence(param.help),
                                            value_kind(param, path),
                                            param.metavar or param.name.upper(),
                                            param.multiple))
        elif isinstance(param, click.Argument):
            found.arguments.append(Argument(param.name, value_kind(param, path),
                                            param.required, param.nargs == -1))
    if isinstance(cmd, click.Group):
        for name in sorted(cmd.list_commands(ctx)):
            found.subcommands[name] = first_sentence(
                cmd.get_command(ctx, name).get_short_help_str(limit=200))
    return found


def walk(cmd: click.Command, name: str, parent: click.Context | None = None):
    """Every command of a tree, as Command, the root first."""
    ctx = click.Context(cmd, info_name=name, parent=parent, **cmd.context_settings)
    yield command(cmd, ctx)
    if isinstance(cmd, click.Group):
        for sub in sorted(cmd.list_commands(ctx)):
            yield from walk(cmd.get_command(ctx, sub), sub, ctx)


def commands() -> list[Command]:
    """Every command of every program."""
    found: list[Command] = []
    for name, module, attribute in PROGRAMS:
        found += walk(getattr(importlib.import_module(module), attribute), name)
    return found


# -- bash -----------------------------------------------------------------------------

def bash_word(text: str) -> str:
    """A bash single-quoted word."""
    return "'" + text.replace("'", "'\\''") + "'"


def bash(cmds: list[Command]) -> str:
    """The bash-completion file: the data of every command, then bmig.bash's functions."""
    subs, opts, values, args = [], [], [], []
    for c in cmds:
        key = bash_word(c.path)
        if c.subcommands:
            subs.append(f"    [{key}]={bash_word(' '.join(c.subcommands))}")
        opts.append(f"    [{key}]={bash_word(' '.join(n for o in c.options for n in o.names))}")
        for o in c.options:
            if o.kind is not None:
                values += [f"    [{bash_word(c.path + ' ' + n)}]={bash_word(o.kind)}"
                           for n in o.names]
        words = [a.kind for a in c.arguments]
        if c.arguments and c.arguments[-1].repeated:
            words.append("...")
        if words:
            args.append(f"    [{key}]={bash_word(' '.join(words))}")
    data = "\n".join([
        "# bash completion for " + ", ".join(p for p, _, _ in PROGRAMS) + ".",
        "# Written by make install (completion/generate.py) from the installed commands.",
        "",
        "# The subcommands of each command.",
        "declare -gA _bmig_subs=(", *subs, ")",
        "# Every option word of each command.",
        "declare -gA _bmig_opts=(", *opts, ")",
        "# The options that take a value, and what it is: @file, @dir, @device (a tracked",
        "# device), @text, or choices separated by |.",
        "declare -gA _bmig_value=(", *values, ")",
        "# The arguments of each command in order; a last \"...\" repeats the one before.",
        "declare -gA _bmig_args=(", *args, ")",
        "",
    ])
    return (data + "\n" + (HERE / "bmig.bash").read_text() + "\ncomplete -F _bmig_complete "
            + " ".join(p for p, _, _ in PROGRAMS) + "\n")


# -- zsh ------------------------------------------------------------------------------

def zsh_word(text: str) -> str:
    """A zsh single-quoted word."""
    return "'" + text.replace("'", "'\\''") + "'"


def zsh_description(text: str) -> str:
    """An option's description, the [...] of its _arguments spec."""
    return re.sub(r"([\\\[\]])", r"\\\1", text)


def zsh_message(text: str) -> str:
    """A message or name in an _arguments spec (between colons)."""
    return re.sub(r"([\\:])", r"\\\1", text)


def zsh_action(kind: str) -> str:
    if kind == FILE:
        return "_files"
    if kind == DIR:
        return "_files -/"
    if kind == DEVICE:
        return "_bmig_devices"
    if kind == TEXT:
        return " "
    return "(" + " ".join(kind.split("|")) + ")"


def zsh_specs(c: Command) -> list[str]:
    specs = []
    for o in c.options:
        for name in o.names:
            star = "*" if o.multiple else ""
            described = f"{star}{name}"
            if o.kind is not None and name.startswith("--"):
                described += "="
            described += f"[{zsh_description(o.help)}]"
            if o.kind is not None:
                described += f":{zsh_message(o.metavar.lower())}:{zsh_action(o.kind)}"
            specs.append(described)
    for i, a in enumerate(c.arguments):
        position = "*" if a.repeated else str(i + 1)
        colon = ":" if a.required or a.repeated else "::"
        specs.append(f"{position}{colon}{zsh_message(a.name)}:{zsh_action(a.kind)}")
    return specs


def zsh(cmds: list[Command]) -> str:
    """_bmigrate: the data of every command, then bmig.zsh's functions."""
    cases = []
    for c in cmds:
        specs = " ".join(zsh_word(s) for s in zsh_specs(c))
        subs = " ".join(zsh_word(f"{zsh_message(name)}:{help}")
                        for name, help in c.subcommands.items())
        cases.append(f"    ({zsh_word(c.path)})\n      specs=({specs})\n"
                     f"      subs=({subs}) ;;")
    head = "\n".join([
        "#compdef " + " ".join(p for p, _, _ in PROGRAMS),
        "# zsh completion for " + ", ".join(p for p, _, _ in PROGRAMS) + ".",
        "# Written by make install (completion/generate.py) from the installed commands.",
        "",
        "# The _arguments specs and the subcommands of the command path $1.",
        "_bmig_spec() {",
        "  case $1 in",
        *cases,
        "  esac",
        "}",
        "",
    ])
    return head + "\n" + (HERE / "bmig.zsh").read_text()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("shell", choices=("bash", "zsh"))
    parser.add_argument("output", help="the file to write")
    options = parser.parse_args(argv)
    text = (bash if options.shell == "bash" else zsh)(commands())
    tmp = options.output + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.chmod(tmp, 0o644)
    os.replace(tmp, options.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
