"""The systemd units of systemd/, read by systemd's own tools and against what the daemons
do: `systemd-analyze security --offline=yes` rates every service "OK" or better,
`systemd-analyze verify` finds nothing to say, and the settings that the daemons' behaviour
depends on are there (a restart of breqd restarts nothing else; the runtime directory
that holds bmig-nbd's sockets survives breqd; configuration errors are not retried; the
daemons that send WATCHDOG=1 have WatchdogSec=).

The units running under a real systemd: tests/kernel/test_kernel_systemd.py.
"""

from __future__ import annotations

import glob
import os
import re
import shutil
import subprocess

import pytest

from bmig.errors import EXIT_CONFIG, EXIT_USAGE

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
UNITS = os.path.join(ROOT, "systemd")
SERVICES = sorted(os.path.basename(p) for p in glob.glob(os.path.join(UNITS, "*.service")))
# Exposure of "OK" and better, as systemd-analyze rates it (5.0 and up is "MEDIUM").
OK = 5.0
# These talk to breqd and reconnect to it by themselves.
BREQD_CLIENTS = ("bmig-nbd@.service", "bmigrate@.service", "bmig-dm@.service",
                 "bmig-replicate@.service")
# These send WATCHDOG=1 (bmig/systemd.py, from the loop that does their work).
WATCHDOGGED = ("breqd.service", "bmig-nbd@.service", "bmigrate@.service")


def analyze() -> str:
    path = shutil.which("systemd-analyze")
    if path is None:
        pytest.skip("systemd-analyze is not installed (Debian: systemd; make deb-deps)")
    return path


def settings(unit: str) -> dict[str, list[str]]:
    """Every "Key=value" of a unit file by key, in order ("Section.Key": [values])."""
    out: dict[str, list[str]] = {}
    section = ""
    with open(os.path.join(UNITS, unit)) as f:
        for line in f:
            line = line.strip()
            if not line or line.startswith(("#", ";")):
                continue
            if line.startswith("["):
                section = line.strip("[]")
                continue
            key, _, value = line.partition("=")
            out.setdefault(f"{section}.{key}", []).append(value)
    return out


def words(unit: str, key: str) -> list[str]:
    return " ".join(settings(unit).get(key, [])).split()


@pytest.mark.parametrize("unit", SERVICES)
def test_every_service_is_rated_ok_or_better_by_systemd_analyze_security(unit):
    done = subprocess.run([analyze(), "security", "--offline=yes", "--no-pager",
                           os.path.join(UNITS, unit)], capture_output=True, text=True,
                          timeout=120, stdin=subprocess.DEVNULL)
    match = re.search(r"Overall exposure level for \S+: (\d+\.\d) (\w+)", done.stdout)
    assert match, done.stdout + done.stderr
    exposure = float(match.group(1))
    exposed = [line for line in done.stdout.splitlines() if line.startswith("✗")]
    assert exposure < OK, f"{unit}: {exposure} {match.group(2)}:\n" + "\n".join(exposed)


def test_systemd_analyze_verify_finds_nothing_to_say(tmp_path):
    """Each unit as systemd loads it (the templates as instance vm1); the commands are
    stand-ins in a directory of the test's (ExecStart must name an executable), and the
    man pages are left to the installation's own check."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for command in ("breqd", "bmig-nbd", "breceive", "bmigrate", "bmig-dm"):
        (bin_dir / command).write_text("#!/bin/sh\n")
        (bin_dir / command).chmod(0o755)
    loaded = []
    for path in sorted(glob.glob(os.path.join(UNITS, "*"))):
        name = os.path.basename(path).replace("@.", "@vm1.")
        with open(path) as f:
            text = f.read().replace("/usr/local/bin/", f"{bin_dir}/")
        (tmp_path / name).write_text(text)
        loaded.append(str(tmp_path / name))
    done = subprocess.run([analyze(), "verify", "--man=no", *loaded], capture_output=True,
                          text=True, timeout=120, stdin=subprocess.DEVNULL, cwd=tmp_path)
    assert done.returncode == 0 and not (done.stdout + done.stderr).strip(), \
        done.stdout + done.stderr


@pytest.mark.parametrize("unit", BREQD_CLIENTS)
def test_a_restart_of_breqd_restarts_none_of_its_clients(unit):
    """Requires= would stop and start the unit with breqd: bmig-nbd would drop the
    application's disk. Wants= starts breqd with it, After= orders the two."""
    assert "breqd.service" not in words(unit, "Unit.Requires")
    assert "breqd.service" not in words(unit, "Unit.BindsTo")
    assert "breqd.service" in words(unit, "Unit.Wants")
    assert "breqd.service" in words(unit, "Unit.After")


def test_no_unit_removes_the_runtime_directory_that_bmig_nbd_keeps_its_sockets_in():
    owners = [u for u in SERVICES if "bmig" in words(u, "Service.RuntimeDirectory")]
    assert {"breqd.service", "bmig-nbd@.service"} <= set(owners)
    for unit in owners:
        assert words(unit, "Service.RuntimeDirectoryPreserve") == ["yes"], unit


@pytest.mark.parametrize("unit", SERVICES)
def test_a_configuration_error_is_not_retried(unit):
    prevented = words(unit, "Service.RestartPreventExitStatus")
    assert {str(EXIT_USAGE), str(EXIT_CONFIG)} <= set(prevented), unit


@pytest.mark.parametrize("unit", WATCHDOGGED)
def test_the_daemons_that_ping_have_a_watchdog(unit):
    assert words(unit, "Service.WatchdogSec"), unit
    assert words(unit, "Service.Type") == ["notify"], unit


def test_bmigrate_run_may_write_where_it_publishes_its_state():
    """ProtectSystem=strict leaves /run read-only: the run's status directory must be a
    RuntimeDirectory of its unit, kept when it stops (bmigrate status reads it)."""
    from bmig.constants import DEFAULT_STATUS_DIR
    assert DEFAULT_STATUS_DIR.startswith("/run/")
    unit = "bmigrate@.service"
    assert DEFAULT_STATUS_DIR[len("/run/"):] in words(unit, "Service.RuntimeDirectory")
    assert words(unit, "Service.RuntimeDirectoryPreserve") == ["yes"]
