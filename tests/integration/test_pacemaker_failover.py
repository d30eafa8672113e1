"""A failover driven by Pacemaker: two nodes (corosync and Pacemaker each in namespaces
of their own on this machine, tests/integration/pacemaker_helpers.py) run ocf:bmig:bmig
as a promotable clone.

Pacemaker promotes node-a (breqd tracks the device there as primary), whose HA
replication keeps node-b's copy synchronous under protocol C. An application writes
through bmig-nbd on node-a and keeps a journal of the writes it saw acknowledged. Then
node-a crashes: every one of its processes (corosync, Pacemaker, breqd, bmig-nbd, the
HA replication, breceive) is killed at once and the writer stops. Pacemaker on node-b
promotes its copy (the agent's promote runs ``bmigrate promote``): every acknowledged
write is on it, it is the primary of a new generation tracked by node-b's breqd, and
bmig-nbd serves it writable there (no breceive runs on it any more).

Then node-a comes back. Rejoined (``bmigrate rejoin``) before its cluster stack starts,
as the agent's documentation says: the new primary ships the union of both sides'
changes, and node-a is a promotable copy. Started without that: the whole device is
copied to it, it gets no promotion score, and standby, rejoin, standby off make it a
promotable copy.
"""

from __future__ import annotations

import json
import os
import socket
import sys
from dataclasses import dataclass

import pytest

from bmig.nbdclient import NbdClient
from bmig.tracker.blocking_client import TrackerClient
from tests.crashloop import BLOCK, Journal, JournaledWriter
from tests.daemon import breqd_argv, wait_until
from tests.integration.failover_helpers import dirty_chunks
from tests.integration.pacemaker_helpers import Cluster, Node, require_cluster_tools
from tests.integration.sync_helpers import CHUNK, MiB, same_bytes, write_secret
from tests.integration.test_failover import missing_writes
from tests.integration.test_ocf_agent import AGENT, command

SIZE = 16 * MiB
RUN = "/run/bmig"                  # emptied by a reboot
DISK = "/run/disk"                 # kept (pacemaker_helpers.Node.reboot)
CONTROL = f"{RUN}/breqd.sock"
BACKING = f"{DISK}/d1.img"
NBD_SOCKET = f"{RUN}/d1.nbd.sock"
MANAGE_DIR = f"{RUN}/nbd"
TARGETS = f"{DISK}/targets"
SECRET = f"{DISK}/secret"
PORT = 10810


@pytest.fixture
def cluster(tmp_path):
    require_cluster_tools()
    c = Cluster(tmp_path, os.path.abspath(AGENT))
    try:
        yield c.start()
    finally:
        c.stop()


def connectable(path) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        try:
            s.connect(str(path))
        except OSError:
            return False
        return True


def start_breqd(node: Node) -> None:
    """breqd in the node, on the node's /run (as its unit would start it)."""
    node.spawn("breqd", *breqd_argv(f"{DISK}/breqd-state", f"{DISK}/devices.d", CONTROL))
    wait_until(lambda: connectable(node.host_path(CONTROL)), timeout=60,
               what=f"breqd on {node.name}")


