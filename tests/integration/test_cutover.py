"""bmigrate cutover, end to end, with the real daemons: breqd, bmig-nbd and breceive.

- Writes faster than a bandwidth-limited sync can ship: ``bmigrate sync`` says it is not
  converging (exit 10); with the writer still running, ``bmigrate cutover --freeze``
  (protocol C) converges and hands over; the writer's next write is refused (EPERM); the
  source and the target are byte-identical; the source is handed-over in breqd and the
  target is the primary with the new generation.
- ext4 mounted through nbdfuse + loop while a workload writes and fsyncs files; the
  pre-handover hook stops the workload and unmounts: the target passes e2fsck and holds
  every file fsynced before the hook, with the same content.
- Lineage after the cutover (invariant 7): the old source is refused (exit 9, told the
  target is the primary and how to fail back, never to discard it); a fail-back from the new primary (``track add --adopt``) to the
  old source is a ``descendant`` and ships only what was written since the handover.
- ``bmigrate verify`` finds a chunk corrupted on the target behind the tool's back (exit
  14, the offset); ``--repair`` marks it dirty and the next sync fixes it. A cutover with
  --verify refuses to hand over to such a target (exit 14).
- Failures before the handover (a failed hook, exit 12; the drain not done within
  --timeout, exit 13; verify, exit 14) leave the source primary and writable.
- The downtime is reported: a positive number of seconds, small without load.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import socket
import threading
import time

import pytest

from bmig.nbdclient import NbdClient, NbdError
from tests.conftest import BreqdInstance
from tests.daemon import Daemon, breqd_argv, wait_until
from tests.integration.nbd_helpers import NbdFuse, Writer, nbd_argv, require, start_nbd, tool
from tests.integration.sync_helpers import (CHUNK, MiB, bmigrate, digest,  # noqa: F401
                                            error_lines, json_lines, receivers, same_bytes,
                                            start_receiver, summary_of, sync)
from tests.relay import Relay

CUTOVER_TIMEOUT = 120


# -- helpers -------------------------------------------------------------------------------

class SlowRelay(Relay):
    """The relay of tests.relay, with what goes upstream paced to ``rate`` bytes per
    second per connection: a slow link between source and target (the cutover has no
    --bwlimit of its own)."""

    def __init__(self, upstream: tuple[str, int], rate: int):
        super().__init__(upstream)
        self.rate = rate
        self._halt = threading.Event()

    def _pump(self, src: socket.socket, dst: socket.socket, upstream: bool) -> None:
        if not upstream:
            return super()._pump(src, dst, upstream)
        buf = bytearray(16 * 1024)
        view = memoryview(buf)
        allowance, last = 0.0, time.monotonic()
        try:
            while not self._halt.is_set():
                n = src.recv_into(buf)
                if n == 0:
                    try:
                        dst.shutdown(socket.SHUT_WR)
                    except OSError:
                        pass
                    return
                with self._lock:
                    self.bytes_upstream += n
                while True:                              # a token bucket of 16 KiB
                    now = time.monotonic()
                    allowance = min(allowance + (now - last) * self.rate, float(len(buf)))
                    last = now
                    if allowance >= n or self._halt.is_set():
                        break
                    self._halt.wait((n - allowance) / self.rate)
                allowance -= n
                dst.sendall(view[:n])
        except OSError:
            return

    def stop(self) -> None:
        self._halt.set()
        super().stop()


def prefill(path: str, size: int, seed: int = 1) -> None:
    """Random (incompressible) data, written behind bmig-nbd's back before any client:
    the target is new, so all of it is shipped anyway."""
    with open(path, "r+b") as f:
        f.write(random.Random(seed).randbytes(size))


def stats(breqd, name: str = "d1") -> dict:
    client = breqd.client()
    try:
        return client.stats(name)
    finally:
        client.close()


def settled(breqd) -> bool:
    s = stats(breqd)
    return not (s["held_bytes"] or s["mirrored_bytes"] or s["inflight_bytes"])


def cutover(breqd, server, r, record_dir: str, *extra: str, as_json: bool = True,
            timeout: float = CUTOVER_TIMEOUT):
    """``bmigrate cutover d1 ...``; (the finished process, its JSON lines)."""
    args = ["cutover", "d1", "--source", server.backing, "--to", r.url("d1"),
            "--secret-file", r.secret_file, "--manage-dir", server.manage_dir,
            "--record-dir", record_dir, *extra]
    done = bmigrate(breqd, *args, *(["--json"] if as_json else []), timeout=timeout,
                    check=False)
    return done, (json_lines(done.stdout) if as_json else [])


def final(done, events: list) -> dict:
    assert done.returncode == 0, done.stderr
    assert events and events[-1]["event"] == "cutover", done.stdout
    return events[-1]


def replication_status(breqd, server) -> dict:
    return json.loads(bmigrate(breqd, "replicate", "d1", "--status", "--manage-dir",
                               server.manage_dir, "--json").stdout)


def source_status(breqd, r=None) -> dict:
    args = ["status", "d1", "--json"]
    if r is not None:
        args += ["--to", r.url("d1"), "--secret-file", r.secret_file]
    return json.loads(bmigrate(breqd, *args).stdout)


def write_through(uri: str, writes: dict[int, bytes]) -> None:
    with NbdClient.connect(uri, timeout=60) as client:
        for offset, data in writes.items():
            client.pwrite(data, offset)
        client.flush()


def assert_still_primary_and_writable(breqd, server, r) -> None:
    """What every failure before step 6 must leave behind."""
    status = replication_status(breqd, server)
    assert not status["replicating"], status
    assert not status["frozen"] and not status["read_only"], status
    assert not status["blocked"], status
    mine = source_status(breqd, r)
    assert mine["role"] == "primary" and mine["successor"] == "0" * 16, mine
    assert mine["target"]["role"] != "primary", mine["target"]
    assert r.record("d1")["role"] != "primary"
    data = os.urandom(CHUNK)
    write_through(server.uri, {3 * CHUNK: data})          # writes still succeed
    with open(server.backing, "rb") as f:
        f.seek(3 * CHUNK)
        assert f.read(CHUNK) == data
    wait_until(lambda: settled(breqd), timeout=30, what="the holds to settle")
    assert stats(breqd)["dirty_bytes"] >= CHUNK           # ... and are tracked, not lost


@pytest.fixture
def rig(breqd, tmp_path, receivers):
    """bmig-nbd serving d1 (SIZE bytes, set by the test with ``rig(size)``) and breceive
    with target tgt.img; bmig-nbd is stopped at teardown, breceive by ``receivers``."""
    started = []

    def make(size: int, *nbd_args: str, fill: bool = True):
        server = start_nbd(breqd, tmp_path, size, *nbd_args)
        started.append(server)
        if fill:
            prefill(server.backing, size)
        target = str(tmp_path / "tgt.img")
        r = start_receiver(tmp_path, {"d1": target})
        receivers.append(r)
        return server, r, target

    yield make
    for server in started:
        server.daemon.stop()


# -- 1. converging under writes that a sync cannot keep up with --------------------------

def test_cutover_converges_under_writes_a_sync_cannot_keep_up_with(breqd, rig, tmp_path):
    size = 2 * MiB                          # a pass takes about 2 s at 1 MB/s
    # Few chunks held at once: with the default (bmig-nbd keeps every chunk it writes
    # held, like an activity log) each pass would first wait 5 s for holds to go.
    server, r, target = rig(size, "--hold-chunks", "4")
    writer = Writer(server.uri, per_second=1500, size=size)   # ~6 MB/s of 4 KiB writes
    writer.start()
    try:
        live = sync(breqd, "d1", "--source", server.backing, "--to", r.url("d1"),
                    "--secret-file", r.secret_file, "--bwlimit", "1M", "--threshold", "0",
                    "--window", "4M", check=False)
        assert live.returncode == 10, live.stderr
        message = error_lines(live.stderr)
        assert len(message) == 1 and "not converging" in message[0], live.stderr
        assert "protocol C" in message[0]
        assert writer.is_alive() and writer.refused is None
        before = writer.writes

        done, events = cutover(breqd, server, r, str(tmp_path / "records"), "--freeze")
        summary = final(done, events)
        assert writer.writes > before                 # it wrote during the cutover
        # The write it was waiting on (frozen), or its next one, is refused.
        wait_until(lambda: writer.refused is not None or not writer.is_alive(), timeout=30,
                   what="the writer's first write after the handover")
    finally:
        writer.stop.set()
        writer.join(timeout=60)
    assert writer.error is None, repr(writer.error)
    # Its writes after the handover were refused: the source is read-only now.
    assert writer.refused is not None and writer.refused.errno_name == "EPERM", \
        writer.refused
    assert summary["handed_over"] is True
    assert isinstance(summary["downtime_seconds"], float) and summary["downtime_seconds"] > 0
    generation = summary["generation"]
    assert len(generation) == 16
    steps = [(s["step"], s["name"]) for s in summary["steps"]]
    assert steps[0] == (1, "replicate synchronously") and summary["steps"][0]["protocol"] == "C"
    assert (3, "freeze writes") in steps and steps[-1][0] == 6
    assert [e["seconds"] for e in events if e["event"] == "downtime"] == \
        [summary["downtime_seconds"]]

    assert same_bytes(server.backing, target)
    assert os.path.getsize(target) == size
    mine = source_status(breqd, r)
    assert mine["role"] == "handed-over" and mine["successor"] == generation
    assert mine["target"]["role"] == "primary" and mine["target"]["generation"] == generation
    record = r.record("d1")
    assert record["role"] == "primary" and record["generation"] == generation
    assert record["state"] == "consistent" and record["promoted"]
    theirs = json.loads(bmigrate(breqd, "status", "--receiver-state-dir", r.state_dir,
                                 "--json").stdout)
    assert [(t["export"], t["role"], t["generation"]) for t in theirs] == \
        [("d1", "primary", generation)]
    status = replication_status(breqd, server)
    assert status["read_only"] and not status["replicating"] and not status["frozen"]
    assert server.daemon.stop() == 0


# -- 2. ext4 through nbdfuse + loop, the workload stopped by the pre-handover hook --------

class FileWorkload(threading.Thread):
    """Files of random content written into a mounted file system and fsynced, until
    the flag file ``stop_flag`` appears; then it says so by writing a line into the FIFO
    ``done_fifo`` (which the hook reads). ``fsynced`` maps name -> sha256 of every file
    whose fsync returned."""

    def __init__(self, directory: str, stop_flag: str, done_fifo: str, per_second: int = 60):
        super().__init__(daemon=True)
        self.directory, self.stop_flag, self.done_fifo = directory, stop_flag, done_fifo
        self.per_second = per_second
        self.fsynced: dict[str, str] = {}
        self.error: BaseException | None = None
        self.abort = threading.Event()
        self.rng = random.Random(7)

    def run(self) -> None:
        try:
            started = time.monotonic()
            n = 0
            while not os.path.exists(self.stop_flag) and not self.abort.is_set():
                name = f"file-{n:05d}.bin"
                data = self.rng.randbytes(self.rng.choice([512, 4096, 20000, 65536,
                                                           200000]))
                with open(os.path.join(self.directory, name), "wb") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
                self.fsynced[name] = hashlib.sha256(data).hexdigest()
                n += 1
                ahead = n / self.per_second - (time.monotonic() - started)
                if ahead > 0:                     # pacing the workload, not synchronising
                    self.abort.wait(ahead)
        except BaseException as exc:
            self.error = exc
        finally:
            if os.path.exists(self.stop_flag):     # the hook waits for this line
                with open(self.done_fifo, "w") as fifo:
                    fifo.write("stopped\n")


def tree_digest(root: str) -> dict[str, str]:
    out = {}
    for name in os.listdir(root):
        path = os.path.join(root, name)
        if os.path.isfile(path):
            with open(path, "rb") as f:
                out[name] = hashlib.sha256(f.read()).hexdigest()
    return out


def test_ext4_workload_stopped_by_the_hook_is_whole_on_the_target(breqd, rig, tmp_path):
    require("nbdfuse", "mkfs.ext4", "e2fsck", "losetup", "fusermount3", "mkfifo")
    size = 64 * MiB
    server, r, target = rig(size, fill=False)
    mnt = str(tmp_path / "mnt")
    os.makedirs(mnt)
    files = os.path.join(mnt, "files")
    stop_flag, done_fifo = str(tmp_path / "stop-workload"), str(tmp_path / "workload-done")
    os.mkfifo(done_fifo)
    hook = str(tmp_path / "pre-handover.sh")
    with open(hook, "w") as f:
        f.write("#!/bin/sh\nset -e\n"
                f"touch {stop_flag}\n"
                f"timeout 60 sh -c 'read line < {done_fifo}'\n"   # the workload stopped
                f"umount {mnt}\n"
                f"touch {tmp_path / 'hook-ran'}\n")
    os.chmod(hook, 0o755)
    fuse = workload = None
    mounted = False
    try:
        fuse = NbdFuse(server.socket, str(tmp_path))
        loop = fuse.attach_loop()
        tool("mkfs.ext4", "-q", "-F", loop)
        done = tool("mount", loop, mnt, check=False)
        if done.returncode != 0:
            pytest.skip(f"cannot mount: {done.stderr.strip()}")
        mounted = True
        os.makedirs(files)
        workload = FileWorkload(files, stop_flag, done_fifo)
        workload.start()
        wait_until(lambda: len(workload.fsynced) >= 5 or not workload.is_alive(),
                   timeout=30, what="the workload to fsync its first files")
        first = sync(breqd, "d1", "--source", server.backing, "--to", r.url("d1"),
                     "--secret-file", r.secret_file, "--json", ok=(0, 15))
        assert summary_of(first)["converged"]
        assert workload.is_alive(), workload.error
        done, events = cutover(breqd, server, r, str(tmp_path / "records"),
                               "--pre-handover", hook)
        mounted = os.path.ismount(mnt)
        summary = final(done, events)
        assert os.path.exists(tmp_path / "hook-ran")
        workload.join(timeout=60)
        assert not workload.is_alive() and workload.error is None, workload.error
    finally:
        if workload is not None and workload.is_alive():
            workload.abort.set()
            workload.join(timeout=60)
        if mounted and os.path.ismount(mnt):
            tool("umount", mnt, check=False)
        if fuse is not None:
            fuse.close()
        server.daemon.stop()
    assert [s["name"] for s in summary["steps"]][2] == "pre-handover hook"
    assert "freeze writes" not in [s["name"] for s in summary["steps"]]
    assert summary["handed_over"] and summary["downtime_seconds"] > 0
    written = dict(workload.fsynced)
    assert len(written) >= 5

    check = tool("e2fsck", "-fn", target, check=False)
    assert check.returncode == 0, check.stdout + check.stderr
    assert same_bytes(server.backing, target)
    copy = str(tmp_path / "copy")
    os.makedirs(copy)
    loop = tool("losetup", "--find", "--show", "--read-only", target).stdout.strip()
    try:
        tool("mount", "-o", "ro", loop, copy)
        try:
            found = tree_digest(os.path.join(copy, "files"))
        finally:
            tool("umount", copy)
    finally:
        tool("losetup", "--detach", loop, check=False)
    missing = {n for n in written if n not in found}
    assert not missing, sorted(missing)[:10]
    assert {n: found[n] for n in written} == written


# -- 3. lineage after the cutover: the old source refused, a fail-back accepted -----------

def test_old_source_is_refused_and_a_fail_back_ships_only_what_changed(breqd, rig, tmp_path,
                                                                       receivers):
    size = 8 * MiB
    server, r, target = rig(size)
    records = str(tmp_path / "failback-state")     # breceive "failback" keeps its records here
    done, events = cutover(breqd, server, r, records)
    summary = final(done, events)
    generation = summary["generation"]
    assert same_bytes(server.backing, target)

    # The old source may no longer write to the promoted target.
    refused = sync(breqd, "d1", "--source", server.backing, "--to", r.url("d1"),
                   "--secret-file", r.secret_file, "--threshold", "0", check=False)
    assert refused.returncode == 9, refused.stderr
    lines = error_lines(refused.stderr)
    # It is told the target is the primary and how to fail back, never to discard it.
    assert len(lines) == 1 and "is the primary" in lines[0], refused.stderr
    assert "--adopt" in lines[0] and "fail back" in lines[0]
    assert "discard" not in refused.stderr
    assert "Traceback" not in refused.stderr
    assert r.record("d1")["role"] == "primary"
    assert r.record("d1")["generation"] == generation
    assert same_bytes(server.backing, target)      # and nothing of it was written
    handed = json.loads(open(os.path.join(records, "d1.target")).read())
    assert handed["role"] == "handed-over" and handed["successor"] == generation

    # The target host takes over: its own breqd adopts the promoted lineage...
    assert server.daemon.stop() == 0
    r.daemon.stop()
    new = BreqdInstance(Daemon(breqd_argv(str(tmp_path / "state2"), str(tmp_path / "conf2"),
                                          str(tmp_path / "breqd2.sock")),
                               str(tmp_path / "breqd2.log")),
                        str(tmp_path / "state2"), str(tmp_path / "conf2"),
                        str(tmp_path / "breqd2.sock"))
    new.daemon.start()
    nbd2 = failback = None
    try:
        added = json.loads(bmigrate(new, "track", "add", "d1", "--size-of", target, "--adopt",
                                    os.path.join(r.state_dir, "d1.target"), "--json").stdout)
        assert added["dirty_bytes"] == 0 and added["generation"] == generation, added
        assert added["role"] == "primary"
        # ... and serves it with bmig-nbd; the application writes a few chunks there.
        sock2 = str(tmp_path / "nbd2.sock")
        nbd2 = Daemon(nbd_argv("--device", "d1", "--backing", target, "--unix", sock2,
                               "--control", new.control, "--manage-dir",
                               str(tmp_path / "manage2"), "--log-level", "debug"),
                      str(tmp_path / "nbd2.log")).start()
        changed = {c * CHUNK + 512: os.urandom(CHUNK // 2) for c in (1, 40, 41, 127)}
        write_through(f"nbd+unix:///d1?socket={sock2}", changed)
        wait_until(lambda: settled(new), timeout=30, what="the holds to settle")
        assert stats(new)["dirty_bytes"] == len(changed) * CHUNK
        # Fail-back: the old source, now a receiver, with the record the cutover left.
        failback = start_receiver(tmp_path, {"d1": server.backing}, name="failback")
        receivers.append(failback)
        assert failback.state_dir == records
        back = sync(new, "d1", "--source", target, "--to", failback.url("d1"),
                    "--secret-file", failback.secret_file, "--threshold", "0", "--json")
        result = summary_of(back)
        assert result["relation"] == "descendant", result
        assert result["bytes_committed"] == len(changed) * CHUNK, result
        assert result["converged"] and result["dirty_bytes"] == 0
        assert same_bytes(target, server.backing)
        record = failback.record("d1")
        assert record["role"] == "secondary" and record["generation"] == generation
        assert record["state"] == "consistent"
        assert nbd2.stop() == 0
        nbd2 = None
    finally:
        if nbd2 is not None:
            nbd2.stop()
        new.stop()


# -- 4. verify: a chunk corrupted on the target behind the tool's back --------------------

def test_verify_finds_a_corrupted_chunk_and_repair_fixes_it(breqd, rig, tmp_path):
    size = 8 * MiB
    server, r, target = rig(size)
    args = ["d1", "--source", server.backing, "--to", r.url("d1"), "--secret-file",
            r.secret_file]
    sync(breqd, *args, "--threshold", "0")
    assert same_bytes(server.backing, target)
    clean = json.loads(bmigrate(breqd, "verify", *args, "--json").stdout)
    assert clean["chunks_differing"] == 0 and clean["chunks_compared"] == size // CHUNK

    bad = 77 * CHUNK
    with open(target, "r+b") as f:                    # behind the tool's back
        f.seek(bad + 1000)
        f.write(b"garbage!" * 512)
        f.flush()
        os.fsync(f.fileno())
    assert not same_bytes(server.backing, target)

    found = bmigrate(breqd, "verify", *args, "--json", check=False)
    assert found.returncode == 14, found.stderr
    report = json.loads(found.stdout)
    assert report["chunks_differing"] == 1 and report["differing"] == [[bad, CHUNK]], report
    assert not report["repaired"]
    assert stats(breqd)["dirty_bytes"] == 0           # without --repair nothing is marked

    # A cutover with --verify refuses to hand over to it, and leaves the source primary.
    done, events = cutover(breqd, server, r, str(tmp_path / "records"), "--verify")
    assert done.returncode == 14, done.stderr
    lines = error_lines(done.stderr)
    assert len(lines) == 1 and f"first at byte {bad}" in lines[0], done.stderr
    assert any(e["event"] == "note" and "stays primary and writable" in e["message"]
               for e in events)
    assert_still_primary_and_writable(breqd, server, r)

    repaired = bmigrate(breqd, "verify", *args, "--repair", "--json")
    report = json.loads(repaired.stdout)
    assert report["repaired"] and report["differing"] == [[bad, CHUNK]], report
    assert stats(breqd)["dirty_bytes"] == 2 * CHUNK    # the bad chunk and the test's write
    fixed = summary_of(sync(breqd, *args, "--threshold", "0", "--json"))
    assert fixed["bytes_committed"] == 2 * CHUNK and fixed["dirty_bytes"] == 0, fixed
    assert same_bytes(server.backing, target)
    again = json.loads(bmigrate(breqd, "verify", *args, "--json").stdout)
    assert again["chunks_differing"] == 0


# -- 5. failures before the handover leave the source primary and writable ----------------

def test_a_failing_pre_handover_hook_leaves_the_source_primary(breqd, rig, tmp_path):
    server, r, target = rig(8 * MiB)
    done, events = cutover(breqd, server, r, str(tmp_path / "records"), "--pre-handover",
                           "false", "--freeze")
    assert done.returncode == 12, done.stderr
    lines = error_lines(done.stderr)
    assert len(lines) == 1 and "hook 'false' failed with exit status 1" in lines[0], \
        done.stderr
    assert not any(e["event"] == "cutover" for e in events)
    assert any(e["event"] == "note" and "stays primary and writable" in e["message"]
               for e in events)
    assert not os.path.exists(tmp_path / "records" / "d1.target")
    assert_still_primary_and_writable(breqd, server, r)
    # ... and a later cutover still works.
    summary = final(*cutover(breqd, server, r, str(tmp_path / "records")))
    assert summary["handed_over"]
    assert same_bytes(server.backing, target)


def test_a_drain_not_done_within_the_timeout_leaves_the_source_primary(breqd, rig, tmp_path):
    """No --bwlimit in cutover: a relay paced at 4 MB/s stands for a slow link, so the
    first pass (16 MiB, all dirty) takes about 4 s; a writer keeps rewriting the chunks the
    pass has checked out (the last 4 MiB, shipped last), so it leaves them dirty again."""
    size = 16 * MiB
    server, r, target = rig(size)
    relay = SlowRelay(("127.0.0.1", r.port), rate=4 * MiB).start()
    writer = Writer(server.uri, per_second=200, size=size, low=12 * MiB)
    writer.start()
    try:
        args = ["cutover", "d1", "--source", server.backing,
                "--to", r.url("d1", port=relay.port), "--secret-file", r.secret_file,
                "--manage-dir", server.manage_dir, "--record-dir", str(tmp_path / "records"),
                "--timeout", "1", "--freeze", "--json"]
        started = time.monotonic()
        done = bmigrate(breqd, *args, timeout=CUTOVER_TIMEOUT, check=False)
        took = time.monotonic() - started
        writer.finish()
    finally:
        writer.stop.set()
        writer.join(timeout=60)
        relay.stop()
    assert writer.refused is None, writer.refused        # never frozen, never read-only
    assert done.returncode == 13, done.stderr
    lines = error_lines(done.stderr)
    assert len(lines) == 1 and "not converged within 1 s" in lines[0], done.stderr
    events = json_lines(done.stdout)
    assert not any(e["event"] == "cutover" for e in events)
    assert not any(e["event"] == "step" and e["step"] >= 3 for e in events)
    assert took < 60
    assert_still_primary_and_writable(breqd, server, r)


# -- 6. the downtime report -------------------------------------------------------------

def test_downtime_without_load_is_reported_and_short(breqd, rig, tmp_path):
    server, r, target = rig(8 * MiB)
    sync(breqd, "d1", "--source", server.backing, "--to", r.url("d1"), "--secret-file",
         r.secret_file, "--threshold", "0")
    summary = final(*cutover(breqd, server, r, str(tmp_path / "records")))
    downtime = summary["downtime_seconds"]
    assert isinstance(downtime, float) and 0 < downtime < 10, summary
    steps = {s["step"]: s for s in summary["steps"]}
    assert sorted(steps) == [1, 2, 3, 4, 6]
    assert steps[3]["name"] == "freeze writes"       # the default without a hook
    # Both sides were flushed at the end of the drain, before the freeze: step 4's
    # flush, inside the downtime, has only what came since.
    assert isinstance(steps[2]["flush_seconds"], float) and steps[2]["flush_seconds"] >= 0
    # The downtime is what steps 3 to 6 took, not the drain before them.
    assert downtime >= sum(steps[n]["seconds"] for n in (3, 4, 6)) - 0.01
    assert same_bytes(server.backing, target)


def test_downtime_is_reported_in_text_too_and_verify_runs(breqd, rig, tmp_path):
    server, r, target = rig(4 * MiB)
    done, _ = cutover(breqd, server, r, str(tmp_path / "records"), "--verify",
                      "--verify-sample", "0.5", as_json=False)
    assert done.returncode == 0, done.stderr
    line = done.stdout.strip()
    assert line.startswith(f"d1: handed over to {r.url('d1')} (generation ")
    seconds = float(line.rsplit("downtime ", 1)[1].removesuffix(" s"))
    assert 0 < seconds < 10
    assert "step 6: hand over done" in done.stderr
    verified = [line for line in done.stderr.splitlines() if "step 5: verify done" in line]
    assert len(verified) == 1 and "chunks_compared 32" in verified[0], done.stderr
    assert same_bytes(server.backing, target)


# -- more failures, before and after the handover ------------------------------------------

def test_an_unreachable_target_leaves_the_source_primary(breqd, rig, tmp_path):
    server, r, target = rig(4 * MiB)
    sync(breqd, "d1", "--source", server.backing, "--to", r.url("d1"), "--secret-file",
         r.secret_file, "--threshold", "0")
    r.daemon.stop()
    done, events = cutover(breqd, server, r, str(tmp_path / "records"))
    assert done.returncode == 4, done.stderr
    lines = error_lines(done.stderr)
    assert len(lines) == 1 and "Traceback" not in done.stderr, done.stderr
    assert not any(e["event"] == "cutover" for e in events)
    status = replication_status(breqd, server)
    assert not status["replicating"] and not status["frozen"] and not status["read_only"]
    assert stats(breqd)["role"] == "primary"
    assert r.record("d1")["role"] == "secondary"
    write_through(server.uri, {0: os.urandom(CHUNK)})


def test_a_failing_post_handover_hook_says_the_handover_happened(breqd, rig, tmp_path):
    """Step 7 runs after the handover: its failure (exit 12, like a failed pre-handover
    hook) must not read as "nothing happened"."""
    server, r, target = rig(4 * MiB)
    done, events = cutover(breqd, server, r, str(tmp_path / "records"), "--post-handover",
                           "false")
    assert done.returncode == 12, done.stderr
    # It did hand over: the target is the primary, this source is read-only.
    assert r.record("d1")["role"] == "primary"
    assert stats(breqd)["role"] == "handed-over"
    assert replication_status(breqd, server)["read_only"]
    assert same_bytes(server.backing, target)
    assert any(e["event"] == "downtime" for e in events)
    lines = error_lines(done.stderr)
    assert len(lines) == 1 and "handed over" in lines[0], done.stderr
    # The result, then the error: both on stdout, as JSON.
    assert events[-2]["event"] == "cutover" and events[-2]["handed_over"] is True, events[-2]
    assert events[-1]["event"] == "error" and events[-1]["exit_code"] == 12, events[-1]
    assert "handed over" in events[-1]["message"]


def test_a_restarted_bmig_nbd_keeps_the_handed_over_source_read_only(breqd, rig, tmp_path):
    """After the handover the old source must not take writes again: a write there would
    be missing from the new primary, and a fail-back (a "descendant", which ships only
    what changed on the new primary) would leave it in place: the copies would differ."""
    server, r, target = rig(4 * MiB)
    summary = final(*cutover(breqd, server, r, str(tmp_path / "records")))
    assert summary["handed_over"]
    before = digest(server.backing)
    assert server.daemon.stop() == 0
    again = Daemon(server.daemon.argv, server.daemon.log_path)
    try:
        try:
            again.start()
        except AssertionError:
            return                                   # refusing to serve it is fine too
        with pytest.raises(NbdError) as refused:
            write_through(server.uri, {0: os.urandom(4096)})
        assert refused.value.errno_name == "EPERM"
    finally:
        again.stop()
    assert digest(server.backing) == before


# -- reports and bounds ----------------------------------------------------------------------

def test_not_converging_reports_a_write_rate_above_the_shipping_rate(breqd, rig):
    import re

    size = 1 * MiB
    server, r, target = rig(size, "--hold-chunks", "4")
    writer = Writer(server.uri, per_second=1500, size=size)   # ~6 MB/s of 4 KiB writes
    writer.start()
    try:
        done = sync(breqd, "d1", "--source", server.backing, "--to", r.url("d1"),
                    "--secret-file", r.secret_file, "--bwlimit", "1M", "--threshold", "0",
                    "--window", "4M", "--manage-dir", server.manage_dir, check=False)
        writer.finish()
    finally:
        writer.stop.set()
        writer.join(timeout=60)
    assert done.returncode == 10, done.stderr
    message = error_lines(done.stderr)[0]
    rates = re.search(r"writes at ([\d.]+) MiB/s, shipping at ([\d.]+) MiB/s", message)
    assert rates, message
    writes, shipping = float(rates.group(1)), float(rates.group(2))
    assert shipping <= 1.5                       # --bwlimit 1M
    assert writes >= 2 * shipping, message


def test_cutover_gives_up_soon_after_its_timeout(breqd, rig, tmp_path):
    size = 32 * MiB
    server, r, target = rig(size)
    relay = SlowRelay(("127.0.0.1", r.port), rate=4 * MiB).start()
    writer = Writer(server.uri, per_second=200, size=size, low=28 * MiB)
    writer.start()
    try:
        started = time.monotonic()
        done = bmigrate(breqd, "cutover", "d1", "--source", server.backing,
                        "--to", r.url("d1", port=relay.port), "--secret-file", r.secret_file,
                        "--manage-dir", server.manage_dir,
                        "--record-dir", str(tmp_path / "records"), "--timeout", "1",
                        "--json", timeout=CUTOVER_TIMEOUT, check=False)
        took = time.monotonic() - started
        writer.finish()
    finally:
        writer.stop.set()
        writer.join(timeout=60)
        relay.stop()
    assert done.returncode == 13, done.stderr
    # 1 s of drain, then what was sent gets its acknowledgement: a few seconds, not the
    # whole pass.
    assert took < 5, f"cutover --timeout 1 took {took:.1f} s"


# -- a freeze is a lease: it ends with the client that took it, or when its time is up ------

FREEZER = """
import json, sys
from bmig.nbd.manage_client import ManageClient
client = ManageClient(sys.argv[1], "d1")
fields = {"lease": float(sys.argv[2])} if len(sys.argv) > 2 else {}
print(json.dumps(client.call("freeze", **fields)), flush=True)
sys.stdin.readline()              # hold the freeze until told (or killed)
try:
    client.call("read-only", value=True)
    print("read-only", flush=True)
