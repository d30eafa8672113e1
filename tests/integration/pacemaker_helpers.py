"""A two-node Pacemaker cluster on this one machine, for the failover test of ocf/bmig.

Each node is a set of namespaces of its own:

- network: a veth pair joins the two nodes (10.231.0.1 and .2); corosync speaks knet on
  it, and libqb's IPC (abstract Unix sockets, which belong to a network namespace) stays
  inside the node;
- mount: /etc/corosync, /var/lib/corosync, /var/lib/pacemaker, /var/log/pacemaker and
  /run are bind-mounted from the node's directory (/run/disk stands for the node's disks:
  a reboot keeps it and empties the rest of /run, a tmpfs on a real host), /dev/shm is a tmpfs of its own (libqb's
  ring buffers), and /usr/lib/ocf/resource.d is a directory of the node's with the system's
  providers and bmig's agent (the host's stays untouched);
- UTS: the node's host name (node-a, node-b), as corosync.conf names it;
- PID: the node's init is a reaper; killing it (SIGKILL) ends every process of the node at
  once, as a host crash does, and the cluster's stop can leave nothing behind.

Commands run inside a node through nsenter(1). Nothing here is bmig's: the test drives
the agent only through Pacemaker.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from tests.daemon import wait_until

TOOLS = ("corosync", "pacemakerd", "crm_mon", "cibadmin", "crm_attribute", "ip", "nsenter",
         "unshare")
SUBNET = "10.231.0"
COMMAND_TIMEOUT = 60.0
START_TIMEOUT = 120.0

COROSYNC_CONF = """\
totem {{
    version: 2
    cluster_name: bmigtest
    transport: knet
    crypto_cipher: none
    crypto_hash: none
    token: 1000
}}
logging {{
    to_stderr: yes
    to_logfile: no
    to_syslog: no
    timestamp: on
}}
quorum {{
    provider: corosync_votequorum
    two_node: 1
}}
nodelist {{
{nodes}
}}
"""

# The first CIB of every node: no fencing (the test's crash is the fence), a two-node
# cluster keeps running without quorum, and a DC is elected in 5 s rather than 20.
FIRST_CIB = """\
<cib crm_feature_set="3.0.0" validate-with="pacemaker-3.9" epoch="1" num_updates="0"
     admin_epoch="0">
  <configuration>
    <crm_config>
      <cluster_property_set id="cib-bootstrap-options">
        <nvpair id="opt-stonith-enabled" name="stonith-enabled" value="false"/>
        <nvpair id="opt-no-quorum-policy" name="no-quorum-policy" value="ignore"/>
        <nvpair id="opt-dc-deadtime" name="dc-deadtime" value="5s"/>
      </cluster_property_set>
    </crm_config>
    <nodes/>
    <resources/>
    <constraints/>
  </configuration>
  <status/>
</cib>
"""

# The node's init: mounts, host name, then a reaper of the orphans (pid 1 of the node).
INIT = """\
set -e
root=$1; name=$2
mount --bind "$root/etc-corosync" /etc/corosync
mount --bind "$root/var-lib-corosync" /var/lib/corosync
mount --bind "$root/var-lib-pacemaker" /var/lib/pacemaker
mount --bind "$root/var-log-pacemaker" /var/log/pacemaker
mount --bind "$root/resource.d" /usr/lib/ocf/resource.d
mount --bind "$root/run" /run
mount -t tmpfs -o size=64m,mode=1777 tmpfs /dev/shm
hostname "$name"
ip link set lo up
touch "$root/ready"
exec "$3" -c '
import os, time
while True:
    try:
        os.wait()
    except ChildProcessError:
        time.sleep(0.5)
