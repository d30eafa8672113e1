"""``bmigrate promote`` on the target host, piece by piece, with the real daemons:

- the fence hook runs before anything changes (it sees the record still secondary, with
  BMIG_DEVICE and BMIG_ACTION); a failing fence stops the promotion (exit 12, the record
  untouched) unless ``--no-fence``; neither flag is a configuration error;
- a source still connected (a replication session holds the copy) is refused unless
  ``--force-connected``;
- ``--track`` makes the new primary trackable from its very first write;
- an HA source restarted while its copy was not promoted stays read-only until an
  operator confirms its role (``track set-role NAME primary --manage-dir``).
"""

from __future__ import annotations

import json
import os

import pytest

from bmig.nbdclient import NbdClient, NbdError
from tests.integration.failover_helpers import (dirty_chunks, keep_replicating, second_host,
                                                serve, wait_state)
from tests.daemon import alive, wait_until
from tests.integration.nbd_helpers import start_nbd
from tests.integration.sync_helpers import (CHUNK, MiB, bmigrate, migrations,  # noqa: F401
                                            receivers, start_receiver, sync)

SIZE = 16 * MiB


@pytest.fixture
def copy(breqd, tmp_path, receivers):
    """A consistent copy of d1 on the "target host": synced, the source then idle."""
    server = start_nbd(breqd, tmp_path, SIZE)
    target = str(tmp_path / "target.img")
    r = start_receiver(tmp_path, {"d1": target})
    receivers.append(r)
    sync(breqd, "d1", "--source", server.backing, "--to", r.url("d1"), "--secret-file",
         r.secret_file, "--threshold", "0")
    assert r.record("d1")["state"] == "consistent"
    yield server, r, target
    server.daemon.stop()


def promote(r, target, *extra: str, control: str = "/nonexistent", check: bool = False):
    return bmigrate(control, "promote", "d1", "--target", target, "--receiver-state-dir",
                    r.state_dir, *extra, check=check)


def test_a_failing_fence_stops_the_promotion_unless_no_fence(copy, tmp_path):
    server, r, target = copy
    before = r.record("d1")
    failed = promote(r, target, "--fence", "exit 3")
    assert failed.returncode == 12, failed.stderr
    assert "fence" in failed.stderr and "--no-fence" in failed.stderr
    assert r.record("d1") == before, "nothing was promoted"

    neither = promote(r, target)
    assert neither.returncode == 3, neither.stderr
    assert "--fence" in neither.stderr and "--no-fence" in neither.stderr
    assert r.record("d1") == before

    # The fence runs first: it sees the copy still a secondary of the old generation.
    saw = tmp_path / "fence-saw"
    record = os.path.join(r.state_dir, "d1.target")
    done = promote(r, target, "--json", "--fence",
                   f'echo "$BMIG_DEVICE $BMIG_ACTION" > {saw}.env && cp {record} {saw}.json',
                   check=True)
    report = json.loads(done.stdout)
    assert report["fenced"] is True
    assert (tmp_path / "fence-saw.env").read_text().split() == ["d1", "fence"]
    seen = json.loads((tmp_path / "fence-saw.json").read_text())
    assert seen["role"] == "secondary" and seen["generation"] == before["generation"]
    after = r.record("d1")
    assert after["role"] == "primary"
    assert after["generation"] != before["generation"]
    assert after["previous"][0] == before["generation"]


def test_a_failed_fence_is_passed_over_only_with_no_fence(copy):
    server, r, target = copy
    done = promote(r, target, "--fence", "exit 3", "--no-fence", "--json", check=True)
    report = json.loads(done.stdout)
    assert report["fenced"] is False
    assert "fence" in done.stderr                  # said, not hidden
    assert r.record("d1")["role"] == "primary"


