"""Failover when the source host dies, and its return, with the real daemons.

- The HA replication (``bmigrate replicate --keep``) under a journaled writer; the source
  host "crashes": kill -9 of bmig-nbd, breqd, the HA process and the writer together.
  ``bmigrate promote`` on the target host: under protocol C every write the writer saw
  acknowledged is on the promoted copy and the report says nothing was lost; under
  protocol A what is missing is at most what the report says. The promoted copy is
  tracked at once (``--track``) and served writable by bmig-nbd there.
- The old source, started again, is read-only (its role is not confirmed) and refused by
  the new primary (exit 9). ``bmigrate rejoin`` there, then a sync from the new primary:
  it ships the union of the old source's dirty chunks at its death and the new primary's
  writes since the promotion (measured: committed bytes against that union), and the
  two sides end identical.
- Both sides promoted (a forced split brain): refused with both generations named;
  resolved by ``rejoin --discard-my-data`` on one side.
"""

from __future__ import annotations

import json
import os
import random

import pytest

from bmig.nbdclient import NbdClient, NbdError
from tests.crashloop import BLOCK, HEAD, MAGIC, Journal, JournaledWriter
from tests.daemon import wait_until
from tests.integration.failover_helpers import (dirty_chunks, keep_replicating, second_host,
                                                serve, wait_state)
from tests.integration.nbd_helpers import start_nbd
from tests.integration.sync_helpers import (CHUNK, MiB, bmigrate, error_lines,  # noqa: F401
                                            migrations, receivers, same_bytes,
                                            start_receiver, summary_of, sync)

SIZE = 16 * MiB


def missing_writes(journal: Journal, path: str) -> list[int]:
    """Blocks whose acknowledged write is not in ``path`` (nor a later one whose outcome
    the writer did not learn)."""
    missing = []
    with open(path, "rb") as f:
        for block, acked in journal.acked.items():
            f.seek(block * BLOCK)
            data = f.read(BLOCK)
            magic, number, write = HEAD.unpack_from(data)
            if magic != MAGIC or number != block or write < acked:
                if not (write in journal.unknown.get(block, ()) and write > acked):
                    missing.append(block)
    return missing


def held_bytes(host) -> int:
    client = host.client()
    try:
        return int(client.stats("d1")["held_bytes"])
    finally:
        client.close()


