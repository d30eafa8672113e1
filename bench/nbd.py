#!/usr/bin/env python3
"""Compare NBD servers in one run: qemu-nbd, nbdkit's file plugin, bmig-nbd with and without
tracking, all driven by fio's nbd engine over a Unix socket, one connection each (--jobs N:
N fio jobs, a connection each).

    .venv/bin/python bench/nbd.py                   # 3 workloads x 4 servers x 3 x 18 s (~11 min)
    .venv/bin/python bench/nbd.py --quick           # 5 s runs, 1 repeat, 512 MiB (~110 s)
    .venv/bin/python bench/nbd.py --only a,c --servers qemu-nbd,bmig-nbd --repeat 5
    .venv/bin/python bench/nbd.py --json /tmp/nbd.json

Every server serves the same backing file on /dev/shm (2 GiB by default, filled with random
data once at the start, so reads hit data and not holes). Workloads (fio --numjobs=1
--time_based --norandommap --randrepeat=0, measured after a --ramp of 3 s):

  a  4 KiB random write, iodepth 32
  b  1 MiB sequential write, iodepth 8
  c  4 KiB random read, iodepth 32

Each (server, workload) pair runs --repeat times, servers interleaved round-robin (the
starting server rotates each round) so that machine noise hits all of them alike. The
report gives the median and min-max of IOPS and MB/s, latency, and the CPU time each
server (and breqd, for the tracked bmig-nbd) used during the run, from /proc/PID/stat;
then the ratios against the targets, PASS or BELOW.

The ramp keeps out the one-off cost of tracking: after an idle spell bmig-nbd holds no
chunk, and the first write to each one waits for a round trip to breqd (about 2 s at
the start of a run over 2 GiB). --ramp 0 shows it.

Every process runs in its own session and is killed at the end, also on Ctrl-C, SIGTERM,
SIGHUP or an error; the temporary directory and the backing file are removed, and nothing
else is touched. A server or breqd that was killed from outside between or during runs is
restarted and the run done again.

--hot runs another case instead: writes to chunks a sync has just made clean against
writes to chunks already dirty, fio 4 KiB random writes at iodepth 32 over a working set
(--working-set, 256 MiB) of the export, breqd's state on a real disk (--disk-dir,
/var/tmp), once with breqd's activity log off (activity_log_chunks = 0) and once at its
default, in one run. See bench/README.md.

One file over 500 lines on purpose: a benchmark is a script, read top to bottom
beside its figures in bench/README.md; what the scripts share is in benchlib.py.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

import benchlib  # noqa: E402
from benchlib import (BRECEIVE, PATHS, START_TIMEOUT, child_env, cleanup,  # noqa: E402
                      fio_nbd_problem, install_signal_handlers, Proc, provenance,
                      provenance_end, provenance_line, save_json, source_digest,
                      start_notified)
from bmig.config import parse_size  # noqa: E402
from bmig.processes import Stopped  # noqa: E402
from bmig.constants import GiB, KiB, MiB  # noqa: E402
from bmig.tracker.blocking_client import TrackerClient  # noqa: E402

DEVICE = "bench"
MAX_RESTARTS = 2           # per run: a server killed from outside is restarted this often
FIO_GRACE = 120.0          # fio gets runtime + this before it is called hung


@dataclass(frozen=True)
class Workload:
    key: str
    name: str
    title: str
    rw: str
    bs: str
    iodepth: int
    metric: str            # "iops" or "mbps": what the targets compare


WORKLOADS = {w.key: w for w in (
    Workload("a", "randwrite", "4 KiB random write, iodepth 32", "randwrite", "4k", 32, "iops"),
    Workload("b", "seqwrite", "1 MiB sequential write, iodepth 8", "write", "1m", 8, "mbps"),
    Workload("c", "randread", "4 KiB random read, iodepth 32", "randread", "4k", 32, "iops"),
)}
SERVERS = ("qemu-nbd", "nbdkit", "bmig-nbd", "bmig-nbd-notrack")
ALIASES = {"qemu": "qemu-nbd", "bmig": "bmig-nbd", "notrack": "bmig-nbd-notrack",
           "bmig-notrack": "bmig-nbd-notrack"}

# (title, workload, numerator server, denominator server, metric, minimum ratio)
TARGETS = (
    ("4 KiB rand write, tracking on: bmig-nbd / qemu-nbd IOPS", "a", "bmig-nbd", "qemu-nbd",
     "iops", 1.0),
    ("1 MiB seq write, tracking on: bmig-nbd / nbdkit MB/s", "b", "bmig-nbd", "nbdkit",
     "mbps", 0.8),
    ("4 KiB rand read: bmig-nbd / qemu-nbd IOPS", "c", "bmig-nbd", "qemu-nbd", "iops", 1.0),
    ("4 KiB rand write: bmig-nbd tracking on / off IOPS", "a", "bmig-nbd", "bmig-nbd-notrack",
     "iops", 0.9),
)


class ServerDied(Exception):
    pass


# -- readiness ---------------------------------------------------------------------------

def start_probed(p: Proc, sock_path: str) -> Proc:
    """Start a server that does not notify; ready once its socket sends the NBD greeting."""
    p.start()
    deadline = time.monotonic() + START_TIMEOUT
    delay = 0.005
    while True:
        if not p.alive():
            raise RuntimeError(f"{p.label} exited with {p.proc.returncode}:\n{p.log_tail()}")
        if _nbd_greets(sock_path):
            return p
        if time.monotonic() > deadline:
            raise RuntimeError(f"{p.label}: no NBD greeting on {sock_path} in "
                               f"{START_TIMEOUT:.0f} s:\n{p.log_tail()}")
        time.sleep(delay)
        delay = min(delay * 2, 0.1)


def _nbd_greets(path: str) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(2.0)
        try:
            s.connect(path)
            return s.recv(8, socket.MSG_WAITALL) == b"NBDMAGIC"
        except OSError:
            return False


# -- servers -----------------------------------------------------------------------------

@dataclass
class Server:
    name: str
    sock: str
    export: str            # "" is the default export
    proc: Proc

    def uri(self) -> str:
        return f"nbd+unix:///{self.export}?socket={self.sock}"


@dataclass
class Setup:
    tmp: str
    backing: str
    size: int
    servers: dict[str, Server] = field(default_factory=dict)
    breqd: Proc | None = None
    jobs: int = 1          # fio jobs, each with its own NBD connection

    @property
    def control(self) -> str:
        return os.path.join(self.tmp, "breqd.sock")

    def tracker(self) -> TrackerClient:
        return TrackerClient(self.control, timeout=60.0, client="bench-nbd")


def start_breqd(setup: Setup) -> Proc:
    p = benchlib.start_breqd(setup.tmp, setup.control)
    with setup.tracker() as c:
        if DEVICE not in {d.get("name") for d in c.list_devices()}:
            c.add_device(DEVICE, setup.size)
    return p


def start_server(setup: Setup, name: str) -> Server:
    sock = os.path.join(setup.tmp, f"{name}.sock")
    log = os.path.join(setup.tmp, f"{name}.log")
    if name == "qemu-nbd":
        p = Proc(name, ["qemu-nbd", "-f", "raw", "--cache=writeback", "--aio=threads",
                        "-e", str(setup.jobs), "-k", sock, "-t", setup.backing], log)
        return Server(name, sock, "", start_probed(p, sock))
    if name == "nbdkit":
        p = Proc(name, ["nbdkit", "-f", "-U", sock, "file", setup.backing], log)
        return Server(name, sock, "", start_probed(p, sock))
    argv = [sys.executable, "-c", "from bmig.cli.nbd import main; main()",
            "--device", DEVICE, "--backing", setup.backing, "--unix", sock,
            "--control", setup.control, "--manage-dir", os.path.join(setup.tmp, name)]
    if name == "bmig-nbd-notrack":
        argv.append("--no-track")
    p = Proc(name, argv, log)
    start_notified(p, setup.tmp, child_env())
    return Server(name, sock, DEVICE, p)


# -- one fio run -------------------------------------------------------------------------

def fio_argv(server: Server, w: Workload, runtime: int, ramp: int, out: str,
             jobs: int = 1) -> list[str]:
    """One fio run; ``jobs`` > 1: that many jobs, each on its own NBD connection (as a
    client that uses NBD_FLAG_CAN_MULTI_CONN opens them), reported together."""
    return ["fio", f"--name={w.name}", "--ioengine=nbd", f"--uri={server.uri()}",
            f"--rw={w.rw}", f"--bs={w.bs}", f"--iodepth={w.iodepth}", f"--numjobs={jobs}",
            *(["--group_reporting"] if jobs > 1 else []),
            "--time_based", f"--runtime={runtime}", f"--ramp_time={ramp}",
            "--norandommap", "--randrepeat=0",
            "--output-format=json", f"--output={out}"]


def breqd_counters(setup: Setup) -> dict[str, int]:
    if setup.breqd is None:
        return {}
    with setup.tracker() as c:
        s = c.stats(DEVICE)
    return {k: int(s.get(k, 0)) for k in ("marks", "flushes")}


def run_once(setup: Setup, server: Server, w: Workload, runtime: int, ramp: int, tag: str,
             clear_bitmap: bool) -> dict:
    out = os.path.join(setup.tmp, f"fio-{tag}.json")
    fio = Proc(f"fio {tag}", fio_argv(server, w, runtime, ramp, out, setup.jobs),
               os.path.join(setup.tmp, f"fio-{tag}.log"))
    if clear_bitmap and setup.breqd is not None and server.name == "bmig-nbd":
        with setup.tracker() as c:
            c.clear_all(DEVICE, force=True)
    counters0 = breqd_counters(setup)
    cpu0 = server.proc.cpu_seconds()
    bcpu0 = setup.breqd.cpu_seconds() if setup.breqd else 0.0
    t0 = time.monotonic()
    fio.start()
    try:
        fio.proc.wait(ramp + runtime + FIO_GRACE)
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"fio on {server.name} ({w.name}) did not finish in "
                           f"{ramp + runtime + FIO_GRACE:.0f} s; {server.name} log:\n"
                           f"{server.proc.log_tail()}") from None
    wall = time.monotonic() - t0
    try:                         # an exited but unreaped process still has its stat
        cpu = server.proc.cpu_seconds() - cpu0
        bcpu = (setup.breqd.cpu_seconds() - bcpu0) if setup.breqd else 0.0
    except OSError:
        cpu = bcpu = 0.0
    fio.stop()
    for p in (server.proc, setup.breqd):
        if p is not None and not p.alive():
            raise ServerDied(f"{p.label} exited with {p.proc.returncode} during the "
                             f"{w.name} run on {server.name}:\n{p.log_tail(8)}")
    counters1 = breqd_counters(setup)
    r = parse_fio(out, fio, w, setup.jobs)
    # fio counts no I/O during the ramp, the CPU clocks do: per I/O figures assume the
    # ramp ran at the measured rate.
    ios = max(1.0, r["iops"] * wall)
    r.update(server=server.name, workload=w.key, wall_s=round(wall, 3), ios_all=round(ios),
             server_cpu_s=round(cpu, 3), server_cpu=round(cpu / wall, 3),
             server_us_per_io=round(cpu * 1e6 / ios, 2),
             breqd_cpu_s=round(bcpu, 3), breqd_cpu=round(bcpu / wall, 3),
             breqd_us_per_io=round(bcpu * 1e6 / ios, 2))
    if counters0:
        r["breqd_marks"] = counters1["marks"] - counters0["marks"]
        r["breqd_flushes"] = counters1["flushes"] - counters0["flushes"]
    return r


def parse_fio(path: str, fio: Proc, w: Workload, jobs: int = 1) -> dict:
    """The run's figures; with several jobs (--group_reporting) fio sums the I/O and
    gives the CPU as one job's average, so that is multiplied back."""
    try:
        with open(path, errors="replace") as f:
            text = f.read()
        data = json.loads(text[text.index("{"):])   # fio may print warnings before the JSON
        job = data["jobs"][0]
    except (OSError, ValueError, KeyError, IndexError):
        raise RuntimeError(f"fio ({w.name}) exited with {fio.proc.returncode} and no "
                           f"result:\n{fio.log_tail()}") from None
    if fio.proc.returncode != 0 or job.get("error"):
        raise RuntimeError(f"fio ({w.name}) failed (exit {fio.proc.returncode}, error "
                           f"{job.get('error')}):\n{fio.log_tail()}")
    side = job["read"] if w.rw.endswith("read") else job["write"]
    pct = side.get("clat_ns", {}).get("percentile", {})
    return {"iops": round(side["iops"], 1), "mbps": round(side["bw_bytes"] / 1e6, 1),
            "ios": int(side["total_ios"]), "bytes": int(side["io_bytes"]),
            "runtime_ms": int(side["runtime"]),
            "lat_ms_mean": round(side["lat_ns"]["mean"] / 1e6, 3),
            "clat_ms_p50": round(pct.get("50.000000", 0) / 1e6, 3),
            "clat_ms_p99": round(pct.get("99.000000", 0) / 1e6, 3),
            "fio_cpu": round((job["usr_cpu"] + job["sys_cpu"]) / 100 * jobs, 3)}