def test_a_source_still_connected_is_refused_unless_forced(copy, breqd):
    server, r, target = copy
    bmigrate(breqd, "replicate", "d1", "--to", r.url("d1"), "--secret-file", r.secret_file,
             "--manage-dir", server.manage_dir)
    sync(breqd, "d1", "--source", server.backing, "--to", r.url("d1"), "--secret-file",
         r.secret_file, "--threshold", "0")          # nothing dirty outside replication
    before = r.record("d1")
    assert before["state"] == "in-sync"
    refused = promote(r, target, "--no-fence")
    assert refused.returncode == 9, refused.stderr
    assert "still connected" in refused.stderr and "replication" in refused.stderr
    assert r.record("d1") == before
    done = promote(r, target, "--no-fence", "--force-connected", "--json", check=True)
    assert json.loads(done.stdout)["connected"] == ["replication"]
    assert r.record("d1")["role"] == "primary"


def test_the_new_primary_is_tracked_from_its_first_write(copy, tmp_path):
    server, r, target = copy
    host2 = second_host(tmp_path)
    try:
        report = json.loads(promote(r, target, "--no-fence", "--track", "--json",
                                    control=host2.control, check=True).stdout)
        assert report["tracked"]["generation"] == report["generation"]
        assert dirty_chunks(host2, SIZE) == set(), "adopted clean: the copy is the data"
        new = serve(host2, target, str(tmp_path / "host2"))
        with NbdClient.connect(new.uri) as client:
            client.pwrite(b"\x5a" * 4096, 5 * CHUNK + 8192)     # the first write
            client.flush()
        assert dirty_chunks(host2, SIZE) == {5}
    finally:
        host2.stop()


def test_an_ha_source_back_without_a_promotion_is_read_only_until_confirmed(
        breqd, tmp_path, receivers, migrations):
    server = start_nbd(breqd, tmp_path, SIZE)
    r = start_receiver(tmp_path, {"d1": str(tmp_path / "target.img")})
    receivers.append(r)
    ha = keep_replicating(migrations, breqd, server, r.url("d1"), r.secret_file)
    wait_state(ha, "synchronous", timeout=120)
    ha.kill9()                                  # the source host restarts
    server.daemon.kill9()
    breqd.daemon.kill9()
    breqd.restart()
    again = serve(breqd, server.backing, str(tmp_path), name="nbd-again")
    try:
        with NbdClient.connect(again.uri) as client:
            with pytest.raises(NbdError):
                client.pwrite(b"x" * 4096, 0)
        status = json.loads(bmigrate(breqd, "replicate", "d1", "--status", "--manage-dir",
                                     again.manage_dir, "--json").stdout)
        assert status["awaiting_confirmation"] is True and status["read_only"] is True
        bmigrate(breqd, "track", "set-role", "d1", "primary", "--manage-dir",
                 again.manage_dir)
        with NbdClient.connect(again.uri) as client:
            client.pwrite(b"x" * 4096, 0)
            client.flush()
    finally:
        again.daemon.stop()


def test_every_refusal_comes_before_the_fence(copy, tmp_path):
    """A typo in --target, another file than the copy, or a copy a session holds: refused
    with the old host not fenced and the record untouched."""
    server, r, target = copy
    before = r.record("d1")
    fenced = tmp_path / "fenced"
    fence = ("--fence", f"touch {fenced}")

    typo = promote(r, target + ".typo", *fence)
    assert typo.returncode == 3, typo.stderr
    assert "does not exist" in typo.stderr and "nothing was fenced" in typo.stderr

    other = tmp_path / "other.img"
    other.write_bytes(b"\0" * SIZE)
    wrong = promote(r, str(other), *fence)
    assert wrong.returncode == 9, wrong.stderr
    assert "is not the copy the record" in wrong.stderr

    from bmig.receiver.target import TargetLock
    held = TargetLock(r.state_dir, "d1")
    held.acquire(1.0)                        # a pass session holds the copy
    try:
        busy = promote(r, target, *fence)
    finally:
        held.release()
    assert busy.returncode in (9, 17), busy.stderr      # still connected, or busy

    assert not fenced.exists(), "a refused promotion fenced the old host"
    assert r.record("d1") == before
    promote(r, target, *fence, check=True)
    assert fenced.exists() and r.record("d1")["role"] == "primary"


