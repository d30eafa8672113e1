"""The OCF resource agent (ocf/bmig, a promotable clone) against ocf-tester, Debian's
resource-agents checker: meta-data, validate-all, start, monitor, promote, demote, notify
and stop, each as the OCF API says, with the real daemons (breqd tracks the device as
the primary; the agent starts breceive, bmig-nbd and stops them)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.integration.nbd_helpers import require
from tests.integration.sync_helpers import write_secret

AGENT = os.path.join(os.path.dirname(__file__), "..", "..", "ocf", "bmig")


def command(bin_dir: str, name: str, module: str) -> str:
    """A command that runs bmig's ``module`` with this interpreter (the agent needs
    plain executables)."""
    path = os.path.join(bin_dir, name)
    with open(path, "w") as f:
        f.write(f"#!/bin/sh\nexec {sys.executable} -c 'from {module} import main; main()' "
                "\"$@\"\n")
    os.chmod(path, 0o755)
    return path


def test_the_agent_passes_ocf_tester(breqd, tmp_path):
    require("ocf-tester")
    backing = str(tmp_path / "d1.img")
    with open(backing, "wb") as f:
        f.truncate(16 << 20)
    client = breqd.client()
    client.add_device("d1", 16 << 20)
    client.close()
    bin_dir = str(tmp_path / "bin")
    os.makedirs(bin_dir)
    params = {
        "device": "d1", "backing": backing,
        "secret_file": write_secret(str(tmp_path / "secret")),
        "nbd_socket": str(tmp_path / "nbd.sock"), "listen": "127.0.0.1:0",
        "control": breqd.control, "receiver_state_dir": str(tmp_path / "targets"),
        "manage_dir": str(tmp_path / "manage"), "run_dir": str(tmp_path / "run"),
        "bmigrate": command(bin_dir, "bmigrate", "bmig.cli.main"),
        "breceive": command(bin_dir, "breceive", "bmig.cli.breceive"),
        "bmig_nbd": command(bin_dir, "bmig-nbd", "bmig.cli.nbd"),
    }
    argv = ["ocf-tester", "-v", "-n", "bmig-d1"]
    for key, value in params.items():
        argv += ["-o", f"{key}={value}"]
    done = subprocess.run(argv + [os.path.abspath(AGENT)], capture_output=True, text=True,
                          timeout=600)
    try:
        assert done.returncode == 0, done.stdout + done.stderr
        assert "passed all tests" in done.stdout, done.stdout
        for action in ("promote", "demote", "notify"):
            assert f"Testing: {action}" in done.stdout or action in done.stdout
    finally:
        subprocess.run([os.path.abspath(AGENT), "stop"], env=dict(
            os.environ, OCF_ROOT="/usr/lib/ocf", __OCF_ACTION="stop",
            **{f"OCF_RESKEY_{k}": v for k, v in params.items()}), timeout=120,
            capture_output=True)


def test_the_promotion_score_follows_the_copy(breqd, tmp_path):
    """Pacemaker promotes the node with the highest promotion score: a consistent copy
    gets one, an inconsistent or missing copy none (promote would refuse it), a stopped
    node none. crm_attribute (pacemaker-cli-utils) is stood in for by a script on PATH
    that records what the agent asks of the cluster's attribute store."""
    backing = str(tmp_path / "d1.img")
    with open(backing, "wb") as f:
        f.truncate(16 << 20)
    bin_dir = str(tmp_path / "bin")
    os.makedirs(bin_dir)
    asked = tmp_path / "crm_attribute.log"
    stand_in = os.path.join(bin_dir, "crm_attribute")
    with open(stand_in, "w") as f:
        f.write(f'#!/bin/sh\necho "$OCF_RESOURCE_INSTANCE $*" >> {asked}\n')
    os.chmod(stand_in, 0o755)
    targets = tmp_path / "targets"
    params = {
        "device": "d1", "backing": backing,
        "secret_file": write_secret(str(tmp_path / "secret")),
        "nbd_socket": str(tmp_path / "nbd.sock"), "listen": "127.0.0.1:0",
        "control": breqd.control, "receiver_state_dir": str(targets),
        "manage_dir": str(tmp_path / "manage"), "run_dir": str(tmp_path / "run"),
        "bmigrate": command(bin_dir, "bmigrate", "bmig.cli.main"),
        "breceive": command(bin_dir, "breceive", "bmig.cli.breceive"),
        "bmig_nbd": command(bin_dir, "bmig-nbd", "bmig.cli.nbd"),
    }

    def agent(action: str) -> int:
        env = dict(os.environ, OCF_ROOT="/usr/lib/ocf", __OCF_ACTION=action,
                   OCF_RESOURCE_INSTANCE="bmig-d1:0",
                   PATH=bin_dir + os.pathsep + os.environ.get("PATH", ""),
                   **{f"OCF_RESKEY_{k}": v for k, v in params.items()})
        return subprocess.run([os.path.abspath(AGENT), action], env=env, timeout=120,
                              capture_output=True).returncode

    def last_asked() -> str:
        return asked.read_text().splitlines()[-1]

    def record(state: str, role: str = "secondary") -> None:
        (targets / "d1.target").write_text(
            '{"export": "d1", "state": "%s", "role": "%s"}' % (state, role))

    try:
        assert agent("start") == 0
        assert agent("monitor") == 0
        assert last_asked() == "bmig-d1:0 -p -l reboot -D"     # no copy yet
        record("consistent")
        assert agent("monitor") == 0
        assert last_asked() == "bmig-d1:0 -p -l reboot -v 10"
        record("in-sync")
        assert agent("monitor") == 0
        assert last_asked() == "bmig-d1:0 -p -l reboot -v 10"
        record("inconsistent")
        assert agent("monitor") == 0
        assert last_asked() == "bmig-d1:0 -p -l reboot -D"
        record("consistent", role="rejoining")                 # a former primary
        assert agent("monitor") == 0
        assert last_asked() == "bmig-d1:0 -p -l reboot -D"
        record("consistent")
        assert agent("monitor") == 0
    finally:
        assert agent("stop") == 0
    assert last_asked() == "bmig-d1:0 -p -l reboot -D"
    assert agent("monitor") == 7