# -- the whole run -----------------------------------------------------------------------

def fill_random(path: str, size: int) -> float:
    """Write ``size`` bytes of random data; returns the seconds it took."""
    t = time.monotonic()
    block = 8 * MiB
    with open(path, "wb") as f:
        left = size
        while left:
            n = min(block, left)
            f.write(os.urandom(n))
            left -= n
    return time.monotonic() - t


def run_all(args, setup: Setup, out: dict) -> None:
    secs = fill_random(setup.backing, setup.size)
    out["fill_seconds"] = round(secs, 2)
    print(f"backing file {setup.backing}: {setup.size / GiB:g} GiB of random data in "
          f"{secs:.1f} s", flush=True)
    if "bmig-nbd" in args.server_list:
        setup.breqd = start_breqd(setup)
    for name in args.server_list:
        setup.servers[name] = start_server(setup, name)
    out["pids"] = {n: s.proc.pid for n, s in setup.servers.items()}
    print("servers ready: " + ", ".join(f"{n} (pid {s.proc.pid})"
                                        for n, s in setup.servers.items()), flush=True)
    runs: list[dict] = out["runs"]
    total = args.repeat * len(args.workloads) * len(args.server_list)
    for rep in range(args.repeat):
        for key in args.workloads:
            w = WORKLOADS[key]
            order = args.server_list[rep % len(args.server_list):] + \
                args.server_list[:rep % len(args.server_list)]
            for name in order:
                r = run_pair(args, setup, name, w, rep, out)
                r["round"] = rep
                runs.append(r)
                print(f"  [{len(runs):>3}/{total}] round {rep + 1} {w.key} {w.name:<9} "
                      f"{name:<16} {r['iops']:>10,.0f} IOPS {r['mbps']:>8,.1f} MB/s  "
                      f"server CPU {r['server_cpu']:.2f}"
                      + (f", breqd {r['breqd_cpu']:.2f}, {r['breqd_marks'] / r['ios_all']:.2f} "
                         "marks/IO" if name == "bmig-nbd" else ""),
                      flush=True)
    for name, s in list(setup.servers.items()):
        out.setdefault("exit_codes", {})[name] = s.proc.stop()
    if setup.breqd is not None:
        out.setdefault("exit_codes", {})["breqd"] = setup.breqd.stop()


