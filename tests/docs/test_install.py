"""make install, as a packager and an administrator meet it.

A copy of the tree as a fresh clone has it is installed with ``make install
DESTDIR=... PREFIX=/usr`` by an unprivileged user (nobody, when the tests run as root),
once for the module. Then the staged tree is read as the installed system would be:
the commands run with the interpreter their first line names, which is the system's
Python in a virtual environment of their own; nothing names the staging directory; man
finds every page (``man -M``); every unit is there, runs the installed commands, and
``systemd-analyze verify`` finds the man pages it names; the examples are there; bash
and zsh load the completion from where it was installed.
"""

from __future__ import annotations

import os
import pwd
import shutil
import stat
import subprocess
import tempfile
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pytest

import bmig
from tests.docs import shells

ROOT = Path(__file__).resolve().parents[2]
PREFIX = "/usr"
INSTALL_TIMEOUT = 900
PROGRAMS = sorted(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"])
SYSTEM_PYTHON = "/usr/bin/python3"

pytestmark = [
    pytest.mark.timeout(INSTALL_TIMEOUT + 120),
    pytest.mark.skipif(not shutil.which("make"), reason="make is not installed"),
    pytest.mark.skipif(not os.path.exists(SYSTEM_PYTHON), reason="no /usr/bin/python3"),
]


@dataclass
class Installed:
    destdir: Path
    log: str

    def staged(self, path: str) -> Path:
        """Where an installed path is in the staging directory."""
        return self.destdir / path.lstrip("/")

    @property
    def bindir(self) -> Path:
        return self.staged(f"{PREFIX}/bin")

    @property
    def mandir(self) -> Path:
        return self.staged(f"{PREFIX}/share/man")

    @property
    def unitdir(self) -> Path:
        return self.staged(f"{PREFIX}/lib/systemd/system")

    @property
    def share(self) -> Path:
        return self.staged(f"{PREFIX}/share")


def fresh_clone(destination: Path) -> None:
    """The files a clone of this tree would have (with what is not committed yet)."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others",
                             "--exclude-standard"], cwd=ROOT, capture_output=True,
                            timeout=60)
    if listed.returncode != 0:
        pytest.skip("not a git work tree: cannot tell a clone's files")
    for name in listed.stdout.decode().split("\0"):
        source = ROOT / name
        if name and source.is_file():
            (destination / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, destination / name)


def as_installer(argv: list[str], base: Path, timeout: float) -> subprocess.CompletedProcess:
    """Run ``argv`` as the user who installs: nobody when the tests run as root (the
    tree under ``base`` is handed to it first), else the user running them; with a home
    of its own under ``base`` and none of this session's Python or bmig variables."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("PYTHON", "VIRTUAL_ENV", "BMIG_", "MAKE"))}
    env |= {"HOME": str(base / "home"), "PATH": "/usr/local/bin:/usr/bin:/bin"}
    (base / "home").mkdir(exist_ok=True)
    prefix: list[str] = []
    if os.geteuid() == 0:
        nobody = pwd.getpwnam("nobody")
        for directory, _, files in os.walk(base):
            for name in [directory] + [os.path.join(directory, f) for f in files]:
                os.lchown(name, nobody.pw_uid, nobody.pw_gid)
        prefix = ["setpriv", f"--reuid={nobody.pw_uid}", f"--regid={nobody.pw_gid}",
                  "--clear-groups", "--"]
    return subprocess.run(prefix + argv, env=env, capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="module")
def installed() -> Iterator[Installed]:
    # Not under pytest's tmp_path: nobody must reach it.
    base = Path(tempfile.mkdtemp(prefix="bmig-install-"))
    try:
        base.chmod(0o755)
        fresh_clone(base / "src")
        (base / "dest").mkdir()
        done = as_installer(["make", "-C", str(base / "src"), "install",
                             f"DESTDIR={base / 'dest'}", f"PREFIX={PREFIX}"],
                            base, INSTALL_TIMEOUT)
        log = done.stdout + done.stderr
        assert done.returncode == 0, f"make install failed:\n{log[-6000:]}"
        yield Installed(base / "dest", log)
    finally:
        shutil.rmtree(base, ignore_errors=True)


def clean_env(**extra: str) -> dict[str, str]:
    return {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": "/nonexistent"} | extra


def interpreter(installed: Installed, program: str) -> str:
    """The interpreter the installed command's first line names."""
    command = installed.bindir / program
    assert command.exists(), f"{program} is not in {PREFIX}/bin"
    first = command.read_bytes().split(b"\n", 1)[0].decode()
    assert first.startswith("#!"), f"{program}: no #! line"
    return first[2:].split()[0]


@pytest.mark.parametrize("program", PROGRAMS)
def test_every_command_runs_with_the_interpreter_it_names(installed, program):
    python = interpreter(installed, program)
    assert python.startswith(f"{PREFIX}/lib/bmig/"), \
        f"{program} runs {python}, not the environment under {PREFIX}/lib/bmig"
    staged = installed.staged(python)
    assert os.path.realpath(staged) == os.path.realpath(SYSTEM_PYTHON), \
        f"{python} is {os.path.realpath(staged)}, not the system's Python"
    for argument, expected in (("--version", f"version {bmig.__version__}"), ("--help", "")):
        done = subprocess.run([str(staged), str(installed.bindir / program), argument],
                              env=clean_env(), capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, f"{program} {argument}: {done.stderr}"
        assert expected in done.stdout


def test_the_commands_import_the_installed_bmig(installed):
    python = installed.staged(interpreter(installed, "bmigrate"))
    done = subprocess.run([str(python), "-c", "import bmig, click; print(bmig.__file__)"],
                          env=clean_env(), capture_output=True, text=True, timeout=60,
                          cwd="/")
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(str(installed.staged(f"{PREFIX}/lib/bmig/"))), done.stdout


def test_only_the_commands_are_in_bindir(installed):
    assert sorted(os.listdir(installed.bindir)) == PROGRAMS


def test_nothing_installed_names_the_staging_directory(installed):
    """Scripts, the environment's settings, compiled files and links name where things
    will be, not where they were staged."""
    needle = str(installed.destdir).encode()
    found = []
    for directory, _, files in os.walk(installed.destdir):
        for name in files:
            path = os.path.join(directory, name)
            if os.path.islink(path):
                if needle in os.readlink(path).encode():
                    found.append(path)
            elif needle in Path(path).read_bytes():
                found.append(path)
    assert not found, f"files that name {installed.destdir}: {found[:10]}"


def test_nothing_is_writable_by_group_or_others(installed):
    found = []
    for directory, dirs, files in os.walk(installed.destdir):
        for name in [directory] + [os.path.join(directory, f) for f in files]:
            mode = os.lstat(name).st_mode
            if not stat.S_ISLNK(mode) and mode & 0o022:
                found.append(f"{name} {stat.filemode(mode)}")
    assert not found, found[:10]


PAGES = sorted(p for p in (ROOT / "man").iterdir() if p.suffix[1:].isdigit())


@pytest.mark.skipif(not shutil.which("man"), reason="man is not installed")
@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_man_finds_every_page(installed, page):
    section = page.suffix[1:]
    where = subprocess.run(["man", "-M", str(installed.mandir), "-w", page.stem],
                           env=clean_env(), capture_output=True, text=True, timeout=60)
    assert where.stdout.strip() == str(installed.mandir / f"man{section}" / page.name), \
        where.stdout + where.stderr
    shown = subprocess.run(["man", "-M", str(installed.mandir), "-P", "cat", section,
                            page.stem], env=clean_env(MANWIDTH="80"), capture_output=True,
                           text=True, timeout=60)
    assert shown.returncode == 0 and "NAME" in shown.stdout, shown.stderr


UNITS = sorted(p for p in (ROOT / "systemd").iterdir()
               if p.suffix in (".service", ".socket", ".timer", ".target"))


def exec_commands(unit: Path) -> list[str]:
    """The programs of a unit's Exec*= lines (without the prefixes -@:+!)."""
    found = []
    for line in unit.read_text().splitlines():
        key, _, value = line.partition("=")
        if key.strip().startswith("Exec") and value.strip():
            found.append(value.strip().lstrip("-@:+!").split()[0])
    return found


def test_every_unit_runs_the_installed_commands(installed):
    assert UNITS
    for unit in UNITS:
        copy = installed.unitdir / unit.name
        assert copy.exists(), f"{unit.name} is not in {PREFIX}/lib/systemd/system"
        ours = [c for c in exec_commands(copy) if os.path.basename(c) in PROGRAMS]
        assert all(c == f"{PREFIX}/bin/{os.path.basename(c)}" for c in ours), \
            f"{unit.name} runs {ours}, not from {PREFIX}/bin"
        assert (installed.unitdir / unit.name).stat().st_mode & 0o777 == 0o644


def verify(installed: Installed, manpath: str) -> list[str]:
    """What systemd-analyze verify says of every installed unit (templates as @vm1),
    less that the commands are not installed yet where the units run them."""
    names = [u.name.replace("@.", "@vm1.") for u in UNITS]
    done = subprocess.run(["systemd-analyze", "verify", "--man=yes"]
                          + [str(installed.unitdir / n) for n in names],
                          env=clean_env(MANPATH=manpath), capture_output=True, text=True,
                          timeout=120)
    staged_only = {f"Command {PREFIX}/bin/{p} is not executable: No such file or directory"
                   for p in PROGRAMS}
    return [line for line in (done.stdout + done.stderr).splitlines()
            if line and line.split(": ", 1)[-1] not in staged_only]


@pytest.mark.skipif(not shutil.which("systemd-analyze"), reason="no systemd-analyze")
def test_systemd_analyze_verify_finds_the_man_pages_the_units_name(installed, tmp_path):
    assert verify(installed, str(installed.mandir)) == []
    # Without them, it says so: the check above did look for them.
    said = "\n".join(verify(installed, str(tmp_path)))
    assert "Command 'man breqd(8)' failed" in said, said


def test_the_example_settings_are_installed(installed):
    examples = installed.staged(f"{PREFIX}/share/doc/bmig/examples")
    expected = sorted(p.name for p in (ROOT / "daemons" / "examples").glob("*.toml"))
    assert sorted(os.listdir(examples)) == expected


@pytest.mark.parametrize("program", PROGRAMS)
def test_bash_loads_the_installed_completion(installed, program):
    if not shells.have_bash_completion():
        pytest.skip("bash-completion is not installed (make test installs it as root)")
    offered = shells.bash_complete(str(installed.share), f"{program} --he", clean_env())
    assert offered == ["--help"]


def test_zsh_loads_the_installed_completion(installed):
    if not shells.have_zsh():
        pytest.skip("zsh is not installed (make test installs it as root)")
    fpath = str(installed.share / "zsh" / "site-functions")
    assert shells.zsh_complete(fpath, "bmigrate track set-role vm1 ", clean_env()) == \
        ["handed-over", "primary"]
    for program in PROGRAMS:
        assert shells.zsh_complete(fpath, f"{program} --he", clean_env()) == ["--help"]


def test_make_uninstall_removes_what_install_put(installed):
    """On a copy of the staged tree, so that the other tests keep theirs."""
    base = installed.destdir.parent
    copy = base / "uninstalled"
    shutil.copytree(installed.destdir, copy, symlinks=True)
    done = as_installer(["make", "-C", str(base / "src"), "uninstall", f"DESTDIR={copy}",
                         f"PREFIX={PREFIX}"], base, 120)
    assert done.returncode == 0, done.stdout + done.stderr
    left = [os.path.join(d, f) for d, _, files in os.walk(copy) for f in files]
    assert not left, left[:10]