except Exception as exc:
    print(type(exc).__name__, exc, flush=True)
sys.stdin.readline()              # hold on (to the freeze and read-only) until killed
"""


class Freezer:
    """A client of bmig-nbd's control socket that freezes d1's writes and holds on."""

    def __init__(self, server, *lease: str):
        import subprocess
        import sys
        self.proc = subprocess.Popen([sys.executable, "-c", FREEZER, server.manage_dir,
                                      *lease], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None
        status = json.loads(self.proc.stdout.readline())
        assert status["frozen"], status

    def go_on(self) -> str:
        """Let it make its next request (read-only); what it says of the answer."""
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write("\n")
        self.proc.stdin.flush()
        return self.proc.stdout.readline().strip()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=30)
        for pipe in (self.proc.stdin, self.proc.stdout):
            if pipe is not None:
                pipe.close()


class PendingWrite(threading.Thread):
    """A write through the export that the freeze holds back; ``done`` once answered."""

    def __init__(self, server, offset: int):
        super().__init__(daemon=True)
        self.server, self.offset = server, offset
        self.data = os.urandom(4096)
        self.done = threading.Event()
        self.error: BaseException | None = None
        self.start()

    def run(self) -> None:
        try:
            with NbdClient.connect(self.server.uri, timeout=120) as client:
                client.pwrite(self.data, self.offset)
        except BaseException as exc:      # reported by the test
            self.error = exc
        self.done.set()

    def wait_accepted(self) -> None:
        """bmig-nbd has read the request (its debug log shows it) and holds it."""
        from tests.integration.nbd_helpers import logged_requests
        wait_until(lambda: ("NBD_CMD_WRITE", self.offset, 4096)
                   in logged_requests(self.server.daemon.log()),
                   timeout=30, what="bmig-nbd to receive the write")
        assert not self.done.is_set(), "a write went through a freeze"


def test_a_freeze_ends_when_the_client_that_took_it_dies(breqd, rig):
    """bmigrate cutover --freeze killed: the application's writes must not hang."""
    server, _, _ = rig(4 * MiB, fill=False)
    freezer = Freezer(server)
    try:
        write = PendingWrite(server, 5 * CHUNK)
        write.wait_accepted()
        freezer.proc.kill()                                 # kill -9 of the client
        assert write.done.wait(30), "the write still hangs after its freezer died"
        assert write.error is None, write.error
    finally:
        freezer.close()
    assert not replication_status(breqd, server)["frozen"]
    with open(server.backing, "rb") as f:
        f.seek(5 * CHUNK)
        assert f.read(4096) == write.data
    assert "the client that froze its writes is gone" in server.daemon.log()


