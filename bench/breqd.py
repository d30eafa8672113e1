#!/usr/bin/env python3
"""Benchmark breqd, the dirty-bitmap daemon, as a real subprocess over its control socket.

    .venv/bin/python bench/breqd.py                 # everything (about 2-3 minutes)
    .venv/bin/python bench/breqd.py --quick         # shorter cases (under a minute)
    .venv/bin/python bench/breqd.py --only a,c --json out.json

Sections (see bench/README.md for what each one means and the figures measured):

  a  marks/s for 4 KiB random marks on chunks that are already durable (a new device is
     all dirty), 32 client processes, 1/16/256 ranges per MARK, several MARKs in flight
     per client (TrackerClient.send/receive).
  b  first-time marks on a cleared 1 TiB device: marks/s, fdatasync calls/s, marks per
     flush (group commit). The state directory must be on a real disk, not tmpfs.
  c  checkout of every dirty run of a 1 TiB device (64 KiB chunks, 10 % of the chunks
     dirty at random): time, runs, breqd's RSS; then the same with a commit after each
     checkout, as a sender does.
  d  breqd's RSS with 10 devices of 1 TiB (64 KiB chunks), and with 1 TiB at 4 KiB.

Every breqd runs in its own session (Ctrl-C reaches only this script), in a temporary
directory that is removed at the end, also on Ctrl-C, SIGTERM, SIGHUP or an error; the
script touches nothing outside those directories.

One file over 500 lines on purpose: a benchmark is a script, read top to bottom
beside its figures in bench/README.md; what the scripts share is in benchlib.py.
"""

from __future__ import annotations

import argparse
import functools
import multiprocessing as mp
import os
import random
import shutil
import signal
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

import benchlib  # noqa: E402
from benchlib import (Proc, child_env, fs_type, install_signal_handlers,  # noqa: E402
                      provenance, provenance_end, provenance_line, save_json,
                      start_notified)
from bmig.constants import KiB, MiB, TiB  # noqa: E402
from bmig.limits import MAX_RANGES_PER_FRAME  # noqa: E402
from bmig.processes import CHILDREN, Stopped  # noqa: E402
from bmig.tracker.blocking_client import TrackerClient  # noqa: E402
from bmig.tracker.protocol import Op  # noqa: E402

BLOCK = 4 * KiB
CHUNK = 64 * KiB
STOP_TIMEOUT = 60.0          # breqd flushes its bitmaps on SIGTERM: 1 TiB at 4 KiB takes a while


# -- process bookkeeping ---------------------------------------------------------------

_daemons: list["Breqd"] = []
_workers: list[mp.Process] = []


def cleanup() -> None:
    CHILDREN.ignore_signals()               # a second Ctrl-C must not leave things behind
    for proc in _workers:
        if proc.is_alive():
            proc.kill()
        proc.join(5)
    _workers.clear()
    for daemon in list(_daemons):
        daemon.stop()


# -- breqd as a subprocess ---------------------------------------------------------------

@dataclass
class Breqd:
    root: str
    label: str
    profile_dir: str | None = None
    log_level: str = "info"
    dir: str = ""
    child: Proc | None = None
    starts: int = 0

    def __post_init__(self) -> None:
        self.dir = tempfile.mkdtemp(prefix=f"bmig-bench-{self.label}-", dir=self.root)
        self.state = os.path.join(self.dir, "state")
        self.config = os.path.join(self.dir, "devices.d")
        self.control = os.path.join(self.dir, "breqd.sock")
        self.log_path = os.path.join(self.dir, "breqd.log")
        _daemons.append(self)

    def argv(self) -> list[str]:
        args = ["--state-dir", self.state, "--config-dir", self.config,
                "--control", self.control, "--log-level", self.log_level]
        if self.profile_dir:
            os.makedirs(self.profile_dir, exist_ok=True)
            out = os.path.join(self.profile_dir, f"breqd-{self.label}-{self.starts}.prof")
            code = ("import cProfile, sys\n"
                    "from bmig.cli.breqd import main\n"
                    "p = cProfile.Profile()\np.enable()\n"
                    f"try:\n    main()\nfinally:\n    p.disable(); p.dump_stats({out!r})\n")
        else:
            code = "from bmig.cli.breqd import main; main()"
        return [sys.executable, "-c", code, *args]

    @property
    def proc(self):
        return None if self.child is None else self.child.proc

    def start(self) -> "Breqd":
        """A new breqd process on this directory (again after stop(remove=False)), ready
        when it says READY=1."""
        self.starts += 1
        self.child = Proc("breqd", self.argv(), self.log_path)
        start_notified(self.child, self.dir, child_env())
        return self

    def stop(self, remove: bool = True) -> int | None:
        code = None if self.child is None else self.child.stop(STOP_TIMEOUT)
        if remove:
            shutil.rmtree(self.dir, ignore_errors=True)
            if self in _daemons:
                _daemons.remove(self)
        return code

    def log_tail(self, n: int = 30) -> str:
        try:
            with open(self.log_path, errors="replace") as f:
                return "".join(f.readlines()[-n:])
        except OSError:
            return ""

    def client(self) -> TrackerClient:
        return TrackerClient(self.control, timeout=300.0, client="bench")

    # /proc figures
    def status(self) -> dict[str, int]:
        """VmRSS, VmHWM (bytes) of breqd."""
        assert self.child is not None
        return self.child.memory()

    def cpu_seconds(self) -> float:
        assert self.child is not None
        return self.child.cpu_seconds()

    def io(self) -> dict[str, int]:
        out = {}
        try:
            with open(f"/proc/{self.proc.pid}/io") as f:
                for line in f:
                    key, _, value = line.partition(":")
                    out[key] = int(value)
        except OSError:
            pass
        return out