@pytest.fixture
def crashed(request, breqd, tmp_path, receivers, migrations):
    """The source host replicates with the HA mode under a journaled writer, then dies.
    Returns what the test needs to look at both hosts afterwards."""
    protocol = request.param
    server = start_nbd(breqd, tmp_path, SIZE)
    target = str(tmp_path / "target.img")
    r = start_receiver(tmp_path, {"d1": target})
    receivers.append(r)
    ha = keep_replicating(migrations, breqd, server, r.url("d1"), r.secret_file,
                          "--protocol", protocol, "--ack-timeout", "5")
    wait_state(ha, "synchronous", timeout=120)
    journal = Journal(SIZE // BLOCK)
    writer = JournaledWriter(server.uri, journal, seed=7, per_second=400)
    writer.start()
    wait_until(lambda: writer.writes >= 400, timeout=60, what="writes while replicating")
    # The crash: every process of the source host at once.
    server.daemon.kill9()
    breqd.daemon.kill9()
    ha.kill9()
    writer.finish()
    assert writer.writes >= 400
    yield protocol, server, r, target, journal
    server.daemon.stop()


def promote(r, target, *extra, control=None, check=True):
    args = ["promote", "d1", "--target", target, "--receiver-state-dir", r.state_dir,
            "--no-fence", "--json", *extra]
    if control is not None:
        args += ["--track", "--control", control]
    done = bmigrate(control or "/nonexistent", *args, check=check)
    return done, (json.loads(done.stdout) if done.returncode == 0 else None)


@pytest.mark.parametrize("crashed", ["C", "A"], indirect=True)
def test_a_crashed_source_is_promoted_refused_and_rejoined_with_the_union(
        crashed, breqd, tmp_path, receivers):
    protocol, server, r, target, journal = crashed
    # The receiver saw its sessions end: the source is not connected any more.
    wait_until(lambda: not r.record("d1").get("replication_ended") is None, timeout=30,
               what="the replication session to end")
    assert r.record("d1")["state"] == "consistent"
    host2 = second_host(tmp_path)
    try:
        _, report = promote(r, target, control=host2.control)
        assert report["state"] == "consistent" and report["loss"]["consistent"]
        missing = missing_writes(journal, target)
        if protocol == "C":
            assert report["loss"]["bytes_at_most"] == 0, report
            assert missing == [], f"acknowledged writes missing: {missing[:10]}"
        else:
            assert report["loss"]["bytes_at_most"] >= len(missing) * BLOCK
        assert report["tracked"]["generation"] == report["generation"]
        # The new primary is served at once, writable, every write tracked.
        new = serve(host2, target, str(tmp_path / "host2"))
        rng = random.Random(3)
        with NbdClient.connect(new.uri) as client:
            for _ in range(30):
                client.pwrite(rng.randbytes(4096), rng.randrange(SIZE // 4096) * 4096)
            client.flush()
        new_dirty = dirty_chunks(host2, SIZE)
        assert new_dirty, "writes on the new primary are tracked"
        # bmig-nbd holds the chunks just written for a moment (a writer may go on): a
        # pass would ship them and find them dirty again. The rejoin's count starts
        # once they are let go.
        wait_until(lambda: held_bytes(host2) == 0, timeout=30,
                   what="the new primary's holds to end")

        # The old source comes back: read-only until told, and refused by the new primary.
        breqd.restart()
        old = serve(breqd, server.backing, str(tmp_path), name="nbd-again")
        with NbdClient.connect(old.uri) as client:
            with pytest.raises(NbdError) as refused:
                client.pwrite(b"x" * 4096, 0)
        assert refused.value.errno_name in ("EPERM", "EROFS"), refused.value
        old_dirty = dirty_chunks(breqd, SIZE)
        stale = sync(breqd, "d1", "--source", server.backing, "--to", r.url("d1"),
                     "--secret-file", r.secret_file, check=False)
        assert stale.returncode == 9, stale.stderr
        assert "primary" in stale.stderr

        # Rejoin: the old source becomes the new primary's secondary.
        old_state = str(tmp_path / "old-breceive-state")
        done = bmigrate(breqd, "rejoin", "d1", "--backing", server.backing,
                        "--receiver-state-dir", old_state, "--manage-dir", old.manage_dir,
                        "--json")
        prepared = json.loads(done.stdout)
        assert prepared["resync"] == "ranges"
        with NbdClient.connect(old.uri) as client:      # rejoin's connection ended
            with pytest.raises(NbdError):
                client.pwrite(b"x" * 4096, 0)
        old.daemon.stop()
        back = start_receiver(tmp_path, {"d1": server.backing}, name="old-breceive")
        assert back.state_dir == old_state
        receivers.append(back)
        done = sync(host2, "d1", "--source", target, "--to", back.url("d1"),
                    "--secret-file", back.secret_file, "--threshold", "0", "--json")
        summary = summary_of(done)
        union = old_dirty | new_dirty
        assert summary["relation"] == "rejoin"
        assert summary["bytes_committed"] <= 1.1 * len(union) * CHUNK, (
            json.dumps(summary), prepared, sorted(old_dirty), sorted(new_dirty))
        assert summary["bytes_committed"] >= len(new_dirty) * CHUNK // 2
        assert same_bytes(target, server.backing)
        assert back.record("d1")["state"] == "consistent"
    finally:
        host2.stop()


def test_both_sides_promoted_is_a_split_brain_refused_until_one_side_is_discarded(
        breqd, tmp_path, receivers):
    """The target is promoted without its source; the source is also made primary by
    force and written. Neither descends from the other: refused, both generations
    named; rejoin --discard-my-data on the old source resolves it."""
    server = start_nbd(breqd, tmp_path, SIZE)
    with open(server.backing, "r+b") as f:
        f.write(os.urandom(SIZE))
    target = str(tmp_path / "target.img")
    r = start_receiver(tmp_path, {"d1": target})
    receivers.append(r)
    sync(breqd, "d1", "--source", server.backing, "--to", r.url("d1"), "--secret-file",
         r.secret_file, "--threshold", "0")
    host2 = second_host(tmp_path)
    try:
        promote(r, target, control=host2.control)
        new = serve(host2, target, str(tmp_path / "host2"))
        with NbdClient.connect(new.uri) as client:
            client.pwrite(os.urandom(CHUNK), 3 * CHUNK)
            client.flush()
        # The old source is made primary too, by force: a new generation, and writes.
        forced = json.loads(bmigrate(breqd, "track", "set-role", "d1", "primary",
                                     "--new-generation", "--json").stdout)
        with NbdClient.connect(server.uri) as client:   # the old bmig-nbd never stopped
            client.pwrite(os.urandom(CHUNK), 9 * CHUNK)
            client.flush()
        old_state = str(tmp_path / "old-breceive-state")
        bmigrate(breqd, "rejoin", "d1", "--backing", server.backing, "--receiver-state-dir",
                 old_state, "--manage-dir", server.manage_dir)
        back = start_receiver(tmp_path, {"d1": server.backing}, name="old-breceive")
        receivers.append(back)
        refused = sync(host2, "d1", "--source", target, "--to", back.url("d1"),
                       "--secret-file", back.secret_file, check=False)
        assert refused.returncode == 9, refused.stderr
        message = error_lines(refused.stderr)[0]
        promoted = r.record("d1")["generation"]
        assert "split brain" in message
        assert forced["generation"] in message and promoted in message, message
        assert "--discard-my-data" in message
        assert not same_bytes(target, server.backing)
        # The explicit choice: the old source's changes are the ones discarded.
        bmigrate(breqd, "rejoin", "d1", "--backing", server.backing, "--receiver-state-dir",
                 old_state, "--manage-dir", server.manage_dir, "--discard-my-data")
        done = sync(host2, "d1", "--source", target, "--to", back.url("d1"),
                    "--secret-file", back.secret_file, "--threshold", "0", "--json")
        assert summary_of(done)["relation"] == "rejoin"
        assert summary_of(done)["bytes_committed"] <= 4 * CHUNK
        assert same_bytes(target, server.backing)
    finally:
        host2.stop()