def resource_xml(tools: dict[str, str], cluster: Cluster) -> str:
    """A promotable clone of ocf:bmig:bmig; each node's peer_url names the other node."""
    params = {"device": "d1", "backing": BACKING, "secret_file": SECRET,
              "nbd_socket": NBD_SOCKET, "listen": f"0.0.0.0:{PORT}", "protocol": "C",
              "control": CONTROL, "receiver_state_dir": TARGETS, "manage_dir": MANAGE_DIR,
              "run_dir": f"{RUN}/ocf", **tools}
    common = "\n".join(f'<nvpair id="d1-{k}" name="{k}" value="{v}"/>'
                       for k, v in params.items())
    per_node = []
    for node, peer in ((cluster.node_a, cluster.node_b), (cluster.node_b, cluster.node_a)):
        per_node.append(f"""
    <instance_attributes id="d1-on-{node.name}" score="1">
      <rule id="d1-rule-{node.name}" score="INFINITY">
        <expression id="d1-is-{node.name}" attribute="#uname" operation="eq"
                    value="{node.name}"/>
      </rule>
      <nvpair id="d1-peer-{node.name}" name="peer_url"
              value="tcp://{peer.address}:{PORT}/d1"/>
    </instance_attributes>""")
    return f"""
<clone id="d1-clone">
  <meta_attributes id="d1-clone-meta">
    <nvpair id="d1-promotable" name="promotable" value="true"/>
    <nvpair id="d1-promoted-max" name="promoted-max" value="1"/>
    <nvpair id="d1-clone-max" name="clone-max" value="2"/>
    <nvpair id="d1-clone-node-max" name="clone-node-max" value="1"/>
    <nvpair id="d1-notify" name="notify" value="true"/>
  </meta_attributes>
  <primitive id="d1" class="ocf" provider="bmig" type="bmig">
    <instance_attributes id="d1-params">
{common}
    </instance_attributes>{''.join(per_node)}
    <operations>
      <op id="d1-start" name="start" interval="0" timeout="60s"/>
      <op id="d1-stop" name="stop" interval="0" timeout="60s"/>
      <op id="d1-promote" name="promote" interval="0" timeout="120s"/>
      <op id="d1-demote" name="demote" interval="0" timeout="60s"/>
      <op id="d1-monitor-unpromoted" name="monitor" interval="3s" timeout="30s"
          role="Unpromoted"/>
      <op id="d1-monitor-promoted" name="monitor" interval="2s" timeout="30s"
          role="Promoted"/>
    </operations>
  </primitive>
</clone>
"""