def run_pair(args, setup: Setup, name: str, w: Workload, rep: int, out: dict) -> dict:
    """One run; a server (or breqd) found dead is restarted and the run retried, a few
    times per run: other people's tests on a shared machine kill processes by name."""
    for attempt in range(MAX_RESTARTS + 1):
        revive(setup, name, out)
        try:
            return run_once(setup, setup.servers[name], w, args.runtime, args.ramp,
                            f"{rep}-{w.name}-{name}-{attempt}", args.clear_bitmap)
        except ServerDied as exc:
            if attempt == MAX_RESTARTS:
                raise RuntimeError(str(exc)) from None
            print(f"  warning: {exc}; restarting it and running again", flush=True)
    raise AssertionError("unreachable")


def revive(setup: Setup, name: str, out: dict) -> None:
    """Restart breqd or the server if it exited since the last run (it is logged in the
    results' "restarts")."""
    dead = []
    if setup.breqd is not None and not setup.breqd.alive():
        dead.append(("breqd", setup.breqd.proc.returncode))
        setup.breqd.stop()
        setup.breqd = start_breqd(setup)
    server = setup.servers[name]
    if not server.proc.alive():
        dead.append((name, server.proc.proc.returncode))
        server.proc.stop()
        setup.servers[name] = start_server(setup, name)
    for label, code in dead:
        # a restarted bmig daemon imports the working tree as it is now: note which
        out.setdefault("restarts", []).append({"process": label, "exit_code": code,
                                               "before": name,
                                               "bmig_source_sha256": source_digest()})
        print(f"  warning: {label} had exited with {code} (killed from outside?); "
              "restarted", flush=True)