def test_a_freeze_ends_when_its_lease_runs_out_and_its_client_can_do_no_more(breqd, rig):
    """A client that hangs while holding a freeze: after its lease the writes go on, and
    its next request is refused rather than done as if the writes were still held."""
    server, _, _ = rig(4 * MiB, fill=False)
    freezer = Freezer(server, "1.5")
    try:
        write = PendingWrite(server, 6 * CHUNK)
        write.wait_accepted()
        assert write.done.wait(30), "the write still hangs after the lease ran out"
        assert write.error is None, write.error
        answer = freezer.go_on()
    finally:
        freezer.close()
    assert "lease of 1.5 s ran out" in answer, answer
    status = replication_status(breqd, server)
    assert not status["frozen"] and not status["read_only"], status


def test_read_only_ends_with_its_client_unless_breqd_records_a_handover(breqd, rig):
    """A cutover killed after it made the source read-only but before breqd recorded the
    handover: the application's writes must go on, not fail for ever (the target was
    never asked to take over). bmig-nbd asks breqd before the freeze ends."""
    server, _, _ = rig(4 * MiB, fill=False)
    freezer = Freezer(server)
    try:
        assert freezer.go_on() == "read-only"
        write = PendingWrite(server, 8 * CHUNK)
        write.wait_accepted()
        freezer.proc.kill()
        assert write.done.wait(30), "the write still hangs after its freezer died"
        assert write.error is None, f"a write refused after a cutover that never handed " \
                                    f"over: {write.error}"
    finally:
        freezer.close()
    status = replication_status(breqd, server)
    assert not status["frozen"] and not status["read_only"], status
    assert "gone before breqd recorded a handover" in server.daemon.log()


