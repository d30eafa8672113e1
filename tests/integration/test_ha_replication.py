"""The HA replication mode (``bmigrate replicate --keep``) through a relay on 127.0.0.1
that stops forwarding (a partition: the link goes silent, nothing breaks).

- Under a live writer: synchronous, then the partition: degraded (the writes go on),
  then the link heals: catching up and synchronous again, with no operator action; the
  target equals the source and its record says in-sync; bmig-nbd's status carries the
  state.
- A partition during a catch-up pass: the target's record says inconsistent, and
  ``bmigrate promote`` refuses that copy unless forced (--force-inconsistent).
"""

from __future__ import annotations

import json
import os

from tests.daemon import wait_until
from tests.integration.failover_helpers import PartitionRelay, keep_replicating, wait_state
from tests.integration.nbd_helpers import Writer, start_nbd
from tests.integration.sync_helpers import (MiB, bmigrate, migrations,  # noqa: F401
                                            receivers, same_bytes, start_receiver)

SIZE = 16 * MiB


def nbd_status(breqd, server) -> dict:
    return json.loads(bmigrate(breqd, "replicate", "d1", "--status", "--manage-dir",
                               server.manage_dir, "--json").stdout)


def test_a_partition_degrades_then_catches_up_and_is_synchronous_again(
        breqd, tmp_path, receivers, migrations):
    server = start_nbd(breqd, tmp_path, SIZE)
    target = str(tmp_path / "target.img")
    r = start_receiver(tmp_path, {"d1": target})
    receivers.append(r)
    relay = PartitionRelay(("127.0.0.1", r.port)).start()
    writer = None
    try:
        ha = keep_replicating(migrations, breqd, server, r.url("d1", port=relay.port),
                              r.secret_file, "--ack-timeout", "1")
        wait_state(ha, "synchronous", timeout=120)
        assert nbd_status(breqd, server)["ha"]["state"] == "synchronous"
        writer = Writer(server.uri, per_second=200, size=SIZE)
        writer.start()
        wait_until(lambda: writer.writes >= 100, timeout=30, what="writes")
        relay.partition()
        wait_state(ha, "degraded", after=ha.seen, timeout=60)
        degraded_at = writer.writes
        wait_until(lambda: writer.writes >= degraded_at + 100, timeout=30,
                   what="writes to go on while degraded")
        assert nbd_status(breqd, server)["ha"]["state"] in ("degraded", "connecting")
        relay.heal()
        wait_state(ha, "catching up", after=ha.seen, timeout=120)
        wait_state(ha, "synchronous", after=ha.seen, timeout=120)
        writer.finish()
        writer = None
        wait_until(lambda: breqd.client().stats("d1")["dirty_bytes"] == 0, timeout=60,
                   what="the last writes to settle")
        assert same_bytes(server.backing, target)
        assert r.record("d1")["state"] == "in-sync"
        assert ha.proc.poll() is None, "it ran on by itself"
    finally:
        if writer is not None:
            writer.stop.set()
            writer.join(timeout=30)
        relay.stop()


def test_a_copy_partitioned_during_a_catch_up_is_not_promoted_without_force(
        breqd, tmp_path, receivers, migrations):
    server = start_nbd(breqd, tmp_path, SIZE)
    target = str(tmp_path / "target.img")
    r = start_receiver(tmp_path, {"d1": target})
    receivers.append(r)
    relay = PartitionRelay(("127.0.0.1", r.port)).start()
    try:
        slow = tmp_path / "slow.toml"               # a catch-up that takes seconds
        slow.write_text('bwlimit = "2M"\n')
        ha = keep_replicating(migrations, breqd, server, r.url("d1", port=relay.port),
                              r.secret_file, "--ack-timeout", "1", "--config", str(slow))
        wait_state(ha, "synchronous", timeout=120)
        relay.partition()
        wait_state(ha, "degraded", after=ha.seen, timeout=60)
        with open(server.backing, "r+b") as f:      # what the catch-up must ship: 12 MiB
            f.write(os.urandom(12 * MiB))
        breqd.client().set_all_dirty("d1")
        relay.heal()
        wait_state(ha, "catching up", after=ha.seen, timeout=120)
        wait_until(lambda: r.record("d1")["state"] == "inconsistent", timeout=60,
                   what="the catch-up pass to begin")
        relay.partition()
        ha.kill9()                                  # the source is gone mid-catch-up
        server.daemon.kill9()
        relay.stop()                                # its sessions end on the receiver
        wait_until(lambda: not r.record("d1").get("replication_ended") is None
                   and not _busy(r), timeout=60, what="the sessions to end")
        refused = bmigrate(breqd, "promote", "d1", "--target", target,
                           "--receiver-state-dir", r.state_dir, "--no-fence", check=False)
        assert refused.returncode == 9, refused.stderr
        assert "inconsistent" in refused.stderr
        assert r.record("d1")["role"] == "secondary"
        forced = json.loads(bmigrate(breqd, "promote", "d1", "--target", target,
                                     "--receiver-state-dir", r.state_dir, "--no-fence",
                                     "--force-inconsistent", "--json").stdout)
        assert forced["loss"]["consistent"] is False
        assert forced["loss"]["bytes_at_most"] is None
        assert r.record("d1")["role"] == "primary"
    finally:
        relay.stop()


def _busy(r) -> bool:
    from bmig.receiver.promotion import connected
    return bool(connected(r.state_dir, "d1"))


def test_the_record_says_consistent_only_for_a_copy_of_one_moment(breqd, tmp_path,
                                                                   receivers):
    """A sync of an idle device leaves a consistent copy; one that converged while the
    device is written (chunks of different moments) an inconsistent one; a replication
    session makes it inconsistent when it opens (the source may have chunks the target
    lacks), until a pass with nothing dirty outside replication ends."""
    server = start_nbd(breqd, tmp_path, SIZE)
    target = str(tmp_path / "target.img")
    r = start_receiver(tmp_path, {"d1": target})
    receivers.append(r)
    args = ("d1", "--source", server.backing, "--to", r.url("d1"), "--secret-file",
            r.secret_file)
    from tests.integration.sync_helpers import sync
    sync(breqd, *args, "--threshold", "0")
    assert r.record("d1")["state"] == "consistent"
    writer = Writer(server.uri, per_second=300, size=SIZE)
    writer.start()
    try:
        wait_until(lambda: writer.writes >= 50, timeout=30, what="writes")
        sync(breqd, *args, "--threshold", "64M", ok=(0, 15))
        assert r.record("d1")["state"] == "inconsistent"
    finally:
        writer.finish()
    sync(breqd, *args, "--threshold", "0")
    assert r.record("d1")["state"] == "consistent"
    bmigrate(breqd, "replicate", "d1", "--to", r.url("d1"), "--secret-file", r.secret_file,
             "--manage-dir", server.manage_dir)
    assert r.record("d1")["state"] == "inconsistent"
    assert r.record("d1")["protocol"] == "C"
    sync(breqd, *args, "--threshold", "0")
    assert r.record("d1")["state"] == "in-sync"
    bmigrate(breqd, "replicate", "d1", "--stop", "--manage-dir", server.manage_dir)
    wait_until(lambda: r.record("d1")["state"] == "consistent", timeout=30,
               what="the end of the replication session")