def summarize(runs: list[dict]) -> list[dict]:
    pairs: dict[tuple[str, str], list[dict]] = {}
    for r in runs:
        pairs.setdefault((r["workload"], r["server"]), []).append(r)
    rows = []
    for (wk, name), rs in pairs.items():
        row = {"workload": wk, "server": name, "runs": len(rs)}
        for k in ("iops", "mbps", "clat_ms_p50", "clat_ms_p99", "server_cpu",
                  "server_us_per_io", "breqd_cpu", "breqd_us_per_io", "fio_cpu"):
            vals = [r[k] for r in rs]
            row[k] = statistics.median(vals)
            row[k + "_min"], row[k + "_max"] = min(vals), max(vals)
        if "breqd_marks" in rs[0]:
            row["breqd_marks"] = sum(r.get("breqd_marks", 0) for r in rs)
            row["breqd_flushes"] = sum(r.get("breqd_flushes", 0) for r in rs)
        rows.append(row)
    return rows


def ratios(summary: list[dict], runs: list[dict]) -> list[dict]:
    med = {(s["workload"], s["server"]): s for s in summary}
    out = []
    for title, wk, num, den, metric, need in TARGETS:
        row: dict = {"target": title, "workload": wk, "numerator": num, "denominator": den,
                     "metric": metric, "need": need, "ratio": None, "verdict": "n/a"}
        if (wk, num) in med and (wk, den) in med and med[(wk, den)][metric]:
            row["ratio"] = round(med[(wk, num)][metric] / med[(wk, den)][metric], 3)
            row["verdict"] = "PASS" if row["ratio"] >= need else "BELOW"
            by_round: dict[int, dict[str, float]] = {}
            for r in runs:
                if r["workload"] == wk and r["server"] in (num, den):
                    by_round.setdefault(r["round"], {})[r["server"]] = r[metric]
            per = [v[num] / v[den] for v in by_round.values() if num in v and v.get(den)]
            row["per_round"] = [round(x, 3) for x in per]
        out.append(row)
    return out


# -- report ----------------------------------------------------------------------------

def _fmt(v) -> str:
    if isinstance(v, int) and not isinstance(v, bool):
        return f"{v:,}"
    if isinstance(v, float):
        return f"{v:,.2f}" if abs(v) < 100 else f"{v:,.0f}"
    return "-" if v is None else str(v)


table = functools.partial(benchlib.table, fmt=_fmt, left=1)


def _span(lo: float, hi: float, digits: int = 0) -> str:
    return f"{lo:,.{digits}f}-{hi:,.{digits}f}"