def record(node: Node) -> dict:
    """breceive's record of the node's copy ({} if none yet)."""
    try:
        return json.loads(node.host_path(f"{TARGETS}/d1.target").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


def tracked(node: Node) -> dict:
    done = node.run(sys.executable, "-c", "from bmig.cli.main import main; main()",
                    "track", "status", "d1", "--control", CONTROL, "--json")
    return json.loads(done.stdout)


def nbd_uri(node: Node) -> str:
    return f"nbd+unix:///d1?socket={node.host_path(NBD_SOCKET)}"


def node_log(node: Node, name: str) -> str:
    """The agent's log of ``name`` (promote, nbd, receive, replicate) on the node."""
    return node.host_path(f"{RUN}/ocf/d1.{name}.log").read_text(errors="replace")


def agent_logs(node: Node) -> str:
    out = []
    for path in sorted(node.host_path(f"{RUN}/ocf").glob("*.log")):
        out.append(f"== {node.name} {path.name}\n{path.read_text(errors='replace')[-3000:]}")
    return "\n".join(out)


@dataclass
class Failover:
    """What crash_the_primary leaves: node-b promoted after node-a's crash."""

    tools: dict[str, str]
    journal: Journal
    first_generation: str


def crash_the_primary(cluster: Cluster, tmp_path) -> Failover:
    """node-a primary, node-b's copy synchronous (protocol C), writes on node-a, node-a
    crashes; returns once Pacemaker has promoted node-b."""
    a, b = cluster.node_a, cluster.node_b
    bin_dir = str(tmp_path / "bin")
    os.makedirs(bin_dir)
    tools = {"bmigrate": command(bin_dir, "bmigrate", "bmig.cli.main"),
             "breceive": command(bin_dir, "breceive", "bmig.cli.breceive"),
             "bmig_nbd": command(bin_dir, "bmig-nbd", "bmig.cli.nbd")}
    for node in (a, b):
        with open(node.host_path(BACKING), "wb") as f:
            f.truncate(SIZE)
        write_secret(str(node.host_path(SECRET)))
        start_breqd(node)
    # node-a holds the primary: breqd tracks it there.
    a.run(tools["bmigrate"], "track", "add", "d1", "--size-of", BACKING, "--control", CONTROL)
    xml = tmp_path / "resources.xml"
    xml.write_text(resource_xml(tools, cluster))
    a.run("cibadmin", "--create", "--scope", "resources", "--xml-file", str(xml))

    def synchronous() -> bool:
        return (a.roles("d1") == {"node-a": "Promoted", "node-b": "Unpromoted"}
                and record(b).get("state") == "in-sync" and record(b).get("protocol") == "C")
    try:
        wait_until(synchronous, timeout=120,
                   what="node-a promoted, node-b's copy in sync under protocol C")
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n{agent_logs(a)}\n{agent_logs(b)}") from None
    first_generation = tracked(a)["generation"]

    journal = Journal(SIZE // BLOCK // 4)      # the application writes the first quarter
    writer = JournaledWriter(nbd_uri(a), journal, seed=11, per_second=400)
    writer.start()
    try:
        wait_until(lambda: writer.writes >= 400 or writer.error, timeout=60,
                   what="the application's writes on node-a")
    finally:
        # The crash: every process of node-a at once; the application with it.
        a.crash()
        writer.finish()
    assert writer.error is None, writer.error
    assert writer.writes >= 400

    def promoted_on_b() -> bool:
        return b.roles("d1") == {"node-b": "Promoted"}
    try:
        wait_until(promoted_on_b, timeout=120, what="Pacemaker to promote node-b's copy")
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n{agent_logs(b)}\n{b.run('crm_mon', '-1').stdout}") \
            from None
    assert "node-a" not in b.online()
    return Failover(tools, journal, first_generation)


@pytest.mark.timeout(300)
def test_pacemaker_promotes_the_copy_when_the_primary_node_crashes(cluster, tmp_path):
    b = cluster.node_b
    failover = crash_the_primary(cluster, tmp_path)
    journal, first_generation = failover.journal, failover.first_generation
    # Every write the application saw acknowledged is on the promoted copy.
    missing = missing_writes(journal, str(b.host_path(BACKING)))
    assert missing == [], f"acknowledged writes missing: {missing[:10]}"
    promote_log = node_log(b, "promote")
    assert "may have lost: nothing" in promote_log, promote_log
    promoted = record(b)
    assert promoted["role"] == "primary" and promoted["generation"] != first_generation
    status = tracked(b)
    assert status["role"] == "primary" and status["generation"] == promoted["generation"]
    assert first_generation in status["previous"]
    # The primary's backing is bmig-nbd's alone: no breceive on node-b any more.
    assert not b.host_path(f"{RUN}/ocf/d1.receive.pid").exists()
    assert f":{PORT} " not in b.run("ss", "-ltn").stdout
    # bmig-nbd serves it writable on node-b.
    data = os.urandom(2 * BLOCK)
    with NbdClient.connect(nbd_uri(b), timeout=30) as client:
        client.pwrite(data, 5 * BLOCK)
        client.flush()
        assert client.pread(len(data), 5 * BLOCK) == data


class NodeBreqd:
    """A node's breqd, asked from the host (its control socket through the node's /run)."""

    def __init__(self, node: Node):
        self.control = str(node.host_path(CONTROL))

    def client(self) -> TrackerClient:
        return TrackerClient(self.control, timeout=30)


def promotion_score(on: Node, of: Node) -> str:
    """The promotion score ``of`` has in the cluster, asked on ``on`` ("" if none)."""
    done = on.run("crm_attribute", "--node", of.name, "--name", "master-d1",
                  "--lifetime", "reboot", "--query", "--quiet", check=False)
    return done.stdout.strip() if done.returncode == 0 else ""


@pytest.mark.timeout(300)
def test_the_old_primary_rejoins_before_its_cluster_stack_starts(cluster, tmp_path):
    """What the agent's documentation tells the operator: on the node of the former
    primary, back after the failover, ``bmigrate rejoin`` before corosync and Pacemaker
    start. The agent then starts it unpromoted, the new primary's HA replication ships
    the union of both sides' changes (not the device), the two copies end identical,
    and the node is promotable again (a consistent copy's score)."""
    a, b = cluster.node_a, cluster.node_b
    failover = crash_the_primary(cluster, tmp_path)
    with NbdClient.connect(nbd_uri(b), timeout=30) as client:     # the new primary's writes
        for n in range(8):
            client.pwrite(os.urandom(BLOCK), (200 + 7 * n) * CHUNK)
        client.flush()
    new_dirty = dirty_chunks(NodeBreqd(b), SIZE)
    assert new_dirty
    a.reboot()
    start_breqd(a)
    old_dirty = dirty_chunks(NodeBreqd(a), SIZE)       # written on node-a, maybe not shipped
    done = a.run(failover.tools["bmigrate"], "rejoin", "d1", "--backing", BACKING,
                 "--receiver-state-dir", TARGETS, "--manage-dir", MANAGE_DIR,
                 "--control", CONTROL, "--json")
    assert json.loads(done.stdout)["resync"] == "ranges"
    a.start_stack()

    def rejoined() -> bool:
        return (b.roles("d1") == {"node-b": "Promoted", "node-a": "Unpromoted"}
                and record(a).get("state") == "in-sync"
                and record(a).get("generation") == record(b).get("generation"))
    try:
        wait_until(rejoined, timeout=120, what="node-a to be node-b's copy in sync")
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n{agent_logs(a)}\n{agent_logs(b)}") from None
    received = node_log(a, "receive")
    assert "rejoin)" in received and "new)" not in received, received
    assert "shipping everything" not in node_log(b, "replicate")
    assert same_bytes(str(a.host_path(BACKING)), str(b.host_path(BACKING)))
    # The union is what can differ, not the device: node-a's writes were in the first
    # quarter, node-b's in the last.
    assert len(old_dirty | new_dirty) <= SIZE // CHUNK // 2, sorted(old_dirty)
    wait_until(lambda: promotion_score(b, a) == "10", timeout=60,
               what="node-a's copy to be promotable")


@pytest.mark.timeout(300)
def test_an_old_primary_back_without_rejoin_is_resynced_and_rejoins_in_standby(
        cluster, tmp_path):
    """Its cluster stack started before anyone ran ``bmigrate rejoin`` there: the new
    primary's HA replication finds no record of its lineage on the node and copies the
    whole device; breqd there still tracks the old primary, so the node gets no
    promotion score (promote would refuse it). The documented way out: standby,
    ``bmigrate rejoin``, standby off; then it is a promotable copy."""
    a, b = cluster.node_a, cluster.node_b
    failover = crash_the_primary(cluster, tmp_path)
    a.reboot()
    start_breqd(a)
    a.start_stack()
    wait_until(lambda: record(a).get("state") == "in-sync"
               and record(a).get("generation") == record(b).get("generation"),
               timeout=120, what="node-a to be resynced from node-b")
    assert "shipping everything" in node_log(b, "replicate")
    assert same_bytes(str(a.host_path(BACKING)), str(b.host_path(BACKING)))
    assert tracked(a)["role"] == "primary"
    wait_until(lambda: promotion_score(b, a) == "", timeout=60,
               what="the stale primary's score to go (its next monitor)")
    b.run("crm_standby", "--node", a.name, "--update", "on")
    wait_until(lambda: b.roles("d1") == {"node-b": "Promoted"}, timeout=60,
               what="the agent to stop on node-a")
    a.run(failover.tools["bmigrate"], "rejoin", "d1", "--backing", BACKING,
          "--receiver-state-dir", TARGETS, "--manage-dir", MANAGE_DIR, "--control", CONTROL)
    b.run("crm_standby", "--node", a.name, "--update", "off")
    wait_until(lambda: promotion_score(b, a) == "10", timeout=120,
               what="node-a's copy to be promotable")
    assert record(a).get("generation") == record(b).get("generation")
    assert same_bytes(str(a.host_path(BACKING)), str(b.host_path(BACKING)))
