"""bmig-nbd's read-only and the confirmation of a device's role, with the real daemons:

- read-only is held by each connection that asked for it: one closing leaves it while
  another open one still asks; ``read-only false`` makes the device writable at once and
  ends an HA device's wait for confirmation;
- ``bmigrate track set-role NAME primary`` finds bmig-nbd in its default directory or
  BMIG_NBD_DIR and makes a handed-over or refused device writable (confirm lifts a
  read-only once breqd's role is primary); it clears breqd's HA mark when no HA
  replication runs, so a restarted bmig-nbd starts writable, and says why it keeps it
  when one does;
- bmig-nbd's log names the exact command that makes a read-only device writable.
"""

from __future__ import annotations

import json
import os

import pytest

from bmig.nbd.manage_client import ManageClient
from bmig.nbdclient import NbdClient, NbdError
from tests.daemon import wait_until
from tests.integration.failover_helpers import serve
from tests.integration.sync_helpers import MiB, bmigrate

SIZE = 4 * MiB


def writable(server) -> bool:
    with NbdClient.connect(server.uri) as client:
        try:
            client.pwrite(b"w" * 4096, 0)
            client.flush()
        except NbdError:
            return False
    return True


def gone(server, count: int) -> None:
    """bmig-nbd has handled the end of ``count`` connections that made it read-only."""
    wait_until(lambda: server.daemon.log().count("made it read-only is gone") >= count,
               timeout=30, what="bmig-nbd to see the connection end")


def status(server) -> dict:
    with ManageClient(server.manage_dir, "d1", timeout=30) as nbd:
        return nbd.call("status")


@pytest.fixture
def device(breqd, tmp_path):
    """d1 tracked by breqd (its backing made), not served yet."""
    backing = str(tmp_path / "d1.img")
    with open(backing, "wb") as f:
        f.truncate(SIZE)
    client = breqd.client()
    client.add_device("d1", SIZE)
    client.close()
    return backing


def set_lineage(breqd, role: str, **fields) -> dict:
    client = breqd.client()
    try:
        return client.set_lineage("d1", role, **fields)
    finally:
        client.close()


def stats(breqd) -> dict:
    client = breqd.client()
    try:
        return client.stats("d1")
    finally:
        client.close()


def set_role(breqd, server, *extra: str) -> dict:
    """``track set-role d1 primary`` finding bmig-nbd through BMIG_NBD_DIR alone."""
    import subprocess

    from tests.integration.sync_helpers import bmigrate_argv
    env = dict(os.environ, BMIG_CONTROL=breqd.control, BMIG_NBD_DIR=server.manage_dir)
    done = subprocess.run(bmigrate_argv("track", "set-role", "d1", "primary", *extra),
                          env=env, capture_output=True, text=True, timeout=60,
                          stdin=subprocess.DEVNULL)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout) if "--json" in extra else {"text": done.stdout}


def test_one_connection_closing_leaves_the_read_only_another_asks_for(breqd, device,
                                                                       tmp_path):
    server = serve(breqd, device, str(tmp_path))
    first = ManageClient(server.manage_dir, "d1", timeout=30)
    second = ManageClient(server.manage_dir, "d1", timeout=30)
    try:
        first.call("read-only", value=True)
        second.call("read-only", value=True)
        first.close()
        gone(server, 1)
        assert status(server)["read_only"] is True       # the second still asks
        assert not writable(server)
        second.close()
        gone(server, 2)
        assert status(server)["read_only"] is False      # the last gone, breqd: primary
        assert writable(server)
    finally:
        first.close()
        second.close()
        server.daemon.stop()


def test_read_only_false_ends_the_wait_for_confirmation(breqd, device, tmp_path):
    set_lineage(breqd, "primary", ha=True)
    server = serve(breqd, device, str(tmp_path))
    try:
        assert status(server)["awaiting_confirmation"] is True
        with ManageClient(server.manage_dir, "d1", timeout=30) as nbd:
            after = nbd.call("read-only", value=False)
        assert after["read_only"] is False and after["awaiting_confirmation"] is False
        with ManageClient(server.manage_dir, "d1", timeout=30) as nbd:
            nbd.call("read-only", value=True)
        gone(server, 1)
        # That connection gone, breqd says primary and nothing awaits: writable.
        assert status(server)["read_only"] is False
    finally:
        server.daemon.stop()


def test_set_role_makes_a_handed_over_device_writable_through_bmig_nbd_dir(breqd, device,
                                                                            tmp_path):
    set_lineage(breqd, "handed-over")
    server = serve(breqd, device, str(tmp_path))
    try:
        assert not writable(server)
        command = f"bmigrate track set-role d1 primary --manage-dir {server.manage_dir}"
        assert command in server.daemon.log()
        out = set_role(breqd, server)["text"]
        assert "bmig-nbd serves it writable" in out, out
        assert writable(server)
    finally:
        server.daemon.stop()


def test_set_role_clears_the_ha_mark_when_no_ha_replication_runs(breqd, device, tmp_path):
    set_lineage(breqd, "primary", ha=True)
    server = serve(breqd, device, str(tmp_path))
    try:
        assert not writable(server)
        command = f"bmigrate track set-role d1 primary --manage-dir {server.manage_dir}"
        assert command in server.daemon.log()
        report = set_role(breqd, server, "--json")
        assert report["ha"] is False and report["ha_kept"] is None
        assert report["bmig_nbd"]["read_only"] is False
        assert writable(server)
    finally:
        server.daemon.stop()
    again = serve(breqd, device, str(tmp_path), name="nbd-again")   # a watchdog restart
    try:
        assert writable(again)
    finally:
        again.daemon.stop()


def test_set_role_keeps_the_ha_mark_while_the_ha_replication_runs_and_says_why(
        breqd, device, tmp_path):
    set_lineage(breqd, "primary", ha=True)
    server = serve(breqd, device, str(tmp_path))
    ha = ManageClient(server.manage_dir, "d1", timeout=30)   # the HA replication's link
    try:
        ha.call("ha-state", state="degraded")
        out = set_role(breqd, server)["text"]
        assert "stays marked for the HA replication" in out and "degraded" in out, out
        assert stats(breqd)["ha"] is True
        assert writable(server)                          # confirmed all the same
    finally:
        ha.close()
        server.daemon.stop()