def report(out: dict) -> str:
    parts = []
    for key in out["workloads"]:
        w = WORKLOADS[key]
        rows = [s for s in out["summary"] if s["workload"] == key]
        if not rows:
            continue
        jobs = out.get("jobs", 1)
        title = w.title + (f", {jobs} jobs (NBD connections)" if jobs > 1 else "")
        parts.append(f"\n{w.key}. {title} ({rows[0]['runs']} run(s) of {out['runtime']} s "
                     f"each after {out.get('ramp', 0)} s of ramp; medians, min-max over runs)")
        parts.append(table(
            ["server", "IOPS", "IOPS min-max", "MB/s", "MB/s min-max", "p50 ms", "p99 ms",
             "server CPU", "server us/IO", "breqd CPU", "breqd us/IO", "fio CPU"],
            [[s["server"], round(s["iops"]), _span(s["iops_min"], s["iops_max"]),
              round(s["mbps"]), _span(s["mbps_min"], s["mbps_max"]), s["clat_ms_p50"],
              s["clat_ms_p99"], s["server_cpu"], s["server_us_per_io"],
              s["breqd_cpu"] if s["server"] == "bmig-nbd" else None,
              s["breqd_us_per_io"] if s["server"] == "bmig-nbd" else None, s["fio_cpu"]]
             for s in rows]))
    parts.append("\ntargets (ratio of medians; per round: the ratio within each round)")
    parts.append(table(
        ["target", "ratio", "per round", "need", "verdict"],
        [[r["target"], r["ratio"],
          _span(min(r["per_round"]), max(r["per_round"]), 2) if r.get("per_round") else None,
          f">= {r['need']}", r["verdict"]] for r in out["ratios"]]))
    return "\n".join(parts)


# -- the hot-chunks case (--hot) ---------------------------------------------------------

HOT_LOGS = (0, None)       # activity_log_chunks: off, then breqd's default (None: unset)
HOT_SETTLE = 15.0          # seconds to wait for bmig-nbd's holds to go, or a lazy write


def start_breqd_with(setup: Setup, state: str, log_chunks: int | None) -> Proc:
    """breqd with its state in ``state`` (a real disk) and the given activity log."""
    conf = os.path.join(state, "breqd.toml")
    with open(conf, "w") as f:
        if log_chunks is not None:
            f.write(f"activity_log_chunks = {log_chunks}\n")
    p = Proc("breqd", [*benchlib.BREQD, "--config", conf,
                       "--state-dir", os.path.join(state, "breqd-state"),
                       "--config-dir", os.path.join(state, "devices.d"),
                       "--control", setup.control], os.path.join(state, "breqd.log"))
    start_notified(p, setup.tmp, child_env())
    with setup.tracker() as c:
        c.add_device(DEVICE, setup.size)
    return p


def _wait(what: str, done, timeout: float = HOT_SETTLE) -> None:
    deadline = time.monotonic() + timeout
    while not done():
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} did not happen in {timeout:.0f} s")
        time.sleep(0.05)


def _stats(setup: Setup) -> dict:
    with setup.tracker() as c:
        return c.stats(DEVICE)


def make_clean(setup: Setup) -> None:
    """What a sync does to breqd: check out every dirty chunk and commit it; then wait
    for the lazy write of the cleared bits."""
    flushes = int(_stats(setup)["flushes"])
    with setup.tracker() as c:
        while True:
            runs = c.checkout(DEVICE, 64 * MiB)
            if not runs:
                break
            c.commit(DEVICE, runs)
    _wait("the lazy write of committed chunks",
          lambda: int(_stats(setup)["flushes"]) > flushes)


def start_catch_up(setup: Setup, state: str, label: str) -> list[Proc]:
    """breceive on 127.0.0.1 (target on the backing's file system), a full `bmigrate
    sync` to it, then `bmigrate run`: the processes, to stop after the runs."""
    secret = os.path.join(state, "secret")
    with open(os.open(secret, os.O_WRONLY | os.O_CREAT, 0o600), "w") as f:
        f.write(os.urandom(32).hex() + "\n")
    target = os.path.join(os.path.dirname(setup.backing), f"bmig-bench-hot-target-{label}.img")
    PATHS.append(target)
    recv = Proc(f"breceive {label}", [*BRECEIVE, "--listen", "127.0.0.1:0", "--target",
                                      f"{DEVICE}={target}", "--secret-file", secret,
                                      "--state-dir", os.path.join(state, "receiver")],
                os.path.join(state, "breceive.log"))
    pattern = r"STATUS=listening on 127\.0\.0\.1:(\d+)"
    notes = start_notified(recv, setup.tmp, child_env(), pattern)
    url = f"tcp://127.0.0.1:{re.search(pattern, chr(10).join(notes)).group(1)}/{DEVICE}"
    env = child_env(BMIG_CONTROL=setup.control)
    common = [DEVICE, "--source", setup.backing, "--to", url, "--secret-file", secret]
    benchlib.run_bmigrate(env, "sync", *common, "--threshold", "0", timeout=600.0)
    run = Proc(f"bmigrate run {label}", [*benchlib.BMIGRATE, "run", *common, "--status-dir",
                                         os.path.join(state, "status")],
               os.path.join(state, "run.log"))
    start_notified(run, setup.tmp, env)
    return [run, recv]