'
"""


def require_cluster_tools() -> None:
    """Skip, saying why, on a machine that cannot run the cluster."""
    if os.geteuid() != 0:
        pytest.skip("a Pacemaker cluster in namespaces needs root")
    missing = [t for t in TOOLS if shutil.which(t) is None]
    if missing:
        pytest.skip(f"not installed: {', '.join(missing)} (corosync, pacemaker, "
                    "pacemaker-cli-utils, iproute2, util-linux)")
    for path in ("/etc/corosync", "/var/lib/corosync", "/var/lib/pacemaker",
                 "/var/log/pacemaker", "/usr/lib/ocf/resource.d"):
        if not os.path.isdir(path):
            pytest.skip(f"{path} is missing (the corosync and pacemaker packages make it)")


def _host(*argv: str, check: bool = True) -> subprocess.CompletedProcess:
    done = subprocess.run(argv, capture_output=True, text=True, timeout=COMMAND_TIMEOUT)
    if check and done.returncode != 0:
        raise AssertionError(f"{' '.join(argv)}: exit {done.returncode}: {done.stderr}")
    return done


class Node:
    """One node: its namespaces, its directory on the host, the processes started in it."""

    def __init__(self, cluster: "Cluster", letter: str, number: int):
        self.name = f"node-{letter}"
        self.nodeid = number
        self.address = f"{SUBNET}.{number}"
        self.netns = f"{cluster.prefix}-{letter}"
        self.veth = f"{cluster.prefix}{letter}"
        self.root = cluster.root / self.name
        self.holder: subprocess.Popen | None = None
        self.init_pid: int | None = None
        self.started: list[subprocess.Popen] = []

    def host_path(self, path: str) -> Path:
        """Where a path under the node's /run is on the host."""
        assert path.startswith("/run/"), path
        return self.root / "run" / path[len("/run/"):]

    def prepare(self, resource_d: Path) -> None:
        for sub in ("etc-corosync", "var-lib-corosync", "var-lib-pacemaker/cib",
                    "var-lib-pacemaker/pengine", "var-lib-pacemaker/blackbox",
                    "var-lib-pacemaker/cores", "var-log-pacemaker/bundles", "run/bmig",
                    "run/disk", "log"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        cib = self.root / "var-lib-pacemaker" / "cib" / "cib.xml"
        cib.write_text(FIRST_CIB)
        for sub in ("var-lib-pacemaker", "var-log-pacemaker"):
            _host("chown", "-R", "hacluster:haclient", str(self.root / sub))
        os.chmod(cib, 0o600)
        os.symlink(resource_d, self.root / "resource.d")

    def boot(self) -> None:
        """The node's namespaces and its init; returns once its mounts are in place."""
        log = open(self.root / "log" / "init.log", "ab")
        with log:
            self.holder = subprocess.Popen(
                ["ip", "netns", "exec", self.netns, "unshare", "--mount", "--uts", "--pid",
                 "--fork", "--mount-proc", "--propagation", "private", "--",
                 "/bin/sh", "-c", INIT, "init", str(self.root), self.name, sys.executable],
                stdin=subprocess.DEVNULL, stdout=log, stderr=log)
        ready = self.root / "ready"
        wait_until(lambda: ready.exists() or self.holder.poll() is not None,
                   timeout=COMMAND_TIMEOUT, what=f"{self.name}'s namespaces")
        assert self.holder.poll() is None, (self.root / "log" / "init.log").read_text()
        children = Path(f"/proc/{self.holder.pid}/task/{self.holder.pid}/children")
        self.init_pid = int(children.read_text().split()[0])

    def reboot(self) -> None:
        """Crashed, it boots again: /run empty but for /run/disk; corosync and Pacemaker
        are not started yet (start_stack)."""
        assert self.init_pid is None, "crash() it first"
        run = self.root / "run"
        for entry in run.iterdir():
            if entry.name != "disk":
                if entry.is_dir() and not entry.is_symlink():
                    shutil.rmtree(entry)
                else:
                    entry.unlink()
        (run / "bmig").mkdir()
        (self.root / "ready").unlink()
        self.started.clear()
        self.boot()

    def start_stack(self) -> None:
        """corosync, then Pacemaker."""
        self.spawn("corosync", "corosync", "-f")
        self.spawn("pacemakerd", "pacemakerd")

    def argv(self, *command: str) -> list[str]:
        assert self.init_pid is not None
        return ["nsenter", "-t", str(self.init_pid), "--mount", "--uts", "--net", "--pid",
                "--", *command]

    def run(self, *command: str, check: bool = True, timeout: float = COMMAND_TIMEOUT,
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
        done = subprocess.run(self.argv(*command), capture_output=True, text=True,
                              timeout=timeout, env=env)
        if check and done.returncode != 0:
            raise AssertionError(f"{self.name}: {' '.join(command)}: exit "
                                 f"{done.returncode}: {done.stdout}{done.stderr}")
        return done

    def spawn(self, log_name: str, *command: str,
              env: dict[str, str] | None = None) -> subprocess.Popen:
        """A long-running process in the node, its output in the node's log directory."""
        with open(self.root / "log" / f"{log_name}.log", "ab") as log:
            proc = subprocess.Popen(self.argv(*command), stdin=subprocess.DEVNULL,
                                    stdout=log, stderr=log, env=env)
        self.started.append(proc)
        return proc

    def log(self, log_name: str) -> str:
        with contextlib.suppress(FileNotFoundError):
            return (self.root / "log" / f"{log_name}.log").read_text(errors="replace")
        return ""

    def crash(self) -> None:
        """Every process of the node at once (SIGKILL of its PID namespace's init)."""
        if self.init_pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.init_pid, signal.SIGKILL)
        for proc in [self.holder, *self.started]:
            if proc is not None:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=COMMAND_TIMEOUT)
        self.init_pid = None

    def crm_mon(self) -> ET.Element:
        done = self.run("crm_mon", "-1", "--output-as=xml", check=False)
        try:
            return ET.fromstring(done.stdout)
        except ET.ParseError:
            return ET.Element("crm_mon")

    def online(self) -> set[str]:
        return {n.get("name") for n in self.crm_mon().iter("node")
                if n.get("online") == "true" and n.get("name")}

    def roles(self, resource: str) -> dict[str, str]:
        """Node name: the role of the clone instances of ``resource`` that run."""
        out: dict[str, str] = {}
        for r in self.crm_mon().iter("resource"):
            if r.get("id") == resource and r.get("active") == "true":
                for n in r.iter("node"):
                    out[n.get("name")] = r.get("role")
        return out