def test_read_only_outlives_its_client_when_breqd_records_the_handover(breqd, rig):
    server, _, _ = rig(4 * MiB, fill=False)
    freezer = Freezer(server)
    try:
        assert freezer.go_on() == "read-only"
        write = PendingWrite(server, 9 * CHUNK)
        write.wait_accepted()
        assert bmigrate(breqd, "track", "set-role", "d1", "handed-over").returncode == 0
        freezer.proc.kill()
        assert write.done.wait(30), "the write still hangs after its freezer died"
        assert write.error is not None, "a handed-over source took a write"
    finally:
        freezer.close()
    status = replication_status(breqd, server)
    assert not status["frozen"] and status["read_only"], status
    with open(server.backing, "rb") as f:
        f.seek(9 * CHUNK)
        assert f.read(4096) == bytes(4096)


def test_a_freeze_held_by_two_clients_lasts_until_both_are_gone(breqd, rig):
    server, _, _ = rig(4 * MiB, fill=False)
    first, second = Freezer(server), Freezer(server)
    try:
        write = PendingWrite(server, 7 * CHUNK)
        write.wait_accepted()
        first.proc.kill()
        first.proc.wait(timeout=30)
        wait_until(lambda: "other client(s) still hold the freeze" in server.daemon.log(),
                   timeout=30, what="bmig-nbd to see the first client go")
        assert replication_status(breqd, server)["frozen"]
        assert not write.done.is_set()
        second.proc.kill()
        assert write.done.wait(30) and write.error is None, write.error
    finally:
        first.close()
        second.close()