def hot_fio(setup: Setup, server: Server, args, tag: str, runtime: int) -> dict:
    w = Workload("h", "hot", "4 KiB random write, iodepth 32", "randwrite", "4k", 32, "iops")
    out = os.path.join(setup.tmp, f"fio-{tag}.json")
    argv = fio_argv(server, w, runtime, 0, out) + [f"--size={args.working_set}"]
    fio = Proc(f"fio {tag}", argv, os.path.join(setup.tmp, f"fio-{tag}.log"))
    before = _stats(setup)
    bcpu0 = setup.breqd.cpu_seconds() if setup.breqd else 0.0
    spies = []
    if args.py_spy and tag.endswith("-0") and setup.breqd is not None:
        for who, proc in (("breqd", setup.breqd), ("bmig-nbd", server.proc)):
            path = os.path.join(args.py_spy, f"{tag}-{who}.txt")
            spies.append(Proc(f"py-spy {who}", [
                shutil.which("py-spy") or os.path.join(os.path.dirname(sys.executable),
                                                       "py-spy"), "record", "--idle", "--nonblocking", "--threads", "-r", "250",
                "-d", str(runtime), "-f", "raw", "-o", path, "-p", str(proc.pid)],
                path + ".log"))
        for spy in spies:
            spy.start()
    fio.start()
    try:
        fio.proc.wait(runtime + FIO_GRACE)
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"fio ({tag}) did not finish") from None
    fio.stop()
    for spy in spies:
        try:
            spy.proc.wait(runtime + 30)
        except subprocess.TimeoutExpired:
            pass
        spy.stop()
    after = _stats(setup)
    r = parse_fio(out, fio, w)
    if spies:
        r["py_spy"] = {spy.label: spy_summary(spy.log_path.removesuffix(".log"))
                       for spy in spies}
    r.update(breqd_cpu_s=round(setup.breqd.cpu_seconds() - bcpu0, 3) if setup.breqd else 0,
             breqd_marks=int(after["marks"]) - int(before["marks"]),
             breqd_flushes=int(after["flushes"]) - int(before["flushes"]))
    return r


def spy_summary(path: str) -> dict:
    """From py-spy's raw (collapsed) stacks, idle samples included: the samples of
    each thread, and of those the ones in the bitmap's fdatasync and in a wait for a
    reply from breqd."""
    found: dict = {"samples": {}, "fdatasync": 0, "tracker_wait": 0}
    try:
        with open(path) as f:
            for line in f:
                stack, _, count = line.rstrip().rpartition(" ")
                n = int(count)
                thread = stack.split(";", 1)[0]
                found["samples"][thread] = found["samples"].get(thread, 0) + n
                if "sync_staged" in stack:
                    found["fdatasync"] += n
                if "_acquire" in stack or "mark (bmig/tracker/write_path_client" in stack:
                    found["tracker_wait"] += n
    except (OSError, ValueError):
        pass
    return found


def run_hot(args, setup: Setup, out: dict) -> None:
    """Two sides at once, each a breqd (state on --disk-dir) and a bmig-nbd on the same
    backing file: one with the activity log off, one at its default. A warm-up write
    over the working set; then per round, the sides taking turns (the first rotating),
    (a) every chunk dirty (SET_ALL_DIRTY) and (b) every chunk committed clean, each after
    bmig-nbd let go of its holds, so every run starts as an application's write after a
    pause does; with --catch-up, (c) rounds under `bmigrate run` on both sides."""
    secs = fill_random(setup.backing, setup.size)
    print(f"backing file {setup.backing}: {setup.size / GiB:g} GiB in {secs:.1f} s; "
          f"working set {args.working_set / MiB:g} MiB; breqd state in {args.disk_dir} "
          f"({benchlib.fs_type(args.disk_dir)})", flush=True)
    sides: dict[str, tuple[Setup, Server, str]] = {}
    for log_chunks in HOT_LOGS:
        label = "off" if log_chunks == 0 else "default"
        tmp = os.path.join(setup.tmp, label)
        os.mkdir(tmp)
        side = Setup(tmp, setup.backing, setup.size)
        state = tempfile.mkdtemp(prefix="bmig-bench-hot-", dir=args.disk_dir)
        PATHS.append(state)
        side.breqd = start_breqd_with(side, state, log_chunks)
        server = start_server(side, "bmig-nbd")
        sides[label] = (side, server, state)
        hot_fio(side, server, args, f"warm-{label}", 2)

    def one(label: str, case: str, rep: int) -> None:
        side, server, _ = sides[label]
        _wait("bmig-nbd letting go of its holds",
              lambda: int(_stats(side)["held_bytes"]) == 0)
        if case == "dirty":
            with side.tracker() as c:
                c.set_all_dirty(DEVICE)
        elif case == "clean":
            make_clean(side)
        r = hot_fio(side, server, args, f"{label}-{case}-{rep}", args.runtime)
        r.update(log=label, case=case, round=rep)
        out["runs"].append(r)
        _print_hot(r)

    labels = list(sides)
    for rep in range(args.repeat):
        for label in labels[rep % 2:] + labels[:rep % 2]:
            for case in ("dirty", "clean"):
                one(label, case, rep)
    if args.catch_up:
        for label, (side, _, state) in sides.items():
            _wait("bmig-nbd letting go of its holds",
                  lambda: int(_stats(side)["held_bytes"]) == 0)
            PROCS.extend(start_catch_up(side, state, label))
        for rep in range(args.repeat):
            for label in labels[rep % 2:] + labels[:rep % 2]:
                one(label, "run", rep)
    for p in reversed(PROCS):
        p.stop()
    for side, server, _ in sides.values():
        server.proc.stop()
        if side.breqd is not None:
            side.breqd.stop()


PROCS: list[Proc] = []     # catch-up processes of the hot case, stopped at its end


