"""Shell completion (completion/generate.py) against the click trees, in real bash and zsh.

The files are written as make install writes them, into a layout of this test's own,
and loaded as each shell loads them (bash-completion's loader by command name, zsh's
compinit from fpath). Then: every command completes its subcommands and options, choices
complete, paths complete as files, and device names come from a real breqd, asked at the
socket of --control or BMIG_CONTROL.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tomllib
from pathlib import Path

import click
import pytest

from bmig import log as bmig_log
from bmig.cli.main import cli
from bmig.nbd.service import TLS_MODES
from tests.docs import shells

ROOT = Path(__file__).resolve().parents[2]
GENERATE = ROOT / "completion" / "generate.py"
PROGRAMS = sorted(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"])


def write_completion(python: str, share: Path) -> None:
    """What make install does: bash's file, linked under each command's name, and zsh's."""
    bash_dir = share / "bash-completion" / "completions"
    zsh_dir = share / "zsh" / "site-functions"
    bash_dir.mkdir(parents=True)
    zsh_dir.mkdir(parents=True)
    for shell, path in (("bash", bash_dir / "bmigrate"), ("zsh", zsh_dir / "_bmigrate")):
        subprocess.run([python, str(GENERATE), shell, str(path)], check=True, timeout=120)
    for name in PROGRAMS:
        if name != "bmigrate":
            (bash_dir / name).symlink_to("bmigrate")


@pytest.fixture(scope="module")
def share(tmp_path_factory) -> Path:
    share = tmp_path_factory.mktemp("share")
    write_completion(sys.executable, share)
    return share


def env(**extra: str) -> dict[str, str]:
    """bmigrate of this interpreter first in PATH (for the device names)."""
    found = {k: v for k, v in os.environ.items() if k not in ("BMIG_CONTROL", "BMIG_NBD_DIR")}
    found["PATH"] = os.path.dirname(sys.executable) + os.pathsep + found.get("PATH", "/usr/bin")
    found["BMIG_COMPLETION_TIMEOUT"] = "60"     # a loaded machine starts Python slowly
    return found | extra


def bash(share: Path, line: str, **extra: str) -> list[str]:
    if not shells.have_bash_completion():
        pytest.skip("bash-completion is not installed (make test installs it as root)")
    return shells.bash_complete(str(share), line, env(**extra))


def zsh(share: Path, line: str, **extra: str) -> list[str]:
    if not shells.have_zsh():
        pytest.skip("zsh is not installed (make test installs it as root)")
    return shells.zsh_complete(str(share / "zsh" / "site-functions"), line, env(**extra))


COMPLETE = {"bash": bash, "zsh": zsh}


def tree(command: click.Command, name: str, parent: click.Context | None = None):
    ctx = click.Context(command, info_name=name, parent=parent)
    yield ctx.command_path, command, ctx
    if isinstance(command, click.Group):
        for sub in command.list_commands(ctx):
            yield from tree(command.get_command(ctx, sub), sub, ctx)


def long_options(command: click.Command, ctx: click.Context) -> list[str]:
    return sorted(o for p in command.get_params(ctx) if isinstance(p, click.Option)
                  for o in p.opts + p.secondary_opts if o.startswith("--"))


PATHS = [(path, command, ctx) for path, command, ctx in tree(cli, "bmigrate")]


def test_every_program_is_generated():
    import importlib.util
    spec = importlib.util.spec_from_file_location("bmig_completion_generate", GENERATE)
    generate = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = generate          # its dataclasses look their module up
    try:
        spec.loader.exec_module(generate)
    finally:
        del sys.modules[spec.name]
    assert sorted(p for p, _, _ in generate.PROGRAMS) == PROGRAMS


@pytest.mark.parametrize("program", PROGRAMS)
def test_bash_loads_the_completion_of_every_program(share, program):
    assert "--help" in bash(share, f"{program} --he")


@pytest.mark.parametrize("program", PROGRAMS)
def test_zsh_loads_the_completion_of_every_program(share, program):
    assert "--help" in zsh(share, f"{program} --he")


@pytest.mark.parametrize("path,command,ctx", PATHS, ids=[p for p, _, _ in PATHS])
def test_bash_offers_every_subcommand_and_long_option(share, path, command, ctx):
    assert bash(share, f"{path} --") == long_options(command, ctx)
    if isinstance(command, click.Group):
        assert bash(share, f"{path} ") == sorted(command.list_commands(ctx))


@pytest.mark.parametrize("path", ["bmigrate", "bmigrate track", "bmigrate sync",
                                  "bmigrate track set-role"])
def test_zsh_offers_every_subcommand_and_long_option(share, path):
    command, ctx = next((c, x) for p, c, x in PATHS if p == path)
    assert zsh(share, f"{path} --") == long_options(command, ctx)
    if isinstance(command, click.Group):
        assert zsh(share, f"{path} ") == sorted(command.list_commands(ctx))


@pytest.mark.parametrize("shell", COMPLETE)
@pytest.mark.parametrize("line,expected", [
    ("breqd --log-level ", sorted(bmig_log.LEVELS)),
    ("bmig-nbd --tls ", sorted(TLS_MODES)),
    ("bmigrate sync --ssh-program ", ["openssh", "paramiko"]),
    ("bmigrate track set-role vm1 ", ["handed-over", "primary"]),
    ("bmigrate track set-role vm1 pr", ["primary"]),
    ("bmigrate sync --level 3 --js", ["--json"]),
], ids=lambda v: v if isinstance(v, str) else None)
def test_choices(share, shell, line, expected):
    assert COMPLETE[shell](share, line) == expected


@pytest.mark.parametrize("shell", COMPLETE)
def test_paths_complete_as_files(share, shell, tmp_path):
    (tmp_path / "vm1.toml").write_text("")
    offered = COMPLETE[shell](share, f"bmigrate run --config {tmp_path}/vm")
    assert len(offered) == 1 and offered[0].endswith("vm1.toml"), offered


@pytest.mark.parametrize("shell", COMPLETE)
def test_device_names_come_from_breqd(share, shell, breqd):
    with breqd.client() as client:
        client.add_device("vm1", 1 << 20)
        client.add_device("db.2", 1 << 20)
    complete = COMPLETE[shell]
    names = ["db.2", "vm1"]
    assert complete(share, "bmigrate status ", BMIG_CONTROL=breqd.control) == names
    assert complete(share, "bmigrate sync v", BMIG_CONTROL=breqd.control) == ["vm1"]
    assert complete(share, f"bmigrate track status --control {breqd.control} ") == names
    assert complete(share, f"bmig-nbd --control={breqd.control} --device ") == names
    assert complete(share, f"bmig-dm --control {breqd.control} vm1 ") == names
    # A new device's name is not one breqd knows; and no breqd, no names.
    assert complete(share, "bmigrate track add ", BMIG_CONTROL=breqd.control) == []
    assert complete(share, "bmigrate status ", BMIG_CONTROL=breqd.control + ".none") == []