# -- mark load from many processes ----------------------------------------------------

@dataclass
class MarkCase:
    clients: int
    batch: int          # ranges per MARK message
    depth: int          # MARK messages in flight per client
    duration: float
    size: int           # device size (a power of two)
    fresh: bool         # draw new random offsets for every message (first-time marks)


def _mark_worker(control: str, device: str, case: MarkCase, seed: int, ready, go, start_at,
                 results) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        rng = random.Random(seed)
        bits = case.size.bit_length() - 1 - 12          # 4 KiB blocks in the device
        getrandbits = rng.getrandbits

        def batch() -> list[tuple[int, int]]:
            return [(getrandbits(bits) << 12, BLOCK) for _ in range(case.batch)]

        pool = [] if case.fresh else [batch() for _ in range(max(8, 2 * case.depth))]
        client = TrackerClient(control, timeout=120.0, client="bench")
        ready.put(os.getpid())
        go.wait()
        begin = start_at.value
        while time.monotonic() < begin:
            time.sleep(0.0005)
        deadline = begin + case.duration
        fields = {"device": device}
        send, receive, clock = client.send, client.receive, time.monotonic
        in_flight: list[tuple[int, float]] = []
        latencies: list[float] = []
        done = messages = 0
        i = 0
        while True:
            now = clock()
            while len(in_flight) < case.depth and now < deadline:
                ranges = batch() if case.fresh else pool[i % len(pool)]
                i += 1
                in_flight.append((send(Op.MARK, fields, ranges), now))
            if not in_flight:
                break
            rid, sent = in_flight.pop(0)
            receive(rid)
            end = clock()
            done += case.batch
            messages += 1
            if messages % 4 == 0 or case.batch >= 16:
                latencies.append(end - sent)
        client.close()
        results.put({"pid": os.getpid(), "marks": done, "messages": messages, "end": end,
                     "latencies": latencies[:5000]})
    except BaseException as exc:  # report, so the parent does not wait forever
        results.put({"pid": os.getpid(), "error": f"{type(exc).__name__}: {exc}",
                     "trace": traceback.format_exc()})
        ready.put(-1)