def _print_hot(r: dict) -> None:
    print(f"  activity log {r['log']:<7} round {r['round'] + 1} {r['case']:<5} "
          f"{r['iops']:>10,.0f} IOPS  p99 {r['clat_ms_p99']:.2f} ms  "
          f"breqd {r['breqd_marks']:,} marks, {r['breqd_flushes']:,} "
          f"flushes, {r['breqd_cpu_s']:.2f} CPU-s", flush=True)


def hot_report(out: dict) -> str:
    rows, ratios_ = [], []
    for label in ("off", "default"):
        runs = [r for r in out["runs"] if r["log"] == label]
        cases = [c for c in ("dirty", "clean", "run") if any(r["case"] == c for r in runs)]
        med = {case: statistics.median(r["iops"] for r in runs if r["case"] == case)
               for case in cases}
        for case in cases:
            sel = [r for r in runs if r["case"] == case]
            rows.append([label, case, round(med[case]),
                         _span(min(r["iops"] for r in sel), max(r["iops"] for r in sel)),
                         statistics.median(r["clat_ms_p99"] for r in sel),
                         statistics.median(r["breqd_flushes"] for r in sel),
                         statistics.median(r["breqd_marks"] for r in sel)])
        for case in cases[1:]:
            per_round = [c["iops"] / d["iops"] for d in runs if d["case"] == "dirty"
                         for c in runs if c["case"] == case and c["round"] == d["round"]]
            ratio = round(med[case] / med["dirty"], 2)
            ratios_.append([f"activity log {label}: {case} / dirty IOPS", ratio,
                            _span(min(per_round), max(per_round), 2), ">= 0.8",
                            "PASS" if ratio >= 0.8 else "BELOW"])
            out.setdefault("hot_ratios", {})[f"{label} {case}"] = ratio
    return "\n".join([
        table(["activity log", "chunks", "IOPS", "min-max", "p99 ms", "flushes", "marks"],
              rows),
        table(["target", "ratio", "per round", "need", "verdict"], ratios_)])


# -- checks and options ----------------------------------------------------------------

def preflight(args) -> str | None:
    """A one-line reason the run cannot start, or None."""
    problem = fio_nbd_problem()
    if problem:
        return problem
    if "qemu-nbd" in args.server_list and shutil.which("qemu-nbd") is None:
        return "qemu-nbd is not installed (Debian: qemu-utils); or leave it out with --servers"
    if "nbdkit" in args.server_list:
        if shutil.which("nbdkit") is None or subprocess.run(
                ["nbdkit", "--dump-plugin", "file"], capture_output=True).returncode != 0:
            return "nbdkit with its file plugin is not installed; or leave it out with --servers"
    if not os.path.isdir(args.backing_dir) or not os.access(args.backing_dir, os.W_OK):
        return f"{args.backing_dir} is not a writable directory"
    st = os.statvfs(args.backing_dir)
    free = st.f_bavail * st.f_frsize
    if free < args.size + 64 * MiB:
        return (f"{args.backing_dir} has {free / MiB:,.0f} MiB free, the backing file needs "
                f"{args.size / MiB:,.0f} MiB (+64 MiB); free some or pass a smaller --size")
    return None


