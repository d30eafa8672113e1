"""The OCF resource agent (ocf/bmig, a promotable clone) against ocf-tester, Debian's
resource-agents checker: meta-data, validate-all, start, monitor, promote, demote, notify
and stop, each as the OCF API says, with the real daemons (breqd tracks the device as
the primary; the agent starts breceive, bmig-nbd and stops them)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest

from tests.daemon import wait_until
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


class Node:
    """The agent on one node, with crm_attribute stood in for by a script that records
    what the agent asks of the cluster's attribute store, and bmigrate by a wrapper that
    fails ``track set-role`` while a flag file exists."""

    def __init__(self, breqd, tmp_path):
        self.tmp = tmp_path
        self.backing = str(tmp_path / "d1.img")
        with open(self.backing, "wb") as f:
            f.truncate(16 << 20)
        self.bin_dir = str(tmp_path / "bin")
        os.makedirs(self.bin_dir)
        self.asked = tmp_path / "crm_attribute.log"
        self._script("crm_attribute", f'echo "$OCF_RESOURCE_INSTANCE $*" >> {self.asked}')
        real = command(self.bin_dir, "bmigrate-real", "bmig.cli.main")
        self.set_role_fails = tmp_path / "set-role-fails"
        wrapper = self._script("bmigrate", f'[ "$2" = set-role ] && [ -e {self.set_role_fails} ] '
                                           f'&& {{ echo "set-role refused" >&2; exit 5; }}\n'
                                           f'exec {real} "$@"')
        self.targets = tmp_path / "targets"
        self.params = {
            "device": "d1", "backing": self.backing,
            "secret_file": write_secret(str(tmp_path / "secret")),
            "nbd_socket": str(tmp_path / "nbd.sock"), "listen": "127.0.0.1:0",
            "control": breqd.control, "receiver_state_dir": str(self.targets),
            "manage_dir": str(tmp_path / "manage"), "run_dir": str(tmp_path / "run"),
            "bmigrate": wrapper,
            "breceive": command(self.bin_dir, "breceive", "bmig.cli.breceive"),
            "bmig_nbd": command(self.bin_dir, "bmig-nbd", "bmig.cli.nbd"),
        }
        self.stderr = ""

    def _script(self, name: str, body: str) -> str:
        path = os.path.join(self.bin_dir, name)
        with open(path, "w") as f:
            f.write(f"#!/bin/sh\n{body}\n")
        os.chmod(path, 0o755)
        return path

    def agent(self, action: str, timeout: float = 120, **extra: str) -> int:
        env = dict(os.environ, OCF_ROOT="/usr/lib/ocf", __OCF_ACTION=action,
                   OCF_RESOURCE_INSTANCE="bmig-d1:0",
                   PATH=self.bin_dir + os.pathsep + os.environ.get("PATH", ""),
                   **{f"OCF_RESKEY_{k}": v for k, v in self.params.items()}, **extra)
        done = subprocess.run([os.path.abspath(AGENT), action], env=env, timeout=timeout,
                              capture_output=True, text=True)
        self.stderr = done.stderr
        return done.returncode

    def last_asked(self) -> str:
        return self.asked.read_text().splitlines()[-1]

    def record(self, generation: str, role: str = "secondary") -> None:
        self.targets.mkdir(exist_ok=True)
        (self.targets / "d1.target").write_text(json.dumps(
            {"export": "d1", "state": "consistent", "role": role,
             "generation": generation}))

    def pid(self, name: str) -> int:
        return int((self.tmp / "run" / f"d1.{name}.pid").read_text())


def test_the_tracked_primary_outranks_a_copy_and_a_stale_one_is_refused(breqd, tmp_path):
    """A cold start or a clone restart: the node whose breqd tracks the device as primary
    gets a higher score than any copy (so Pacemaker promotes it, never the copy), unless
    its own copy is a secondary of another generation (received from the peer since):
    then no score, and promote refuses with the reason."""
    client = breqd.client()
    client.add_device("d1", 16 << 20)
    generation = client.stats("d1")["generation"]
    client.close()
    node = Node(breqd, tmp_path)
    try:
        assert node.agent("start") == 0
        assert node.agent("monitor") == 0
        assert node.last_asked() == "bmig-d1:0 -p -l reboot -v 101"   # above a copy's 10
        node.record(generation)              # its own lineage: still the newest
        assert node.agent("monitor") == 0
        assert node.last_asked() == "bmig-d1:0 -p -l reboot -v 101"
        node.record("0123456789abcdef")      # the peer's newer generation, received here
        assert node.agent("monitor") == 0
        assert node.last_asked() == "bmig-d1:0 -p -l reboot -D"
        assert node.agent("promote") == 1
        assert "stale" in node.stderr and "0123456789abcdef" in node.stderr
        assert not os.path.exists(tmp_path / "run" / "d1.nbd.pid"), "nothing served"
    finally:
        assert node.agent("stop") == 0


def test_monitor_says_failed_when_the_promoted_device_refuses_writes(breqd, tmp_path):
    from bmig.nbd.manage_client import ManageClient

    client = breqd.client()
    client.add_device("d1", 16 << 20)
    client.close()
    node = Node(breqd, tmp_path)
    try:
        assert node.agent("start") == 0
        node.set_role_fails.touch()
        assert node.agent("promote") == 1              # set-role's failure is seen
        assert "set-role" in node.stderr and "set-role refused" in node.stderr
        assert node.agent("demote") == 0
        node.set_role_fails.unlink()
        assert node.agent("promote") == 0
        assert node.agent("monitor") == 8
        with ManageClient(node.params["manage_dir"], "d1", timeout=30) as nbd:
            nbd.call("read-only", value=True)
            assert node.agent("monitor") == 9
            assert "read-only" in node.stderr
        assert node.agent("monitor") == 8          # breqd says primary: writable again
        # With a peer, the HA replication dying is a failure too.
        assert node.agent("demote") == 0
        node.params["peer_url"] = "tcp://127.0.0.1:1/d1"
        assert node.agent("promote") == 0
        assert node.agent("monitor") == 8
        os.kill(node.pid("replicate"), signal.SIGKILL)
        assert node.agent("monitor") == 9
        assert "HA replication" in node.stderr
    finally:
        assert node.agent("stop") == 0


def test_stop_succeeds_without_validating(breqd, tmp_path):
    """A stop that fails gets the node fenced: a backing gone is no reason."""
    node = Node(breqd, tmp_path)
    assert node.agent("start") == 0
    receive = node.pid("receive")
    os.unlink(node.backing)
    assert node.agent("stop") == 0
    assert not os.path.exists(f"/proc/{receive}") or \
        open(f"/proc/{receive}/stat").read().rsplit(")", 1)[1].split()[0] == "Z"


def test_stop_ends_processes_that_ignore_sigterm_within_its_timeout(breqd, tmp_path):
    """Three processes that ignore SIGTERM share the stop's budget (its timeout less
    10 s), not 30 s each: stop is done in time, every one of them killed."""
    node = Node(breqd, tmp_path)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    stubborn = []
    for name in ("replicate", "nbd", "receive"):
        proc = subprocess.Popen(["/bin/sh", "-c", 'trap "" TERM; while :; do sleep 1; done'])
        stubborn.append(proc)
        (run_dir / f"d1.{name}.pid").write_text(f"{proc.pid}\n")
    try:
        assert node.agent("stop", timeout=40, OCF_RESKEY_CRM_meta_timeout="21000") == 0
        for proc in stubborn:
            assert proc.wait(timeout=5) == -signal.SIGKILL
    finally:
        for proc in stubborn:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def ended(pid: int) -> bool:
    """The process is gone (or a zombie nobody reaped yet)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def test_a_promoted_node_runs_no_breceive_and_a_dead_bmig_nbd_is_a_failed_promotion(
        breqd, tmp_path):
    """Promoted, the backing is bmig-nbd's alone: breceive stops (nothing else may write
    to the primary) and starts again on demote. bmig-nbd killed: monitor says promoted
    and failed (9), promote refuses, and demote makes the node a copy's side again."""
    client = breqd.client()
    client.add_device("d1", 16 << 20)
    client.close()
    node = Node(breqd, tmp_path)
    try:
        assert node.agent("start") == 0
        receive = node.pid("receive")
        assert node.agent("promote") == 0, node.stderr
        wait_until(lambda: ended(receive), timeout=30, what="breceive to stop on promote")
        assert not (tmp_path / "run" / "d1.receive.pid").exists()
        assert node.agent("monitor") == 8
        assert node.agent("demote") == 0
        assert not ended(node.pid("receive"))
        assert node.agent("monitor") == 0
        assert node.agent("promote") == 0
        nbd = node.pid("nbd")
        os.kill(nbd, signal.SIGKILL)
        wait_until(lambda: ended(nbd), timeout=30, what="bmig-nbd to die")
        assert node.agent("monitor") == 9
        assert "bmig-nbd died" in node.stderr
        assert node.agent("promote") == 1
        assert node.agent("demote") == 0
        assert node.agent("monitor") == 0
        assert not ended(node.pid("receive"))
    finally:
        assert node.agent("stop") == 0