def run_marks(daemon: Breqd, device: str, case: MarkCase) -> dict:
    ctx = mp.get_context("fork")
    ready, results = ctx.Queue(), ctx.Queue()
    go = ctx.Event()
    start_at = ctx.Value("d", 0.0, lock=False)
    procs = []
    for n in range(case.clients):
        p = ctx.Process(target=_mark_worker, daemon=True,
                        args=(daemon.control, device, case, 1000 + n + int(time.time()),
                              ready, go, start_at, results))
        p.start()
        procs.append(p)
        _workers.append(p)
    try:
        for _ in procs:
            if ready.get(timeout=120) == -1:
                failed = results.get(timeout=10)
                raise RuntimeError(f"a client failed: {failed['error']}\n{failed['trace']}")
        with daemon.client() as c:
            before = c.stats(device)
        cpu0, io0 = daemon.cpu_seconds(), daemon.io()
        start_at.value = time.monotonic() + 0.2
        go.set()
        outs = [results.get(timeout=case.duration + 300) for _ in procs]
        errors = [o for o in outs if "error" in o]
        if errors:
            raise RuntimeError(f"{len(errors)} client(s) failed: {errors[0]['error']}\n"
                               f"{errors[0]['trace']}")
        end = max(o["end"] for o in outs)
        cpu1, io1 = daemon.cpu_seconds(), daemon.io()
        with daemon.client() as c:
            after = c.stats(device)
    finally:
        for p in procs:
            p.join(10)
            if p.is_alive():
                p.kill()
                p.join(5)
            _workers.remove(p)
    wall = end - start_at.value
    marks = sum(o["marks"] for o in outs)
    messages = sum(o["messages"] for o in outs)
    lat = sorted(x for o in outs for x in o["latencies"])
    flushes = after["flushes"] - before["flushes"]
    new_dirty = (after["dirty_bytes"] - before["dirty_bytes"]) // after["chunk_size"]
    if after["marks"] - before["marks"] != marks:   # breqd counts ranges it was sent
        raise RuntimeError(f"breqd counted {after['marks'] - before['marks']} marks, "
                           f"the clients {marks}")
    return {
        "clients": case.clients, "batch": case.batch, "depth": case.depth,
        "seconds": round(wall, 3), "marks": marks, "messages": messages,
        "marks_per_s": round(marks / wall), "messages_per_s": round(messages / wall),
        "breqd_cpu": round((cpu1 - cpu0) / wall, 2),
        "latency_ms_p50": round(1000 * _pct(lat, 50), 3),
        "latency_ms_p99": round(1000 * _pct(lat, 99), 3),
        "flushes": flushes, "flushes_per_s": round(flushes / wall, 1),
        "marks_per_flush": round(marks / flushes, 1) if flushes else None,
        "written_MiB_per_s": round((io1.get("wchar", 0) - io0.get("wchar", 0))
                                   / MiB / wall, 2),
        "disk_write_MiB_per_s": round((io1.get("write_bytes", 0) - io0.get("write_bytes", 0))
                                      / MiB / wall, 2),
        "write_calls": io1.get("syscw", 0) - io0.get("syscw", 0),
        "new_dirty_chunks": new_dirty,
    }