def test_track_checks_breqd_and_the_name_before_fencing(copy, tmp_path):
    server, r, target = copy
    before = r.record("d1")
    fenced = tmp_path / "fenced"
    unreachable = promote(r, target, "--fence", f"touch {fenced}", "--track",
                          control=str(tmp_path / "no-breqd.sock"))
    assert unreachable.returncode == 4, unreachable.stderr
    assert "nothing was fenced or promoted" in unreachable.stderr
    host2 = second_host(tmp_path)
    try:
        bmigrate(host2, "track", "add", "d1", "--size", str(SIZE))
        taken = promote(r, target, "--fence", f"touch {fenced}", "--track",
                        control=host2.control)
        assert taken.returncode == 5, taken.stderr
        assert "tracks 'd1' already" in taken.stderr
        assert "nothing was fenced or promoted" in taken.stderr
    finally:
        host2.stop()
    assert not fenced.exists()
    assert r.record("d1") == before


def test_track_failing_after_the_promotion_says_how_to_finish(copy, tmp_path):
    """breqd dies while the fence runs: the copy is promoted, and the error line says so
    with the command that tracks it; that command works."""
    server, r, target = copy
    host2 = second_host(tmp_path)
    try:
        done = promote(r, target, "--fence", f"kill -9 {host2.daemon.pid}", "--track",
                       control=host2.control)
        assert done.returncode == 4, done.stderr
        record = r.record("d1")
        assert record["role"] == "primary"
        assert f"d1 is promoted (generation {record['generation']}) but not tracked" \
            in done.stderr
        finish = done.stderr.split("track it with: ", 1)[1].strip().split()
        assert finish[:3] == ["bmigrate", "track", "add"]
        host2.restart()
        bmigrate(host2, *finish[1:])
        assert dirty_chunks(host2, SIZE) == set()
        stats = json.loads(bmigrate(host2, "track", "status", "d1", "--json").stdout)
        assert record["generation"] in json.dumps(stats)
    finally:
        host2.stop()


def test_the_fence_prints_to_stderr_only_and_is_killed_whole_at_its_timeout(copy, tmp_path):
    server, r, target = copy
    done = promote(r, target, "--json", "--fence", "echo to-stdout; echo to-stderr >&2",
                   check=True)
    report = json.loads(done.stdout)                # nothing but the one JSON result
    assert report["fenced"] is True
    assert "d1: fence: to-stdout" in done.stderr and "d1: fence: to-stderr" in done.stderr


def test_a_fence_past_its_timeout_is_killed_with_its_process_group(copy, tmp_path):
    from bmig.errors import HookFailed
    from bmig.receiver.promotion import PromoteSettings, promote as promote_copy
    from bmig.sender.hooks import run_hook

    server, r, target = copy
    before = r.record("d1")
    pidfile = tmp_path / "child.pid"
    settings = PromoteSettings(state_dir=r.state_dir, export="d1", target_path=target,
                               fence=f"sleep 60 & echo $! > {pidfile}; wait",
                               fence_timeout=1.0)
    with pytest.raises(HookFailed, match="did not finish within"):
        promote_copy(settings, lambda c, e, t: run_hook(c, e, t, lambda s, line: None))
    child = int(pidfile.read_text())
    wait_until(lambda: not alive(child), timeout=10,
               what="the fence's background child to be killed with its group")
    assert r.record("d1") == before



def test_when_a_sync_has_returned_its_session_on_the_receiver_is_over(breqd, tmp_path,
                                                                        receivers):
    """bmigrate waits for breceive to end the session after BYE (its final sync, its
    locks let go), so a promotion right after a sync never finds the copy still held;
    the receiver here takes FINISH_DELAY seconds to end it."""
    from bmig.receiver.target import is_locked
    from tests.integration import breceive_faults

    server = start_nbd(breqd, tmp_path, SIZE)
    target = str(tmp_path / "target.img")
    r = start_receiver(tmp_path, {"d1": target}, program=breceive_faults.argv("finish-slow"))
    receivers.append(r)
    try:
        sync(breqd, "d1", "--source", server.backing, "--to", r.url("d1"), "--secret-file",
             r.secret_file, "--threshold", "0")
        assert not is_locked(os.path.join(r.state_dir, "d1.lock")), \
            "bmigrate sync returned while its session still held the target"
    finally:
        server.daemon.stop()