class Cluster:
    """node_a and node_b; ``start`` boots both and waits for Pacemaker to see both online;
    ``stop`` (always call it) kills every process of both and removes the namespaces."""

    def __init__(self, tmp_path: Path, agent: str):
        self.prefix = f"bmpk{os.getpid() % 100000}"
        self.root = tmp_path / "cluster"
        self.agent = agent
        self.node_a = Node(self, "a", 1)
        self.node_b = Node(self, "b", 2)
        self.nodes = (self.node_a, self.node_b)
        self._netns: list[str] = []

    def start(self) -> "Cluster":
        resource_d = self.root / "resource.d"
        (resource_d / "bmig").mkdir(parents=True)
        for provider in os.listdir("/usr/lib/ocf/resource.d"):
            os.symlink(os.path.join("/usr/lib/ocf/resource.d", provider),
                       resource_d / provider)
        shutil.copy(self.agent, resource_d / "bmig" / "bmig")
        os.chmod(resource_d / "bmig" / "bmig", 0o755)
        for node in self.nodes:
            _host("ip", "netns", "add", node.netns)
            self._netns.append(node.netns)
        a, b = self.nodes
        _host("ip", "link", "add", a.veth, "type", "veth", "peer", "name", b.veth)
        for node in self.nodes:
            _host("ip", "link", "set", node.veth, "netns", node.netns)
            _host("ip", "-n", node.netns, "addr", "add", f"{node.address}/24", "dev", node.veth)
            _host("ip", "-n", node.netns, "link", "set", node.veth, "up")
        members = "\n".join(
            f"    node {{\n        name: {n.name}\n        nodeid: {n.nodeid}\n"
            f"        ring0_addr: {n.address}\n    }}" for n in self.nodes)
        for node in self.nodes:
            node.prepare(resource_d)
            (node.root / "etc-corosync" / "corosync.conf").write_text(
                COROSYNC_CONF.format(nodes=members))
            node.boot()
        for node in self.nodes:
            node.start_stack()
        names = {n.name for n in self.nodes}
        wait_until(lambda: self.node_a.online() == names, timeout=START_TIMEOUT,
                   what="both nodes online in Pacemaker")
        return self

    def stop(self) -> None:
        for node in self.nodes:
            node.crash()
        for netns in self._netns:
            _host("ip", "netns", "delete", netns, check=False)
        self._netns.clear()