def _pct(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    return values[min(len(values) - 1, int(len(values) * p / 100))]


# -- helpers for big batches -----------------------------------------------------------

def mark_chunks(client: TrackerClient, device: str, chunks: list[int], chunk_size: int,
                depth: int = 4, per_message: int = MAX_RANGES_PER_FRAME) -> None:
    """Mark every chunk in ``chunks`` individually (one range each), pipelined."""
    pending: list[int] = []
    fields = {"device": device}
    for i in range(0, len(chunks), per_message):
        ranges = [(c * chunk_size, chunk_size) for c in chunks[i:i + per_message]]
        pending.append(client.send(Op.MARK, fields, ranges))
        if len(pending) >= depth:
            client.receive(pending.pop(0))
    for rid in pending:
        client.receive(rid)


def random_chunks(nchunks: int, fraction: float, rng: random.Random) -> list[int]:
    chosen = rng.sample(range(nchunks), int(nchunks * fraction))
    chosen.sort()
    return chosen


def mib(n: float) -> float:
    return round(n / MiB, 1)


# -- sections --------------------------------------------------------------------------

def section_a(args, out: dict) -> None:
    duration = 2.0 if args.quick else args.seconds
    configs = [(1, 8), (16, 8), (256, 4)]
    if not args.quick:
        configs.insert(0, (1, 1))
    daemon = Breqd(args.tmpdir, "a", args.profile).start()
    try:
        with daemon.client() as c:
            c.add_device("a", TiB)          # a new device is all dirty: every chunk durable
            stats = c.stats("a")
            assert stats["dirty_bytes"] == TiB, stats
        rows = []
        for batch, depth in configs:
            case = MarkCase(args.clients, batch, depth, duration, TiB, fresh=False)
            row = run_marks(daemon, "a", case)
            rows.append(row)
            print(f"  a  batch {batch:>3}  depth {depth:>2}: {row['marks_per_s']:>9,} marks/s "
                  f"({row['messages_per_s']:,} msg/s, breqd CPU {row['breqd_cpu']:.2f})",
                  flush=True)
        out["a"] = {"device": "1 TiB, 64 KiB chunks, all dirty", "rows": rows,
                    "target_marks_per_s": 200_000,
                    "met_by": [f"batch {r['batch']} depth {r['depth']}" for r in rows
                               if r["marks_per_s"] >= 200_000]}
    finally:
        daemon.stop()


def section_b(args, out: dict) -> None:
    duration = 3.0 if args.quick else args.seconds + 3
    configs = [(1, 8), (16, 8)] if args.quick else [(1, 1), (1, 8), (16, 8)]
    kind = fs_type(args.disk_dir)
    if kind in ("tmpfs", "ramfs"):
        print(f"  b  WARNING: {args.disk_dir} is {kind}; fdatasync costs nothing there",
              flush=True)
    daemon = Breqd(args.disk_dir, "b", args.profile).start()
    try:
        with daemon.client() as c:
            c.add_device("b", TiB)
        rows = []
        for batch, depth in configs:
            with daemon.client() as c:
                c.clear_all("b", force=True)
                assert c.stats("b")["dirty_bytes"] == 0
            case = MarkCase(args.clients, batch, depth, duration, TiB, fresh=True)
            row = run_marks(daemon, "b", case)
            row["first_time_fraction"] = round(row["new_dirty_chunks"] / row["marks"], 3)
            rows.append(row)
            print(f"  b  batch {batch:>3}  depth {depth:>2}: {row['marks_per_s']:>9,} marks/s, "
                  f"{row['flushes_per_s']} flushes/s, {row['marks_per_flush']} marks/flush, "
                  f"{row['written_MiB_per_s']} MiB/s written "
                  f"({row['disk_write_MiB_per_s']} MiB/s to disk), "
                  f"breqd CPU {row['breqd_cpu']:.2f}", flush=True)
        out["b"] = {"device": "1 TiB, 64 KiB chunks, cleared", "state_dir_fs": kind,
                    "rows": rows}
    finally:
        daemon.stop()


def section_c(args, out: dict) -> None:
    rng = random.Random(42)
    size, chunk = TiB, CHUNK
    nchunks = size // chunk
    daemon = Breqd(args.tmpdir, "c", args.profile).start()
    res: dict = {"device": "1 TiB, 64 KiB chunks", "dirty_fraction": 0.10,
                 "max_bytes": 64 * MiB}
    try:
        with daemon.client() as c:
            res["rss_empty"] = daemon.status()
            c.add_device("c", size)
            c.clear_all("c", force=True)
            chunks = random_chunks(nchunks, 0.10, rng)
            t = time.perf_counter()
            mark_chunks(c, "c", chunks, chunk)
            res["mark_seconds"] = round(time.perf_counter() - t, 2)
            res["marked_chunks"] = len(chunks)
            st = c.stats("c")
            assert st["dirty_bytes"] == len(chunks) * chunk, st
            res["rss_before"] = daemon.status()
            print(f"  c  marked {len(chunks):,} chunks in {res['mark_seconds']} s", flush=True)

            # 1. check out everything, holding it all (no commit)
            runs = nbytes = calls = 0
            first_replies: list[list[tuple[int, int]]] = []
            t = time.perf_counter()
            while True:
                got = c.checkout("c", 64 * MiB)
                calls += 1
                if not got:
                    break
                if len(first_replies) < 2:
                    first_replies.append(got)
                runs += len(got)
                nbytes += sum(length for _, length in got)
            res["checkout_seconds"] = round(time.perf_counter() - t, 2)
            res["checkout_calls"] = calls
            res["runs"] = runs
            res["checked_out_bytes"] = nbytes
            assert nbytes == len(chunks) * chunk, (nbytes, len(chunks) * chunk)
            res["rss_after_checkout"] = daemon.status()
            print(f"  c  checked out {runs:,} runs in {calls:,} calls: "
                  f"{res['checkout_seconds']} s; RSS {mib(res['rss_before']['VmRSS'])} -> "
                  f"{mib(res['rss_after_checkout']['VmRSS'])} MiB", flush=True)

            # commit the oldest runs while all the others are still held (a sender that
            # commits in order, far behind its checkouts): bounded to two replies' worth
            oldest = [r for reply in first_replies for r in reply]
            t = time.perf_counter()
            for reply in first_replies:
                c.commit("c", reply)
            spent = time.perf_counter() - t
            res["commit_oldest_runs"] = len(oldest)
            res["commit_oldest_seconds"] = round(spent, 3)
            res["commit_oldest_us_per_run"] = round(1e6 * spent / len(oldest), 1)
            # removing from the front of a list of n held runs costs ~n: all of them ~n^2/2
            res["commit_all_in_order_estimate_s"] = round(spent / len(oldest) * runs / 2)
            print(f"  c  commit of the {len(oldest):,} oldest runs while {runs:,} are held: "
                  f"{spent:.2f} s ({res['commit_oldest_us_per_run']} us per run; all of them "
                  f"in order ~{res['commit_all_in_order_estimate_s']} s)", flush=True)
            held_bytes = nbytes - sum(length for _, length in oldest)
        # closing the connection aborts every held run: time until breqd answers again
        t = time.perf_counter()
        with daemon.client() as c2:
            st = c2.stats("c")
            while st["inflight_bytes"]:
                st = c2.stats("c")
        res["abort_on_disconnect_seconds"] = round(time.perf_counter() - t, 2)
        assert st["dirty_bytes"] == held_bytes, (st, held_bytes)

        # 2. a sender's loop: check out, then commit what was checked out
        with daemon.client() as c:
            runs = calls = 0
            t = time.perf_counter()
            while True:
                got = c.checkout("c", 64 * MiB)
                calls += 1
                if not got:
                    break
                runs += len(got)
                c.commit("c", got)
            res["checkout_commit_seconds"] = round(time.perf_counter() - t, 2)
            res["checkout_commit_runs"] = runs
            st = c.stats("c")
            assert st["dirty_bytes"] == 0 and st["inflight_bytes"] == 0, st
            assert runs, "nothing to check out"
            res["rss_after_commit"] = daemon.status()
        print(f"  c  checkout+commit loop: {res['checkout_commit_seconds']} s; "
              f"abort of held runs on disconnect: {res['abort_on_disconnect_seconds']} s",
              flush=True)
        out["c"] = res
    finally:
        daemon.stop()


def section_d(args, out: dict) -> None:
    rng = random.Random(7)
    res: dict = {}
    ndev = 10
    daemon = Breqd(args.tmpdir, "d", args.profile).start()
    try:
        with daemon.client() as c:
            res["rss_empty"] = daemon.status()
            t = time.perf_counter()
            for n in range(ndev):
                c.add_device(f"d{n}", TiB)
            res["add_seconds"] = round(time.perf_counter() - t, 2)
            res["rss_after_add"] = daemon.status()     # new devices are all dirty
            nchunks = TiB // CHUNK
            frac = 0.001 if args.quick else 0.01
            for n in range(ndev):
                c.clear_all(f"d{n}", force=True)
                mark_chunks(c, f"d{n}", random_chunks(nchunks, frac, rng), CHUNK)
            res["random_dirty_fraction"] = frac
            res["rss_after_random_marks"] = daemon.status()
            for n in range(ndev):
                c.set_all_dirty(f"d{n}")
            res["rss_after_set_all_dirty"] = daemon.status()
        daemon.stop(remove=False)
        t = time.perf_counter()
        daemon.start()
        res["restart_seconds"] = round(time.perf_counter() - t, 2)
        res["rss_after_restart"] = daemon.status()
        bitmaps = ndev * (TiB // CHUNK // 8)
        res["bitmaps_bytes"] = bitmaps
        res["target_bytes"] = bitmaps + 64 * MiB
        peak = max(res[k]["VmRSS"] for k in res if k.startswith("rss_"))
        res["max_rss"] = peak
        res["met"] = peak <= res["target_bytes"]
        print(f"  d  10 x 1 TiB @ 64 KiB: RSS empty {mib(res['rss_empty']['VmRSS'])}, "
              f"added {mib(res['rss_after_add']['VmRSS'])}, marked "
              f"{mib(res['rss_after_random_marks']['VmRSS'])}, all dirty "
              f"{mib(res['rss_after_set_all_dirty']['VmRSS'])}, restarted "
              f"{mib(res['rss_after_restart']['VmRSS'])} MiB (target "
              f"{mib(res['target_bytes'])})", flush=True)
    finally:
        daemon.stop()
    out["d"] = res

    res4: dict = {}
    daemon = Breqd(args.tmpdir, "d4k", args.profile).start()
    try:
        with daemon.client() as c:
            res4["rss_empty"] = daemon.status()
            t = time.perf_counter()
            c.add_device("big", TiB, 4 * KiB)
            res4["add_seconds"] = round(time.perf_counter() - t, 2)
            res4["rss_after_add"] = daemon.status()
            c.clear_all("big", force=True)
            nchunks = TiB // (4 * KiB)
            mark_chunks(c, "big", random_chunks(nchunks, 0.001, rng), 4 * KiB)
            res4["random_dirty_fraction"] = 0.001
            res4["rss_after_random_marks"] = daemon.status()
            c.set_all_dirty("big")
            res4["rss_after_set_all_dirty"] = daemon.status()
        daemon.stop(remove=False)
        t = time.perf_counter()
        daemon.start()
        res4["restart_seconds"] = round(time.perf_counter() - t, 2)
        res4["rss_after_restart"] = daemon.status()
        bitmap = TiB // (4 * KiB) // 8
        res4["bitmaps_bytes"] = bitmap
        res4["target_bytes"] = bitmap + 64 * MiB
        peak = max(res4[k]["VmRSS"] for k in res4 if k.startswith("rss_"))
        res4["max_rss"] = peak
        res4["met"] = peak <= res4["target_bytes"]
        print(f"  d  1 x 1 TiB @ 4 KiB: RSS empty {mib(res4['rss_empty']['VmRSS'])}, "
              f"added {mib(res4['rss_after_add']['VmRSS'])}, all dirty "
              f"{mib(res4['rss_after_set_all_dirty']['VmRSS'])}, restarted "
              f"{mib(res4['rss_after_restart']['VmRSS'])} MiB (target "
              f"{mib(res4['target_bytes'])})", flush=True)
    finally:
        daemon.stop()
    out["d4k"] = res4


# -- report ----------------------------------------------------------------------------

def _fmt(v) -> str:
    if isinstance(v, bool):
        return "yes" if v else "NO"
    if isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, float):
        return f"{v:,.2f}" if abs(v) < 100 else f"{v:,.0f}"
    return "-" if v is None else str(v)


table = functools.partial(benchlib.table, fmt=_fmt, left=0)


def report(out: dict) -> str:
    parts = []
    if "a" in out:
        a = out["a"]
        parts.append(f"a. marks on already-durable chunks ({a['device']}; "
                     f"{a['rows'][0]['clients']} client processes, 4 KiB random ranges)")
        parts.append(table(
            ["ranges/MARK", "in flight/client", "marks/s", "MARKs/s", "breqd CPU",
             "p50 ms", "p99 ms", ">= 200k"],
            [[r["batch"], r["depth"], r["marks_per_s"], r["messages_per_s"], r["breqd_cpu"],
              r["latency_ms_p50"], r["latency_ms_p99"], r["marks_per_s"] >= 200_000]
             for r in a["rows"]]))
        met = ", ".join(a["met_by"]) or "none"
        parts.append(f"target >= 200,000 marks/s: met by {met}")
    if "b" in out:
        b = out["b"]
        parts.append(f"\nb. first-time marks ({b['device']}; state dir on {b['state_dir_fs']})")
        parts.append(table(
            ["ranges/MARK", "in flight/client", "marks/s", "fdatasync/s", "marks/flush",
             "MiB/s written", "p50 ms", "p99 ms", "new chunks/mark"],
            [[r["batch"], r["depth"], r["marks_per_s"], r["flushes_per_s"],
              r["marks_per_flush"], r["written_MiB_per_s"], r["latency_ms_p50"],
              r["latency_ms_p99"], r["first_time_fraction"]] for r in b["rows"]]))
    if "c" in out:
        c = out["c"]
        parts.append(f"\nc. checkout of every dirty run ({c['device']}, "
                     f"{c['marked_chunks']:,} chunks = 10 % dirty at random, "
                     f"checkout(max_bytes=64 MiB))")
        parts.append(table(
            ["step", "seconds", "runs", "VmRSS MiB", "VmHWM MiB"],
            [["empty breqd", None, None, mib(c["rss_empty"]["VmRSS"]),
              mib(c["rss_empty"]["VmHWM"])],
             ["mark 10 % (64k ranges/MARK)", c["mark_seconds"], None,
              mib(c["rss_before"]["VmRSS"]), mib(c["rss_before"]["VmHWM"])],
             ["checkout until empty (held)", c["checkout_seconds"], c["runs"],
              mib(c["rss_after_checkout"]["VmRSS"]), mib(c["rss_after_checkout"]["VmHWM"])],
             [f"commit oldest {c['commit_oldest_runs']:,} runs while held",
              c["commit_oldest_seconds"], c["commit_oldest_runs"], None, None],
             ["disconnect: abort held runs", c["abort_on_disconnect_seconds"], None, None,
              None],
             ["checkout + commit loop", c["checkout_commit_seconds"],
              c["checkout_commit_runs"], mib(c["rss_after_commit"]["VmRSS"]),
              mib(c["rss_after_commit"]["VmHWM"])]]))
        parts.append(f"{c['checkout_calls']:,} checkout calls; "
                     f"{c['runs'] / c['checkout_seconds']:,.0f} runs/s held, "
                     f"{c['checkout_commit_runs'] / c['checkout_commit_seconds']:,.0f} runs/s "
                     f"with commit\n"
                     f"committing held runs oldest first costs {c['commit_oldest_us_per_run']} "
                     f"us per run with {c['runs']:,} held (the event loop is blocked meanwhile):"
                     f" ~{c['commit_all_in_order_estimate_s']:,} s to commit them all in order")
    for key, title in (("d", "10 devices x 1 TiB, 64 KiB chunks"),
                       ("d4k", "1 device x 1 TiB, 4 KiB chunks")):
        if key not in out:
            continue
        d = out[key]
        if key == "d":
            parts.append("\nd. breqd memory")
        rows = [[title, step, mib(d[k]["VmRSS"]), mib(d[k]["VmHWM"])]
                for step, k in (("empty", "rss_empty"), ("after add (all dirty)",
                                                         "rss_after_add"),
                                (f"after clear + {d['random_dirty_fraction']:.1%} random marks",
                                 "rss_after_random_marks"),
                                ("after set_all_dirty", "rss_after_set_all_dirty"),
                                (f"after restart ({d['restart_seconds']} s)",
                                 "rss_after_restart"))]
        parts.append(table(["case", "step", "VmRSS MiB", "VmHWM MiB"], rows))
        parts.append(f"target RSS <= bitmaps {mib(d['bitmaps_bytes'])} MiB + 64 MiB = "
                     f"{mib(d['target_bytes'])} MiB: max RSS {mib(d['max_rss'])} MiB -> "
                     f"{'met' if d['met'] else 'NOT met'}")
    return "\n".join(parts)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="shorter cases, fewer configurations")
    p.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    p.add_argument("--only", default="a,b,c,d", help="sections to run (default: a,b,c,d)")
    p.add_argument("--clients", type=int, default=32, help="client processes in a and b")
    p.add_argument("--seconds", type=float, default=5.0,
                   help="length of each mark case in a (b runs 3 s longer) [5]")
    p.add_argument("--tmpdir", default="/tmp", help="where breqd's state goes for a, c, d")
    p.add_argument("--disk-dir", default="/tmp",
                   help="where breqd's state goes for b: must be a real disk [/tmp]")
    p.add_argument("--profile", metavar="DIR",
                   help="run breqd under cProfile and keep one .prof per breqd in DIR")
    args = p.parse_args()
    if args.clients < 1 or args.seconds <= 0:
        p.error("--clients must be at least 1 and --seconds positive")
    sections = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = set(sections) - set("abcd")
    if unknown:
        p.error(f"unknown section(s): {', '.join(sorted(unknown))}")
    install_signal_handlers()
    facts = provenance()
    out: dict = {**facts, "quick": args.quick,
                 "tmpdir_fs": fs_type(args.tmpdir), "disk_dir_fs": fs_type(args.disk_dir)}
    print(f"breqd benchmark: state in {args.tmpdir} ({out['tmpdir_fs']}), b in "
          f"{args.disk_dir} ({out['disk_dir_fs']})", flush=True)
    print(provenance_line(facts), flush=True)
    runners = {"a": section_a, "b": section_b, "c": section_c, "d": section_d}
    t0 = time.monotonic()
    try:
        for s in sections:
            runners[s](args, out)
    except (KeyboardInterrupt, Stopped):
        print("\ninterrupted; cleaning up", file=sys.stderr)
        return 130
    finally:
        cleanup()
    out["total_seconds"] = round(time.monotonic() - t0, 1)
    changed = provenance_end(out)
    print()
    print(report(out))
    print(f"\ntotal {out['total_seconds']} s; load average before {out['loadavg_before']}, "
          f"after {out['loadavg_after']} (other processes on the machine skew the figures)")
    if changed:
        print(changed, file=sys.stderr)
    if args.json:
        save_json(args.json, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
