"""bmigrate run, the catch-up service, as a real background process.

It catches up the initial copy, then ships what an application writes through bmig-nbd
while it keeps running, and reports its lag; SIGTERM stops it cleanly (exit 0, a summary
line, nothing left in flight in breqd); a connection reset and a receiver that goes away
for a while are retried with backoff, without a restart; SIGHUP rereads the migration
file (the bandwidth limit); errors that do not mend themselves end it with their status.

Everything is waited for through the JSON event lines, breqd's counters and the files
themselves: no sleeps.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess

import pytest

from bmig.nbdclient import NbdClient
from tests.daemon import wait_until
from tests.integration.nbd_helpers import start_nbd
from tests.integration.sync_helpers import (CHUNK, SYNC_TIMEOUT, MiB,  # noqa: F401
                                            bmigrate_argv, make_image, migrations,
                                            receivers, same_bytes, start_background,
                                            start_receiver, summary_of, sync, track,
                                            write_secret)
from tests.relay import Relay

INTERVAL = "0.2"


def run_args(name: str, source: str, url: str, secret: str, *extra: str) -> list[str]:
    return [name, "--source", source, "--to", url, "--secret-file", secret, "--json",
            "--interval", INTERVAL, *extra]


def identical(source: str, target: str):
    return lambda: os.path.exists(target) and same_bytes(source, target)


def stopped_cleanly(m, breqd, device: str) -> dict:
    """SIGTERM: exit status 0, the summary as the last line, nothing in flight."""
    assert m.stop() == 0, m.stderr
    assert m.events and m.events[-1]["event"] == "summary", m.events[-3:]
    assert not m.errors(), m.stderr
    assert breqd.client().stats(device)["inflight_bytes"] == 0
    return m.events[-1]


def test_run_catches_up_then_ships_live_writes(breqd, tmp_path, receivers, migrations):
    size = 16 * MiB
    server = start_nbd(breqd, tmp_path, size)
    try:
        with open(server.backing, "r+b") as f:          # data from before the service
            f.write(random.Random(1).randbytes(6 * MiB))
        target = str(tmp_path / "tgt.img")
        r = start_receiver(tmp_path, {"d1": target})
        receivers.append(r)
        m = start_background(migrations, breqd, "run",
                             *run_args("d1", server.backing, r.url("d1"), r.secret_file))
        m.wait_event(lambda e: e["event"] == "pass" and e["passes"] == 1, timeout=30,
                     what="the initial copy")
        wait_until(identical(server.backing, target), timeout=30, what="the initial copy")
        assert m.of("note") and "holds no copy" in m.of("note")[0]["message"]
        passes_before = len(m.of("pass"))

        # A burst of writes through the export, then silence: run ships them (once
        # bmig-nbd lets go of its holds, about a second after the last write).
        rng = random.Random(2)
        with NbdClient.connect(server.uri, timeout=30) as client:
            for _ in range(200):
                offset = rng.randrange(size // 4096) * 4096
                client.pwrite(rng.randbytes(4096), offset)
            client.pwrite(b"\xab" * (3 * CHUNK + 5), size - 3 * CHUNK - 5)   # the tail
            client.flush()
        wait_until(identical(server.backing, target), timeout=30,
                   what="the writes to arrive at the target")
        wait_until(lambda: breqd.client().stats("d1")["dirty_bytes"] == 0, timeout=30,
                   what="breqd to be clean")
        assert m.proc.poll() is None                   # still running: a service
        assert len(m.of("pass")) > passes_before
        lags = m.wait_event(lambda e: e["event"] == "lag", timeout=10, what="a lag event")
        assert isinstance(lags["dirty_bytes"], int)
        assert lags["lag_seconds"] is None or lags["lag_seconds"] >= 0
        m.wait_event(lambda e: e["event"] == "lag" and e["dirty_bytes"] == 0
                     and e["time"] > m.of("pass")[-1]["time"], timeout=10,
                     what="a lag event saying it is up to date")
        summary = stopped_cleanly(m, breqd, "d1")
        assert summary["relation"] == "new" and summary["passes"] == len(m.of("pass"))
        assert summary["dirty_bytes"] == 0
        assert r.record("d1")["state"] == "consistent"
    finally:
        stopped = server.daemon.stop()
    assert stopped == 0                                # flushed, and nothing more comes
    assert same_bytes(server.backing, target)


def stopped_mid_pass(breqd, tmp_path, receivers, migrations):
    """run of a 32 MiB device, SIGTERM in its first pass; (receiver, source, target,
    summary, breqd's stats after)."""
    size = 32 * MiB
    source = make_image(str(tmp_path / "src.img"), size, "random")
    track(breqd, "d", source)
    target = str(tmp_path / "tgt.img")
    r = start_receiver(tmp_path, {"d": target})
    receivers.append(r)
    m = start_background(migrations, breqd, "run",
                         *run_args("d", source, r.url("d"), r.secret_file, "--level", "0",
                                   "--bwlimit", "8M", "--window", "8M"))
    m.wait_event(lambda e: e["event"] == "progress" and e["bytes_done"] >= 4 * MiB,
                 timeout=30, what="the first pass to be under way")
    summary = stopped_cleanly(m, breqd, "d")
    stats = breqd.client().stats("d")
    assert 0 < stats["dirty_bytes"] < size                  # stopped mid-way; kept its work
    return r, source, target, summary, stats


def test_sigterm_in_a_pass_stops_cleanly(breqd, tmp_path, receivers, migrations):
    r, source, target, summary, stats = stopped_mid_pass(breqd, tmp_path, receivers,
                                                         migrations)
    assert summary["bytes_committed"] == 32 * MiB - stats["dirty_bytes"]
    assert summary["converged"] is False and summary["passes"] == 1
    # What was committed is on the target: a sync with --threshold 0 finishes the copy.
    last = summary_of(sync(breqd, "d", "--source", source, "--to", r.url("d"),
                           "--secret-file", r.secret_file, "--threshold", "0", "--json"))
    assert last["relation"] == "same" and last["bytes_committed"] == stats["dirty_bytes"]
    assert same_bytes(source, target)


def test_the_summary_of_run_says_what_is_left_dirty(breqd, tmp_path, receivers,
                                                    migrations):
    r, source, target, summary, stats = stopped_mid_pass(breqd, tmp_path, receivers,
                                                         migrations)
    assert summary["dirty_bytes"] == stats["dirty_bytes"], summary


def test_a_pass_stopped_by_sigterm_leaves_the_target_inconsistent(breqd, tmp_path,
                                                                  receivers, migrations):
    r, source, target, summary, stats = stopped_mid_pass(breqd, tmp_path, receivers,
                                                         migrations)
    record = r.record("d")
    assert record["state"] == "inconsistent", record


def test_run_rides_out_a_reset_and_a_receiver_restart(breqd, tmp_path, receivers,
                                                      migrations):
    size = 32 * MiB
    source = make_image(str(tmp_path / "src.img"), size, "random")
    track(breqd, "d", source)
    target = str(tmp_path / "tgt.img")
    r = start_receiver(tmp_path, {"d": target})
    receivers.append(r)
    relay = Relay(("127.0.0.1", r.port)).start()
    try:
        m = start_background(migrations, breqd, "run",
                             *run_args("d", source, r.url("d", port=relay.port),
                                       r.secret_file, "--level", "0", "--bwlimit", "16M",
                                       "--window", "8M"))
        # 1. The connection is reset while data flows.
        wait_until(lambda: relay.bytes_upstream >= 8 * MiB, timeout=30,
                   what="data to flow through the relay")
        relay.reset_now()
        note = m.wait_event(lambda e: e["event"] == "note" and "retry_in" in e, timeout=30,
                            what="a note that it will try again")
        assert note["retry_in"] == 1 and note["error"] == "unreachable"
        wait_until(identical(source, target), timeout=30, what="the copy to catch up")
        wait_until(lambda: breqd.client().stats("d")["dirty_bytes"] == 0, timeout=30,
                   what="breqd to be clean")
        assert m.proc.poll() is None and relay.connections >= 2
        assert len(m.of("pass-start")) >= 2

        # 2. The receiver goes away; changes made meanwhile wait for it. The relay drops
        # its side of the connection too, as a router or a proxy whose peer is gone
        # does (see test_run_notices_a_receiver_gone_behind_a_proxy for the other case).
        assert r.daemon.stop() == 0
        relay.reset_now()
        retries_before = len([e for e in m.of("note") if "retry_in" in e])
        client = breqd.client()
        with open(source, "r+b") as f:
            for chunk in (1, 77, 300, size // CHUNK - 1):
                client.mark("d", [(chunk * CHUNK, 100)])
                f.seek(chunk * CHUNK)
                f.write(b"written while the receiver was away")
        m.wait_event(lambda e: e["event"] == "note" and "retry_in" in e
                     and len([n for n in m.of("note") if "retry_in" in n]) > retries_before,
                     timeout=30, what="a failed attempt while the receiver is away")
        assert not same_bytes(source, target)
        assert m.proc.poll() is None
        again = start_receiver(tmp_path, {"d": target})    # same state directory, new port
        receivers.append(again)
        relay.upstream = ("127.0.0.1", again.port)
        wait_until(identical(source, target), timeout=30,
                   what="the changes to arrive after the receiver is back")
        wait_until(lambda: client.stats("d")["dirty_bytes"] == 0, timeout=30,
                   what="breqd to be clean")
        summary = stopped_cleanly(m, breqd, "d")
        assert summary["relation"] == "same"           # the last connection's relation
        assert again.record("d")["state"] == "consistent"
    finally:
        relay.stop()


def test_run_notices_a_receiver_gone_behind_a_proxy(breqd, tmp_path, receivers,
                                                    migrations):
    source = make_image(str(tmp_path / "src.img"), 4 * MiB, "random")
    track(breqd, "d", source)
    r = start_receiver(tmp_path, {"d": str(tmp_path / "tgt.img")})
    receivers.append(r)
    relay = Relay(("127.0.0.1", r.port)).start()
    try:
        m = start_background(migrations, breqd, "run",
                             *run_args("d", source, r.url("d", port=relay.port),
                                       r.secret_file))
        m.wait_event(lambda e: e["event"] == "pass", timeout=30, what="the initial copy")
        assert r.daemon.stop() == 0          # the relay passes the close on, then keeps
        client = breqd.client()              # the sender's side open (a half-open link)
        client.mark("d", [(0, 100)])
        m.wait_event(lambda e: e["event"] == "note" and "retry_in" in e, timeout=10,
                     what="run to notice that the receiver is gone")
    finally:
        relay.stop()


def write_migration_file(path: str, **values) -> str:
    lines = []
    for key, value in values.items():
        rendered = f'"{value}"' if isinstance(value, str) else str(value).lower() \
            if isinstance(value, bool) else str(value)
        lines.append(f"{key} = {rendered}")
    tmp = path + ".new"
    with open(tmp, "w") as f:
        f.write("\n".join(lines) + "\n")
    os.replace(tmp, path)
    return path


def test_sighup_reloads_the_bandwidth_limit(breqd, tmp_path, receivers, migrations):
    size, limit = 48 * MiB, 4 * MiB
    source = make_image(str(tmp_path / "src.img"), size, "random")
    track(breqd, "d", source)
    target = str(tmp_path / "tgt.img")
    r = start_receiver(tmp_path, {"d": target})
    receivers.append(r)
    settings = dict(name="d", source=source, to=r.url("d"), secret_file=r.secret_file,
                    level=0, interval=0.2, window="8M")
    config = write_migration_file(str(tmp_path / "d.toml"), **settings, bwlimit="4M")
    m = start_background(migrations, breqd, "run", "--config", config, "--json")
    start = m.wait_event(lambda e: e["event"] == "pass-start", timeout=30,
                         what="the first pass")
    # Slow: two seconds into the pass, at most what the limit allows (plus its burst).
    slow = m.wait_event(lambda e: e["event"] == "progress" and e["time"] >= start["time"] + 2,
                        timeout=30, what="progress two seconds into the pass")
    elapsed = slow["time"] - start["time"]
    assert slow["bytes_sent"] <= limit * elapsed + 2 * limit, (slow, elapsed)
    assert slow["bytes_sent"] < size // 2
    assert not m.of("pass")

    write_migration_file(config, **settings, bwlimit="0")
    m.signal(signal.SIGHUP)
    reloaded = m.wait_event(lambda e: e["event"] == "note" and "reloaded" in e["message"],
                            timeout=10, what="the reload note")
    assert "bwlimit none" in reloaded["message"]
    done = m.wait_event(lambda e: e["event"] == "pass", timeout=30, what="the pass to end")
    left = size - slow["bytes_sent"]
    # What was left (over half the device) went in far less than the limit would allow.
    assert done["time"] - reloaded["time"] < 0.5 * left / limit, (done, reloaded)
    wait_until(identical(source, target), timeout=30, what="the copy")
    stopped_cleanly(m, breqd, "d")


def test_a_bwlimit_below_the_frame_size_is_honoured(breqd, tmp_path, receivers):
    size = 3 * MiB
    source = make_image(str(tmp_path / "src.img"), size, "random")
    track(breqd, "d", source)
    r = start_receiver(tmp_path, {"d": str(tmp_path / "tgt.img")})
    receivers.append(r)
    summary = summary_of(sync(breqd, "d", "--source", source, "--to", r.url("d"),
                              "--secret-file", r.secret_file, "--level", "0",
                              "--bwlimit", "1M", "--json"))
    assert summary["bytes_sent"] == size
    assert summary["seconds"] >= 1.5, summary        # 3 MiB at 1 MiB/s: about 2 s or more


def test_a_wrong_secret_ends_run(breqd, tmp_path, receivers, migrations):
    source = make_image(str(tmp_path / "src.img"), MiB, "random")
    track(breqd, "d", source)
    r = start_receiver(tmp_path, {"d": str(tmp_path / "tgt.img")})
    receivers.append(r)
    wrong = write_secret(str(tmp_path / "wrong-secret"), "not the receiver's secret at all")
    m = start_background(migrations, breqd, "run",
                         *run_args("d", source, r.url("d"), wrong))
    assert m.wait(timeout=30) == 8, m.stderr
    errors = m.errors()
    assert len(errors) == 1 and "secret does not match" in errors[0], m.stderr
    assert not [e for e in m.events if "retry_in" in e]
    assert not os.path.exists(os.path.join(r.state_dir, "d.target"))
    stats = breqd.client().stats("d")
    assert stats["dirty_bytes"] == MiB and stats["inflight_bytes"] == 0


def test_another_lineage_on_the_target_ends_run(breqd, tmp_path, receivers, migrations):
    first = make_image(str(tmp_path / "a.img"), MiB, "random", seed=1)
    second = make_image(str(tmp_path / "b.img"), MiB, "random", seed=2)
    track(breqd, "a", first)
    track(breqd, "b", second)
    target = str(tmp_path / "tgt.img")
    r = start_receiver(tmp_path, {"t": target})
    receivers.append(r)
    sync(breqd, "a", "--source", first, "--to", r.url("t"), "--secret-file", r.secret_file)
    m = start_background(migrations, breqd, "run",
                         *run_args("b", second, r.url("t"), r.secret_file))
    assert m.wait(timeout=30) == 9, m.stderr
    assert len(m.errors()) == 1 and "--discard-target-data t" in m.errors()[0]
    assert not [e for e in m.events if "retry_in" in e]
    assert same_bytes(first, target)                     # untouched
    assert r.record("t")["source_device_id"] == breqd.client().stats("a")["device_id"]


def test_an_unknown_setting_in_the_migration_file_ends_run(breqd, tmp_path, migrations):
    source = make_image(str(tmp_path / "src.img"), MiB, "random")
    track(breqd, "d", source)
    config = write_migration_file(str(tmp_path / "d.toml"), name="d", source=source,
                                  to="tcp://127.0.0.1:1/d", bandwidth="10M")
    m = start_background(migrations, breqd, "run", "--config", config, "--json")
    assert m.wait(timeout=30) == 3, m.stderr
    assert len(m.errors()) == 1 and "unknown setting(s): bandwidth" in m.errors()[0]


def test_the_migration_file_names_the_breqd_socket(breqd, tmp_path, receivers):
    """control = in --config is breqd's socket when neither --control nor BMIG_CONTROL
    says otherwise (a flag's default must not win over the file)."""
    source = make_image(str(tmp_path / "src.img"), 4 * MiB, "random")
    track(breqd, "d", source)
    target = str(tmp_path / "tgt.img")
    r = start_receiver(tmp_path, {"d": target})
    receivers.append(r)
    config = write_migration_file(str(tmp_path / "d.toml"), name="d", source=source,
                                  to=r.url("d"), secret_file=r.secret_file,
                                  control=breqd.control, threshold=0)
    env = {k: v for k, v in os.environ.items() if k != "BMIG_CONTROL"}
    done = subprocess.run(bmigrate_argv("sync", "--config", config, "--json"), env=env,
                          capture_output=True, text=True, timeout=SYNC_TIMEOUT,
                          stdin=subprocess.DEVNULL)
    assert done.returncode == 0, done.stderr
    assert summary_of(done)["converged"] and same_bytes(source, target)


def test_a_refused_reload_is_a_json_event_and_the_run_goes_on(breqd, tmp_path, receivers,
                                                              migrations):
    source = make_image(str(tmp_path / "src.img"), 2 * MiB, "random")
    track(breqd, "d", source)
    target = str(tmp_path / "tgt.img")
    r = start_receiver(tmp_path, {"d": target})
    receivers.append(r)
    settings = dict(name="d", source=source, to=r.url("d"), secret_file=r.secret_file,
                    interval=0.2)
    config = write_migration_file(str(tmp_path / "d.toml"), **settings, bwlimit="20M")
    m = start_background(migrations, breqd, "run", "--config", config, "--json")
    wait_until(identical(source, target), timeout=30, what="the copy")
    write_migration_file(config, **settings, bwlimit="1.5M", level=99)
    m.signal(signal.SIGHUP)
    refused = m.wait_event(lambda e: e["event"] == "note" and e.get("reload_refused"),
                           timeout=10, what="the refused reload's event")
    assert "level" in refused["reload_refused"] and refused["error"] == "config", refused
    assert any("reload refused" in line for line in m.stderr_lines), m.stderr
    write_migration_file(config, **settings, bwlimit="1.5M")
    m.signal(signal.SIGHUP)
    reloaded = m.wait_event(lambda e: e["event"] == "note" and "reloaded" in e["message"],
                            timeout=10, what="the reload note")
    assert "bwlimit 1.5 MiB/s" in reloaded["message"], reloaded     # the flag's units
    assert m.stop() == 0, m.stderr
    summary = m.events[-1]
    assert summary["event"] == "summary" and summary["dirty_bytes"] == 0, summary
    # Stopped with nothing dirty, in flight or held: converged and identical.
    assert summary["converged"] is True and summary["identical"] is True, summary


def test_run_refuses_a_threshold(breqd, tmp_path):
    done = subprocess.run(bmigrate_argv("run", "d", "--source", "/dev/null", "--to",
                                        "tcp://127.0.0.1:1/d", "--threshold", "1s"),
                          capture_output=True, text=True, timeout=60,
                          env=dict(os.environ, BMIG_CONTROL=breqd.control))
    assert done.returncode == 2, done
    line, = done.stderr.splitlines()
    assert line.startswith("bmigrate: no such option '--threshold'"), line
    assert line.endswith("(see bmigrate run --help)"), line


def run_on_an_image(breqd, tmp_path, receivers, migrations, hot_refresh: str):
    """A 16-chunk random image tracked as d1 and `bmigrate run` of it to a breceive,
    past its initial copy: (source, target, run)."""
    source = make_image(str(tmp_path / "src.img"), 16 * CHUNK, "random")
    track(breqd, "d1", source)
    target = str(tmp_path / "tgt.img")
    r = start_receiver(tmp_path, {"d1": target})
    receivers.append(r)
    m = start_background(migrations, breqd, "run",
                         *run_args("d1", source, r.url("d1"), r.secret_file,
                                   "--hot-refresh", hot_refresh))
    m.wait_event(lambda e: e["event"] == "pass" and e["passes"] == 1, timeout=30,
                 what="the initial copy")
    return source, target, m


def test_run_ships_a_held_chunk_once_its_writer_lets_go(breqd, tmp_path, receivers,
                                                        migrations):
    """A chunk a writer still holds is left for later (it would only be dirty again):
    the pass that ships a chunk marked after it leaves it alone; the release brings it."""
    source, target, m = run_on_an_image(breqd, tmp_path, receivers, migrations, "86400")
    wait_until(identical(source, target), timeout=30, what="the initial copy")
    writer, plain = breqd.client(), breqd.client()
    # As bmig-nbd writes: the mark (with a hold) first, then the write.
    writer.mark("d1", [(CHUNK, 4096)], hold=True)
    with open(source, "r+b") as f:
        f.seek(CHUNK)
        f.write(b"\x11" * 4096)
        f.flush()
        os.fsync(f.fileno())
        plain.mark("d1", [(5 * CHUNK, 4096)])                      # no hold
        f.seek(5 * CHUNK)
        f.write(b"\x55" * 4096)
    passes = len(m.of("pass"))
    # The pass that ships chunk 5 (marked after chunk 1 was written) leaves chunk 1.
    m.wait_event(lambda e: e["event"] == "pass" and e["passes"] > passes
                 and breqd.client().stats("d1")["dirty_bytes"] == CHUNK, timeout=30,
                 what="a pass that ships the chunk nobody holds")
    with open(target, "rb") as t:
        t.seek(5 * CHUNK)
        assert t.read(4096) == b"\x55" * 4096
        t.seek(CHUNK)
        assert t.read(4096) != b"\x11" * 4096                      # still held: not shipped
    assert breqd.client().stats("d1")["held_bytes"] == CHUNK
    writer.mark_completed("d1", [(CHUNK, 4096)])
    wait_until(identical(source, target), timeout=30, what="the released chunk to ship")
    summary = stopped_cleanly(m, breqd, "d1")
    assert summary["dirty_bytes"] == 0


def test_run_ships_a_chunk_written_without_pause_every_hot_refresh(breqd, tmp_path,
                                                                   receivers, migrations):
    """A chunk its writer never lets go still reaches the target, at most --hot-refresh
    seconds late: the copy of a hot chunk has a bounded age."""
    source, target, m = run_on_an_image(breqd, tmp_path, receivers, migrations, "1")
    writer = breqd.client()
    writer.mark("d1", [(2 * CHUNK, 4096)], hold=True)
    with open(source, "r+b") as f:
        f.seek(2 * CHUNK)
        f.write(b"\x22" * 4096)
    wait_until(identical(source, target), timeout=30, what="the held chunk to ship")
    assert breqd.client().stats("d1")["held_bytes"] == CHUNK      # still held
    writer.mark_completed("d1", [(2 * CHUNK, 4096)])
    stopped_cleanly(m, breqd, "d1")