def _list(text: str, allowed, aliases: dict[str, str], what: str, p) -> list[str]:
    items = []
    for item in (s.strip() for s in text.split(",")):
        if not item:
            continue
        item = aliases.get(item, item)
        if item not in allowed:
            p.error(f"unknown {what} {item!r} (choose from {', '.join(allowed)})")
        if item not in items:
            items.append(item)
    if not items:
        p.error(f"no {what} chosen")
    return items


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="runtime 5 s, repeat 1, size 512 MiB (explicit options still win)")
    p.add_argument("--runtime", type=int, help="seconds per fio run [15]")
    p.add_argument("--repeat", type=int, help="runs per (server, workload) pair [3]")
    p.add_argument("--ramp", type=int, default=3,
                   help="seconds fio runs before it measures, so the figures are of the "
                        "steady state; 0 counts bmig-nbd's first mark of every chunk too "
                        "[3]")
    p.add_argument("--size", help="backing file size [2G]")
    p.add_argument("--only", default="a,b,c",
                   help="workloads: a/randwrite, b/seqwrite, c/randread [a,b,c]")
    p.add_argument("--servers", default=",".join(SERVERS),
                   help=f"servers to compare [{','.join(SERVERS)}]")
    p.add_argument("--jobs", type=int, default=1,
                   help="fio jobs per run, each on its own NBD connection at the "
                        "workload's iodepth, as a multi-conn client opens them (qemu-nbd "
                        "is started with -e JOBS); the figures are their sum [1]")
    p.add_argument("--clear-bitmap", action="store_true",
                   help="clear breqd's bitmap before each tracked run, so writes are "
                        "first-time marks that wait for an fdatasync (default: the new "
                        "device is all dirty and marks are answered from memory)")
    p.add_argument("--tmpdir", default="/tmp",
                   help="where the sockets, logs and breqd's state go [/tmp]")
    p.add_argument("--backing-dir", default="/dev/shm", help="where the backing file goes "
                   "[/dev/shm]")
    p.add_argument("--hot", action="store_true",
                   help="run the hot-chunks case instead: writes to chunks a sync made "
                        "clean vs to chunks already dirty, breqd's activity log off and "
                        "on (see bench/README.md); --size defaults to 1G, --runtime to 5")
    p.add_argument("--catch-up", action="store_true",
                   help="--hot: also run fio under `bmigrate run` to a local breceive")
    p.add_argument("--py-spy", metavar="DIR",
                   help="--hot: record breqd and bmig-nbd with py-spy (idle samples too) "
                        "during the first round's runs, raw stacks into DIR")
    p.add_argument("--working-set", default="256M",
                   help="--hot: the part of the export fio writes [256M]")
    p.add_argument("--disk-dir", default="/var/tmp",
                   help="--hot: where breqd's state goes; a real disk, not tmpfs [/var/tmp]")
    p.add_argument("--json", metavar="FILE",
                   help="write the results here [bench/results/nbd-YYYYmmdd-HHMMSS.json]")
    args = p.parse_args()
    args.runtime = args.runtime or (5 if args.quick or args.hot else 15)
    args.repeat = args.repeat or (1 if args.quick else 3)
    try:
        args.size = parse_size(args.size or ("1G" if args.hot else
                                             "512M" if args.quick else "2G"))
        args.working_set = min(parse_size(args.working_set), args.size)
    except Exception as exc:
        p.error(str(exc))
    if (args.runtime < 1 or args.repeat < 1 or args.ramp < 0 or args.size < MiB
            or args.size % (4 * KiB) or not 1 <= args.jobs <= 16):
        p.error("--runtime and --repeat must be positive, --jobs 1 to 16, --size at "
                "least 1M and a multiple of 4K")
    if args.hot and args.jobs != 1:
        p.error("--hot runs one fio job")
    args.workloads = [next(k for k, w in WORKLOADS.items() if item in (k, w.name))
                      for item in _list(args.only, [*WORKLOADS, *(w.name for w in
                                                                   WORKLOADS.values())],
                                        {}, "workload", p)]
    args.workloads = sorted(set(args.workloads))
    args.server_list = _list(args.servers, SERVERS, ALIASES, "server", p)
    if args.hot:
        args.server_list = ["bmig-nbd"]
    return args


def main() -> int:
    args = parse_args()
    problem = preflight(args)
    if problem:
        print(f"bench/nbd.py: {problem}", file=sys.stderr)
        return 2
    install_signal_handlers()
    stamp = time.strftime("%Y%m%d-%H%M%S")
    facts = provenance(fio=["fio", "--version"], qemu_nbd=["qemu-nbd", "--version"],
                       nbdkit=["nbdkit", "--version"])
    out: dict = {**facts, "quick": args.quick, "runtime": args.runtime, "ramp": args.ramp,
                 "repeat": args.repeat, "jobs": args.jobs,
                 "size": args.size, "workloads": args.workloads,
                 "servers": args.server_list, "clear_bitmap": args.clear_bitmap, "runs": []}
    print(f"NBD servers benchmark: {', '.join(args.server_list)}; workloads "
          f"{','.join(args.workloads)}; {args.repeat} x {args.runtime} s each; "
          + (f"{args.jobs} fio jobs (NBD connections) each; " if args.jobs > 1 else "")
          + f"{args.size / MiB:,.0f} MiB backing in {args.backing_dir}", flush=True)
    print(provenance_line(facts), flush=True)
    t0 = time.monotonic()
    try:
        tmp = tempfile.mkdtemp(prefix="bmig-bench-nbd-", dir=args.tmpdir)
        PATHS.append(tmp)
        if len(os.path.join(tmp, "bmig-nbd-notrack.sock")) > 100:
            raise RuntimeError(f"--tmpdir {args.tmpdir} is too long for Unix socket paths")
        backing = os.path.join(args.backing_dir, f"bmig-bench-nbd-{os.getpid()}.img")
        PATHS.append(backing)
        if args.hot:
            run_hot(args, Setup(tmp, backing, args.size), out)
        else:
            run_all(args, Setup(tmp, backing, args.size, jobs=args.jobs), out)
    except (KeyboardInterrupt, Stopped):
        print("\ninterrupted; cleaning up", file=sys.stderr)
        return 130
    except RuntimeError as exc:
        print(f"bench/nbd.py: {exc}", file=sys.stderr)
        return 1
    finally:
        cleanup()
    out["total_seconds"] = round(time.monotonic() - t0, 1)
    changed = provenance_end(out)
    if args.hot:
        print(hot_report(out))
    else:
        out["summary"] = summarize(out["runs"])
        out["ratios"] = ratios(out["summary"], out["runs"])
        print(report(out))
    print(f"\ntotal {out['total_seconds']} s; load average before {out['loadavg_before']}, "
          f"after {out['loadavg_after']} (fio, the server and breqd share {out['cpus']} "
          f"CPUs; other processes skew the figures)")
    if changed:
        print(changed, file=sys.stderr)
    path = args.json or os.path.join(HERE, "results", f"nbd-{stamp}.json")
    save_json(path, out)
    print(f"results: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
