#!/usr/bin/env python3
"""bmigrate cutover under a live write load, and what synchronous replication costs a write.

    .venv/bin/python bench/cutover.py                  # both sections (~11 min)
    .venv/bin/python bench/cutover.py --quick          # 1 GiB, 2 cutovers, 5 s fio runs (~3 min)
    .venv/bin/python bench/cutover.py --only downtime --repeat 9 --dir /srv/scratch
    .venv/bin/python bench/cutover.py --only latency --runtime 30 --json /tmp/lat.json

Everything runs as a user would run it, each a subprocess in its own session: a real breqd,
bmig-nbd serving a backing file (ready on READY=1 to a private NOTIFY_SOCKET), breceive on
127.0.0.1:0 (its port from the STATUS= it sends with READY=1), `bmigrate track add`,
`bmigrate sync --json`, `bmigrate replicate` and `bmigrate cutover --freeze --json`; the
load is fio's nbd engine over bmig-nbd's Unix socket.

  downtime  a --size (4 GiB) device on the real disk (--dir; the source filled with random
            data, the target file written once with zeros), then per run: a new device in
            breqd, a new bmig-nbd and a new breceive (fresh state), a full sync, fio's
            random 4-64 KiB writes at half the shipping rate of the first run's full sync
            for --load-seconds, `bmigrate cutover --freeze` while the load runs, then
            source and target compared by hash once fio, breceive and bmig-nbd are gone.
            Target: median downtime <= 1 s.
  latency   a 1 GiB device on /dev/shm; fio 4 KiB random writes at iodepth 1 and 32 for
            --runtime s each, through bmig-nbd with tracking only and with `bmigrate
            replicate --protocol C|B|A` to a breceive whose target is on /dev/shm too;
            IOPS and completion latency (p50, p99, p99.9) per mode, and the ratios to
            tracking only. Before every run a `bmigrate sync --threshold 0` brings the
            target up to date and a hash of both files proves it identical.

At the end, also on Ctrl-C, SIGTERM, SIGHUP or an error, every process is stopped (its
process group) and every file and directory this script made is removed; nothing else is
touched.

One file over 500 lines on purpose: a benchmark is a script, read top to bottom
beside its figures in bench/README.md; what the scripts share is in benchlib.py.
"""

from __future__ import annotations

import argparse
import functools
import contextlib
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

import xxhash  # noqa: E402

import benchlib  # noqa: E402
from benchlib import (BMIGRATE, BRECEIVE, PATHS, child_env, cleanup, fs_type,  # noqa: E402
                      fio_nbd_problem, install_signal_handlers, provenance,
                      provenance_end, provenance_line, remove, run_bmigrate, save_json,
                      start_breqd, start_notified)
from bmig.config import parse_size  # noqa: E402
from bmig.processes import Stopped  # noqa: E402
from bmig.constants import GiB, KiB, MiB  # noqa: E402
from bmig.tracker.blocking_client import TrackerClient  # noqa: E402

BMIG_NBD = [sys.executable, "-c", "from bmig.cli.nbd import main; main()"]

CHUNK = 64 * KiB
FIO_GRACE = 120.0            # a fio run gets runtime + this before it is called hung
FIO_EXIT_WAIT = 30.0         # after the handover, fio should stop by itself (EPERM)
LOAD_BS = "4k-64k"           # the downtime load: random write sizes, 4 KiB multiples
LOAD_IODEPTH = 16
LOAD_RUNTIME = 3600          # fio's --runtime for the load; it ends at the handover
EPERM = 1
MODES = ("tracking", "tracking-dirty", "C", "B", "A")
BASELINES = ("tracking", "tracking-dirty")
PROTOCOL_MODES = ("C", "B", "A")
DEPTHS = (1, 32)
DOWNTIME_TARGET = 1.0        # seconds, median
STEP_KEYS = {"replicate synchronously": "replicate", "drain": "drain",
             "freeze writes": "freeze", "flush both sides": "flush", "hand over": "handover"}


# -- process bookkeeping ---------------------------------------------------------------

class Proc(benchlib.Proc):
    def start(self, env: dict[str, str] | None = None, pipe: bool = False,
              **kwargs) -> "Proc":
        """stdout and stderr to the log; with ``pipe`` stdout is a pipe to read."""
        super().start(env or child_env(), stdout=subprocess.PIPE if pipe else None, **kwargs)
        return self


# -- files -------------------------------------------------------------------------------

def write_file(path: str, size: int, random_data: bool) -> float:
    """``size`` bytes of random data (or zeros: every page written once), fsynced, so
    writeback does not disturb what follows; the seconds it took."""
    t = time.monotonic()
    zeros = bytes(16 * MiB)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        left = size
        while left:
            n = min(16 * MiB, left)
            os.write(fd, os.urandom(n) if random_data else zeros[:n])
            left -= n
        os.fsync(fd)
    finally:
        os.close(fd)
    return time.monotonic() - t


def _blocks(path: str, size: int, block: int = 8 * MiB):
    buf = bytearray(block)
    fd = os.open(path, os.O_RDONLY)
    try:
        pos = 0
        while pos < size:
            n = min(block, size - pos)
            view = memoryview(buf)[:n]
            got = os.preadv(fd, [view], pos)
            if got < n:                     # a short file reads as zeros past its end
                view[got:] = bytes(n - got)
            yield pos, view
            pos += n
    finally:
        os.close(fd)


def file_digest(path: str, size: int) -> str:
    h = xxhash.xxh3_128()
    for _, view in _blocks(path, size):
        h.update(view)
    return h.hexdigest()


def compare(src: str, dst: str, size: int) -> dict:
    """xxh3-128 of both files; when they differ, which 64 KiB chunks do."""
    t = time.monotonic()
    a, b = file_digest(src, size), file_digest(dst, size)
    r = {"identical": a == b, "source_xxh3_128": a, "target_xxh3_128": b}
    if a != b:
        differing = []
        for (pos, va), (_, vb) in zip(_blocks(src, size), _blocks(dst, size)):
            if va != vb:
                differing += [pos + i for i in range(0, len(va), CHUNK)
                              if va[i:i + CHUNK] != vb[i:i + CHUNK]]
        r.update(differing_chunks=len(differing), first_differing=differing[:8])
    r["seconds"] = round(time.monotonic() - t, 2)
    return r


# -- the bmig side -----------------------------------------------------------------------

@dataclass
class Receiver:
    proc: Proc
    port: int
    state: str

    def url(self, export: str) -> str:
        return f"tcp://127.0.0.1:{self.port}/{export}"


@dataclass
class Bench:
    args: argparse.Namespace
    tmp: str                  # sockets, logs, breqd's state, receivers' state, fio output
    breqd: Proc | None = None
    secret: str = ""

    def path(self, name: str) -> str:
        return os.path.join(self.tmp, name)

    @property
    def control(self) -> str:
        return self.path("breqd.sock")

    @property
    def manage(self) -> str:
        return self.path("manage")

    def env(self) -> dict[str, str]:
        return child_env(BMIG_CONTROL=self.control)

    def tracker(self) -> TrackerClient:
        return TrackerClient(self.control, timeout=60.0, client="bench-cutover")

    def stats(self, name: str) -> dict:
        with self.tracker() as c:
            return c.stats(name)

    def start_breqd(self) -> None:
        self.breqd = start_breqd(self.tmp, self.control)

    def bmigrate(self, *args: str, timeout: float = 120.0) -> str:
        """A short bmigrate command (track, replicate); its stdout."""
        return run_bmigrate(self.env(), *args, timeout=timeout)

    def start_nbd(self, name: str, backing: str) -> tuple[Proc, str]:
        """bmig-nbd serving ``backing`` as device and export ``name``; (proc, socket)."""
        sock = self.path(f"{name}.nbd.sock")
        p = Proc(f"bmig-nbd {name}",
                 [*BMIG_NBD, "--device", name, "--backing", backing, "--unix", sock,
                  "--control", self.control, "--manage-dir", self.manage],
                 self.path(f"bmig-nbd-{name}.log"))
        start_notified(p, self.tmp, child_env())
        return p, sock

    def start_receiver(self, label: str, export: str, target: str) -> Receiver:
        state = self.path(f"{label}-state")
        argv = [*BRECEIVE, "--listen", "127.0.0.1:0", "--target", f"{export}={target}",
                "--secret-file", self.secret, "--state-dir", state, "--log-level", "info"]
        pattern = r"STATUS=listening on 127\.0\.0\.1:(\d+)"
        p = Proc(label, argv, self.path(f"{label}.log"))
        notes = start_notified(p, self.tmp, child_env(), pattern)
        return Receiver(p, int(re.search(pattern, "\n".join(notes)).group(1)), state)

    def sync(self, name: str, source: str, url: str, size: int) -> dict:
        """``bmigrate sync --threshold 0 --json``: its summary (the last JSON line) and the
        wall time of the command."""
        t0 = time.monotonic()
        out = self.bmigrate("sync", name, "--source", source, "--to", url, "--secret-file",
                            self.secret, "--threshold", "0", "--json",
                            timeout=120.0 + size / (10 * MiB))
        wall = time.monotonic() - t0
        summary = next((e for e in map(_json_line, reversed(out.splitlines()))
                        if e and e.get("event") == "summary"), None)
        if summary is None or not summary.get("converged") or summary.get("dirty_bytes"):
            raise RuntimeError(f"bmigrate sync {name} did not converge: {summary}")
        summary["wall_seconds"] = round(wall, 3)
        return summary

    def replicate(self, name: str, *args: str) -> dict:
        return json.loads(self.bmigrate("replicate", name, "--manage-dir", self.manage,
                                        *args, "--json"))


def _json_line(line: str) -> dict | None:
    try:
        v = json.loads(line)
    except ValueError:
        return None
    return v if isinstance(v, dict) else None


def write_secret(path: str) -> str:
    with open(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as f:
        f.write(os.urandom(32).hex() + "\n")
    return path


# -- fio -----------------------------------------------------------------------------------

def fio_argv(name: str, sock: str, out: str, *opts: str) -> list[str]:
    return ["fio", f"--name={name}", "--ioengine=nbd", f"--uri=nbd+unix:///{name}?socket={sock}",
            "--rw=randwrite", "--numjobs=1", "--time_based", "--norandommap",
            "--randrepeat=0", "--output-format=json", f"--output={out}", *opts]


def read_fio(path: str, fio: Proc) -> dict:
    """fio's job (the one job), even when it failed."""
    try:
        with open(path, errors="replace") as f:
            text = f.read()
        return json.loads(text[text.index("{"):])["jobs"][0]   # warnings may come first
    except (OSError, ValueError, KeyError, IndexError):
        raise RuntimeError(f"{fio.label} exited with {fio.proc.returncode} and no result:\n"
                           f"{fio.log_tail()}") from None


def write_side(job: dict, jobs: int = 1) -> dict:
    """fio's write figures; with several jobs (--group_reporting) fio sums the I/O and
    gives the CPU as one job's average, so that is multiplied back."""
    w = job["write"]
    pct = w.get("clat_ns", {}).get("percentile", {})
    ms = lambda ns: round(ns / 1e6, 4)  # noqa: E731
    return {"iops": round(w["iops"], 1), "mbps": round(w["bw_bytes"] / 1e6, 1),
            "ios": int(w["total_ios"]), "bytes": int(w["io_bytes"]),
            "runtime_ms": int(w["runtime"]),
            "clat_ms_mean": ms(w["clat_ns"]["mean"]), "clat_ms_max": ms(w["clat_ns"]["max"]),
            "clat_ms_p50": ms(pct.get("50.000000", 0)), "clat_ms_p99": ms(pct.get("99.000000", 0)),
            "clat_ms_p999": ms(pct.get("99.900000", 0)),
            "fio_cpu": round((job["usr_cpu"] + job["sys_cpu"]) / 100 * jobs, 3),
            "error": int(job.get("error", 0))}


def read_clat_log(path: str) -> list[tuple[float, int, int]]:
    """fio's per-I/O completion log (--log_unix_epoch): (epoch seconds, clat ns, bytes)."""
    rows = []
    with contextlib.suppress(OSError), open(path) as f:
        for line in f:
            parts = line.split(",")
            if len(parts) >= 4:
                rows.append((int(parts[0]) / 1000.0, int(parts[1]), int(parts[3])))
    return rows


def phase(rows: list[tuple[float, int, int]], start: float, end: float) -> dict:
    """Writes fio saw complete in [start, end): MB/s, count, p99 latency."""
    inside = [r for r in rows if start <= r[0] < end]
    seconds = max(end - start, 1e-9)
    lat = sorted(r[1] for r in inside)
    return {"seconds": round(end - start, 3), "writes": len(inside),
            "mbps": round(sum(r[2] for r in inside) / seconds / 1e6, 1),
            "clat_ms_p99": round(lat[min(len(lat) - 1, int(len(lat) * 0.99))] / 1e6, 3)
            if lat else None}


# -- downtime ------------------------------------------------------------------------------

def downtime(b: Bench, out: dict) -> None:
    args = b.args
    size = args.size
    d = tempfile.mkdtemp(prefix="bmig-bench-cutover-", dir=args.dir_root)
    PATHS.append(d)
    src, dst = os.path.join(d, "source.img"), os.path.join(d, "target.img")
    sec = out["downtime"] = {"dir": d, "fs": fs_type(d), "size": size,
                             "load_seconds": args.load_seconds, "load_bs": LOAD_BS,
                             "load_iodepth": LOAD_IODEPTH, "runs": []}
    print(f"\ndowntime: {size / GiB:g} GiB device in {d} ({sec['fs']}), {args.repeat} "
          f"cutover(s) under load", flush=True)
    fill = write_file(src, size, True)
    zero = write_file(dst, size, False)
    sec.update(fill_seconds=round(fill, 1), prefill_seconds=round(zero, 1))
    print(f"  source: random data in {fill:.1f} s; target written with zeros once in "
          f"{zero:.1f} s", flush=True)
    for k in range(1, args.repeat + 1):
        r = downtime_run(b, k, src, dst, sec)
        sec["runs"].append(r)
        if r.get("ok"):
            st = r["steps"]
            print(f"  [{k}/{args.repeat}] downtime {r['downtime_s']:.3f} s (freeze "
                  f"{st.get('freeze', 0):.3f}, flush {st.get('flush', 0):.3f}, hand over "
                  f"{st.get('handover', 0):.3f}); cutover {r['cutover_wall_s']:.2f} s, drain "
                  f"{st.get('drain', 0):.2f} s in {r['drain_passes']} pass(es); "
                  f"{r['dirty_at_start_mib']:,.0f} MiB dirty at the start; load "
                  f"{r['phases']['tracking']['mbps']:,.0f} MB/s before, "
                  f"{r['phases']['drain']['mbps']:,.0f} during the drain; identical: "
                  f"{r['compare']['identical']}", flush=True)
        else:
            print(f"  [{k}/{args.repeat}] FAILED: {r.get('error')}", flush=True)
    sec["summary"] = summarize_downtime(sec["runs"])


def downtime_run(b: Bench, k: int, src: str, dst: str, sec: dict) -> dict:
    """One independent cutover: a new device name in breqd (all dirty), a new bmig-nbd, a
    new breceive with fresh state, a full sync, the load, the cutover, the comparison."""
    args = b.args
    name = f"cut{k}"
    r: dict = {"run": k, "device": name, "ok": False}
    b.bmigrate("track", "add", name, "--size-of", src)
    nbd, sock = b.start_nbd(name, src)
    recv = b.start_receiver(f"breceive-{name}", name, dst)
    url = recv.url(name)
    records = b.path(f"records-{name}")
    fio_out, lat_prefix = b.path(f"fio-{name}.json"), b.path(f"fio-{name}")
    fio = None
    try:
        s = b.sync(name, src, url, args.size)
        rate = s["bytes_sent"] / s["seconds"]
        r["sync"] = {k2: s.get(k2) for k2 in ("bytes_read", "bytes_sent", "seconds",
                                              "wall_seconds", "passes")}
        r["sync_mbps"] = round(rate / 1e6, 1)
        if "load_rate" not in sec:
            sec["load_rate"] = int(rate / 2)
            sec["load_rate_from"] = ("half of bytes_sent / seconds of run 1's full sync "
                                     f"({rate / 1e6:,.0f} MB/s)")
            print(f"  run 1's full sync: {s['bytes_sent'] / GiB:.2f} GiB sent in "
                  f"{s['seconds']:.2f} s = {rate / 1e6:,.0f} MB/s; the load writes at most "
                  f"{rate / 2e6:,.0f} MB/s", flush=True)
        fio = Proc(f"fio {name}", fio_argv(
            name, sock, fio_out, f"--bsrange={LOAD_BS}", f"--iodepth={LOAD_IODEPTH}",
            f"--runtime={LOAD_RUNTIME}", f"--rate={sec['load_rate']}",
            f"--write_lat_log={lat_prefix}", "--log_unix_epoch=1"),
            b.path(f"fio-{name}.log")).start()
        deadline = time.monotonic() + args.load_seconds
        while time.monotonic() < deadline:
            if not fio.alive():
                raise RuntimeError(f"fio exited with {fio.proc.returncode} before the "
                                   f"cutover:\n{fio.log_tail()}")
            time.sleep(0.05)
        st0 = b.stats(name)
        r["dirty_at_start_mib"] = round(st0["dirty_bytes"] / MiB, 1)
        r["held_at_start_mib"] = round(st0["held_bytes"] / MiB, 1)
        cut = run_cutover(b, name, src, url, records)
        r.update(cut)
        # fio stops by itself at its first write after the handover (EPERM)
        try:
            fio.proc.wait(FIO_EXIT_WAIT)
            r["fio_stopped"] = "by itself"
        except subprocess.TimeoutExpired:
            r["fio_stopped"] = f"SIGTERM after {FIO_EXIT_WAIT:.0f} s"
        fio.stop()
        job = read_fio(fio_out, fio)
        r["fio"] = write_side(job)
        r["fio_exit"] = fio.proc.returncode
        # nothing may write either file while they are compared
        r["breceive_exit"] = recv.proc.stop()
        r["bmig_nbd_exit"] = nbd.stop()
        r["compare"] = compare(src, dst, args.size)
        rows = read_clat_log(f"{lat_prefix}_clat.1.log")
        ev = r.pop("event_times")
        if cut["rc"] == 0 and rows and all(k in ev for k in ("replicate", "drain",
                                                              "handover")):
            r["phases"] = {
                "tracking": phase(rows, rows[0][0], ev["replicate"][0]),
                "drain": phase(rows, ev["drain"][0], ev["drain"][1]),
                "downtime": phase(rows, ev["drain"][1], ev["handover"][1]),
            }
            last_ok = max(t for t, _, _ in rows)
            r["stall_s"] = round(ev["handover"][1] - last_ok, 3)
        problems = []
        if cut["rc"] != 0 or not cut.get("handed_over"):
            problems.append(f"bmigrate cutover exited with {cut['rc']}: {cut.get('stderr')}")
        if not r["compare"]["identical"]:
            problems.append(f"target differs from source: {r['compare']}")
        if r["fio"]["error"] not in (0, EPERM):
            problems.append(f"fio stopped with errno {r['fio']['error']}, not EPERM:\n"
                            f"{fio.log_tail(5)}")
        r["ok"] = not problems
        if problems:
            r["error"] = "; ".join(problems)
        return r
    finally:
        if fio is not None:
            fio.stop()
        recv.proc.stop()
        nbd.stop()
        for path in (recv.state, records, fio_out, *(f"{lat_prefix}_{kind}.1.log"
                                                      for kind in ("lat", "slat", "clat"))):
            remove(path)
        with contextlib.suppress(RuntimeError, subprocess.SubprocessError):
            b.bmigrate("track", "remove", name)


def run_cutover(b: Bench, name: str, src: str, url: str, records: str) -> dict:
    """``bmigrate cutover --freeze --json``; every JSON line timestamped as it comes (epoch
    seconds, to match fio's log)."""
    argv = [*BMIGRATE, "cutover", name, "--source", src, "--to", url, "--secret-file",
            b.secret, "--manage-dir", b.manage, "--freeze", "--json",
            "--record-dir", records]
    p = Proc(f"bmigrate cutover {name}", argv, b.path(f"cutover-{name}.log"))
    lines: list[tuple[float, str]] = []

    def reader() -> None:
        assert p.proc is not None and p.proc.stdout is not None
        for raw in p.proc.stdout:
            lines.append((time.time(), raw.decode(errors="replace")))

    t_wall0, t0 = time.time(), time.monotonic()
    p.start(b.env(), pipe=True)
    thread = threading.Thread(target=reader, daemon=True)
    thread.start()
    try:
        p.proc.wait(600 + 120)
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"bmigrate cutover {name} did not finish:\n{p.log_tail()}") \
            from None
    wall = time.monotonic() - t0
    thread.join(10)
    rc = p.proc.returncode
    p.stop()
    events = [(t, e) for t, e in ((t, _json_line(text)) for t, text in lines) if e]
    final = next((e for _, e in reversed(events) if e.get("event") == "cutover"), {})
    times: dict[str, list[float]] = {}
    for t, e in events:
        if e.get("event") == "step":
            key = STEP_KEYS.get(e.get("name"), e.get("name"))
            times.setdefault(key, [t, t])[0 if e.get("status") == "started" else 1] = t
    r = {"rc": rc, "cutover_wall_s": round(wall, 3), "started_at": t_wall0,
         "handed_over": bool(final.get("handed_over")), "downtime_s": final.get("downtime_seconds"),
         "steps": {STEP_KEYS.get(s["name"], s["name"]): s["seconds"]
                   for s in final.get("steps", [])},
         "step_details": final.get("steps", []), "event_times": times,
         "drain_passes": next((s.get("passes") for s in final.get("steps", [])
                               if s["name"] == "drain"), None)}
    if final.get("steps"):
        r["steps_total_s"] = round(sum(s["seconds"] for s in final["steps"]), 3)
    if rc != 0:
        r["stderr"] = p.log_tail(8).strip()
    if rc == 0:
        remove(p.log_path)
    return r


def _stat(values: list[float]) -> dict | None:
    if not values:
        return None
    return {"median": round(statistics.median(values), 3), "min": round(min(values), 3),
            "max": round(max(values), 3)}


def summarize_downtime(runs: list[dict]) -> dict:
    ok = [r for r in runs if r.get("ok")]
    s: dict = {"runs": len(runs), "ok": len(ok), "failed": len(runs) - len(ok),
               "downtime_s": _stat([r["downtime_s"] for r in ok]),
               "cutover_wall_s": _stat([r["cutover_wall_s"] for r in ok]),
               "steps_total_s": _stat([r["steps_total_s"] for r in ok if "steps_total_s" in r]),
               "stall_s": _stat([r["stall_s"] for r in ok if "stall_s" in r]),
               "dirty_at_start_mib": _stat([r["dirty_at_start_mib"] for r in ok]),
               "sync_mbps": _stat([r["sync_mbps"] for r in runs if "sync_mbps" in r]),
               "identical": sum(1 for r in runs if r.get("compare", {}).get("identical"))}
    for key in ("replicate", "drain", "freeze", "flush", "handover"):
        s[key + "_s"] = _stat([r["steps"][key] for r in ok if key in r["steps"]])
    for ph in ("tracking", "drain"):
        s[f"load_{ph}_mbps"] = _stat([r["phases"][ph]["mbps"] for r in ok if "phases" in r])
    med = (s["downtime_s"] or {}).get("median")
    s["target"] = {"need": f"median downtime <= {DOWNTIME_TARGET:g} s", "median": med,
                   "verdict": "n/a" if med is None else
                   "PASS" if med <= DOWNTIME_TARGET else "BELOW"}
    return s


# -- latency --------------------------------------------------------------------------------

def latency(b: Bench, out: dict) -> None:
    args = b.args
    size = args.latency_size
    d = tempfile.mkdtemp(prefix="bmig-bench-cutover-", dir=args.shm)
    PATHS.append(d)
    src, dst = os.path.join(d, "source.img"), os.path.join(d, "target.img")
    sec = out["latency"] = {"dir": d, "fs": fs_type(d), "size": size,
                            "runtime": args.runtime, "rounds": args.rounds,
                            "jobs": args.jobs, "runs": [],
                            "checks": []}
    print(f"\nlatency: {size / GiB:g} GiB device in {d} ({sec['fs']}); modes "
          f"{', '.join(args.modes)}; iodepth {', '.join(map(str, args.depths))}"
          + (f" x {args.jobs} fio jobs (NBD connections)" if args.jobs > 1 else "")
          + f"; {args.rounds} "
          f"round(s) of {args.runtime} s runs", flush=True)
    write_file(src, size, True)
    write_file(dst, size, False)
    name = "lat"
    b.bmigrate("track", "add", name, "--size-of", src)
    nbd, sock = b.start_nbd(name, src)
    recv = b.start_receiver("breceive-lat", name, dst)
    url = recv.url(name)
    lat = Latency(b, name, src, dst, size, sock, url, nbd, recv, sec)
    modes = args.modes
    total = args.rounds * len(args.depths) * len(modes)
    for rnd in range(args.rounds):
        for depth in args.depths:
            order = list(modes[rnd % len(modes):] + modes[:rnd % len(modes)])
            for mode in order:
                r = lat.run(mode, depth, rnd)
                sec["runs"].append(r)
                print(f"  [{len(sec['runs']):>2}/{total}] round {rnd + 1} qd{depth:<2} "
                      f"{mode:<14} {r['iops']:>9,.0f} IOPS  p50 {r['clat_ms_p50']:.3f}  p99 "
                      f"{r['clat_ms_p99']:.3f}  p99.9 {r['clat_ms_p999']:.3f} ms; "
                      f"{r['marks_per_write']:.2f} marks/write; bmig-nbd CPU "
                      f"{r['nbd_cpu']:.2f}, breqd {r['breqd_cpu']:.2f}, breceive "
                      f"{r['breceive_cpu']:.2f}", flush=True)
    lat.reset("final")
    sec["summary"] = summarize_latency(sec["runs"])
    sec["ratios"] = latency_ratios(sec["summary"], sec["runs"])
    for p in (nbd, recv.proc):
        if not p.alive():
            raise RuntimeError(f"{p.label} exited with {p.proc.returncode}:\n{p.log_tail()}")


@dataclass
class Latency:
    b: Bench
    name: str
    src: str
    dst: str
    size: int
    sock: str
    url: str
    nbd: Proc
    recv: Receiver
    sec: dict
    n: int = 0

    def reset(self, before: str) -> None:
        """Ship what is dirty and prove the target identical: every run starts from an
        up-to-date copy with nothing dirty, whatever ran before it."""
        s = self.b.sync(self.name, self.src, self.url, self.size)
        c = compare(self.src, self.dst, self.size)
        self.sec["checks"].append({"before": before, "synced_bytes": s["bytes_read"],
                                   "sync_seconds": s["wall_seconds"], **c})
        if not c["identical"]:
            raise RuntimeError(f"latency: the target differs from the source after the sync "
                               f"before {before}: {c}")

    def run(self, mode: str, depth: int, rnd: int) -> dict:
        b, args = self.b, self.b.args
        self.n += 1
        tag = f"{self.n}-{mode}-qd{depth}"
        self.reset(tag)
        for p in (self.nbd, self.recv.proc, b.breqd):
            if not p.alive():
                raise RuntimeError(f"{p.label} exited with {p.proc.returncode}:\n"
                                   f"{p.log_tail()}")
        if mode == "tracking-dirty":
            b.bmigrate("track", "set-dirty", self.name)
        elif mode in PROTOCOL_MODES:
            status = b.replicate(self.name, "--to", self.url, "--secret-file", b.secret,
                                 "--protocol", mode)
            if not status.get("replicating") or status.get("protocol") != mode:
                raise RuntimeError(f"bmigrate replicate --protocol {mode}: {status}")
        out = b.path(f"fio-{tag}.json")
        jobs = ([f"--numjobs={args.jobs}", "--group_reporting"] if args.jobs > 1 else [])
        fio = Proc(f"fio {tag}", fio_argv(self.name, self.sock, out, "--bs=4k",
                                          f"--iodepth={depth}", f"--runtime={args.runtime}",
                                          *jobs),
                   b.path(f"fio-{tag}.log"))
        procs = {"nbd": self.nbd, "breqd": b.breqd, "breceive": self.recv.proc}
        marks0 = b.stats(self.name)["marks"]
        cpu0 = {k: p.cpu_seconds() for k, p in procs.items()}
        t0 = time.monotonic()
        fio.start()
        try:
            fio.proc.wait(args.runtime + FIO_GRACE)
        except subprocess.TimeoutExpired:
            raise RuntimeError(f"fio {tag} did not finish; bmig-nbd log:\n"
                               f"{self.nbd.log_tail()}") from None
        wall = time.monotonic() - t0
        cpu = {k: p.cpu_seconds() - cpu0[k] for k, p in procs.items()}
        marks = b.stats(self.name)["marks"] - marks0
        fio.stop()
        job = read_fio(out, fio)
        r = {"mode": mode, "iodepth": depth, "round": rnd, **write_side(job, args.jobs),
             "wall_s": round(wall, 3)}
        remove(out)
        remove(fio.log_path)
        if r["error"] or fio.proc.returncode:
            raise RuntimeError(f"fio {tag} failed (exit {fio.proc.returncode}, errno "
                               f"{r['error']}):\n{fio.log_tail()}")
        if mode in PROTOCOL_MODES:
            status = b.replicate(self.name, "--status")
            if not status.get("replicating") or status.get("failed"):
                raise RuntimeError(f"replication ({mode}) did not last the run: {status}")
            b.replicate(self.name, "--stop")
        ios = r["ios"] or 1
        r.update(marks_per_write=round(marks / ios, 3),
                 **{f"{k}_cpu": round(v / wall, 3) for k, v in cpu.items()},
                 **{f"{k}_us_per_write": round(v * 1e6 / ios, 1) for k, v in cpu.items()})
        return r


LAT_KEYS = ("iops", "clat_ms_p50", "clat_ms_p99", "clat_ms_p999", "clat_ms_mean",
            "marks_per_write", "nbd_cpu", "breqd_cpu", "breceive_cpu", "fio_cpu",
            "nbd_us_per_write", "breqd_us_per_write", "breceive_us_per_write")


def summarize_latency(runs: list[dict]) -> list[dict]:
    rows = []
    for depth in sorted({r["iodepth"] for r in runs}):
        for mode in MODES:
            rs = [r for r in runs if r["mode"] == mode and r["iodepth"] == depth]
            if not rs:
                continue
            row = {"mode": mode, "iodepth": depth, "runs": len(rs)}
            for k in LAT_KEYS:
                vals = [r[k] for r in rs]
                row[k] = statistics.median(vals)
                row[k + "_min"], row[k + "_max"] = min(vals), max(vals)
            rows.append(row)
    return rows


def latency_ratios(summary: list[dict], runs: list[dict]) -> list[dict]:
    """Each protocol against each tracking-only baseline at the same depth: the ratio of
    the medians, and the range of the ratio within each round."""
    med = {(s["mode"], s["iodepth"]): s for s in summary}
    out = []
    for baseline in BASELINES:
        for depth in sorted({r["iodepth"] for r in runs}):
            base = med.get((baseline, depth))
            for mode in PROTOCOL_MODES:
                row = med.get((mode, depth))
                if base is None or row is None:
                    continue
                entry: dict = {"mode": mode, "iodepth": depth, "baseline": baseline}
                for k in ("iops", "clat_ms_p50", "clat_ms_p99", "clat_ms_p999"):
                    entry[k] = round(row[k] / base[k], 3) if base[k] else None
                    per = []
                    for rnd in sorted({r["round"] for r in runs}):
                        a = [r[k] for r in runs if r["round"] == rnd and r["iodepth"] == depth
                             and r["mode"] == mode]
                        t = [r[k] for r in runs if r["round"] == rnd and r["iodepth"] == depth
                             and r["mode"] == baseline]
                        if a and t and t[0]:
                            per.append(a[0] / t[0])
                    entry[k + "_per_round"] = [round(x, 3) for x in per]
                out.append(entry)
    return out


# -- report ------------------------------------------------------------------------------

def _fmt(v) -> str:
    if isinstance(v, bool):
        return "yes" if v else "NO"
    if isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, float):
        return f"{v:,.3f}" if abs(v) < 10 else f"{v:,.1f}" if abs(v) < 100 else f"{v:,.0f}"
    return "-" if v is None else str(v)


table = functools.partial(benchlib.table, fmt=_fmt, left=1)


def _mmm(s: dict | None, digits: int = 3) -> list:
    if not s:
        return [None, None, None]
    return [round(s["median"], digits), round(s["min"], digits), round(s["max"], digits)]


def _span(lo: float, hi: float, digits: int = 2) -> str:
    return f"{lo:,.{digits}f}-{hi:,.{digits}f}"


def report(out: dict) -> str:
    parts = []
    sec = out.get("downtime")
    if sec and sec.get("runs"):
        s = sec.get("summary") or summarize_downtime(sec["runs"])
        parts.append(f"\ndowntime: {sec['size'] / GiB:g} GiB on {sec['fs']}; load "
                     f"{LOAD_BS} random writes, iodepth {LOAD_IODEPTH}, at most "
                     f"{sec.get('load_rate', 0) / 1e6:,.0f} MB/s ({sec.get('load_rate_from')}), "
                     f"{sec['load_seconds']:g} s before each cutover")
        parts.append(table(
            ["run", "sync MB/s", "dirty MiB", "drain s", "passes", "freeze s", "flush s",
             "hand over s", "downtime s", "cutover s", "stall s", "load MB/s", "in drain",
             "identical"],
            [[r["run"], r.get("sync_mbps"), r.get("dirty_at_start_mib"),
              r.get("steps", {}).get("drain"), r.get("drain_passes"),
              r.get("steps", {}).get("freeze"), r.get("steps", {}).get("flush"),
              r.get("steps", {}).get("handover"), r.get("downtime_s"),
              r.get("cutover_wall_s"), r.get("stall_s"),
              r.get("phases", {}).get("tracking", {}).get("mbps"),
              r.get("phases", {}).get("drain", {}).get("mbps"),
              r.get("compare", {}).get("identical")] for r in sec["runs"]]))
        parts.append(f"\n{s['ok']} of {s['runs']} cutover(s) succeeded; target identical to "
                     f"source after {s['identical']} (median, min, max over the good runs)")
        rows = [["downtime (bmigrate's downtime_seconds)", *_mmm(s["downtime_s"])],
                ["cutover total (bmigrate cutover, start to exit)", *_mmm(s["cutover_wall_s"])],
                ["  sum of its steps", *_mmm(s["steps_total_s"])],
                ["  1 replicate synchronously", *_mmm(s["replicate_s"])],
                ["  2 drain", *_mmm(s["drain_s"])],
                ["  3 freeze writes", *_mmm(s["freeze_s"])],
                ["  4 flush both sides", *_mmm(s["flush_s"])],
                ["  6 hand over", *_mmm(s["handover_s"])],
                ["fio: last completed write -> handover done", *_mmm(s["stall_s"])],
                ["dirty at the cutover's start, MiB", *_mmm(s["dirty_at_start_mib"], 0)],
                ["load before the cutover, MB/s", *_mmm(s["load_tracking_mbps"], 0)],
                ["load during the drain (protocol C), MB/s", *_mmm(s["load_drain_mbps"], 0)]]
        parts.append(table(["seconds", "median", "min", "max"], rows))
        t = s["target"]
        parts.append(f"target: {t['need']}: {_fmt(t['median'])} s, {t['verdict']}")
    sec = out.get("latency")
    if sec and sec.get("runs"):
        summary = sec.get("summary") or summarize_latency(sec["runs"])
        parts.append(f"\nlatency: 4 KiB random writes, {sec['size'] / GiB:g} GiB on "
                     f"{sec['fs']}, {sec['rounds']} round(s) of {sec['runtime']} s per mode "
                     "(medians; min-max over rounds)")
        parts.append(table(
            ["mode", "qd", "IOPS", "min-max", "p50 ms", "p99 ms", "p99.9 ms", "marks/write",
             "bmig-nbd CPU", "breqd CPU", "breceive CPU", "fio CPU", "bmig-nbd us/w",
             "breqd us/w", "breceive us/w"],
            [[s["mode"], s["iodepth"], round(s["iops"]), _span(s["iops_min"], s["iops_max"], 0),
              s["clat_ms_p50"], s["clat_ms_p99"], s["clat_ms_p999"], s["marks_per_write"],
              s["nbd_cpu"], s["breqd_cpu"], s["breceive_cpu"], s["fio_cpu"],
              s["nbd_us_per_write"], s["breqd_us_per_write"], s["breceive_us_per_write"]]
             for s in summary]))
        ratios = sec.get("ratios") or latency_ratios(summary, sec["runs"])
        parts.append("\nagainst tracking only, clean start (tracking) and all dirty "
                     "(tracking-dirty): ratio of the medians (range of the ratio within each "
                     "round); latency ratios > 1 are slower")

        def cell(e: dict, k: str) -> str:
            if e[k] is None:
                return "-"
            per = e.get(k + "_per_round") or []
            return f"{e[k]:.2f} ({_span(min(per), max(per))})" if len(per) > 1 \
                else f"{e[k]:.2f}"

        parts.append(table(["mode", "qd", "against", "IOPS", "p50", "p99", "p99.9"],
                           [[e["mode"], e["iodepth"], e["baseline"], cell(e, "iops"),
                             cell(e, "clat_ms_p50"), cell(e, "clat_ms_p99"),
                             cell(e, "clat_ms_p999")] for e in ratios]))
        bad = [c for c in sec.get("checks", []) if not c["identical"]]
        parts.append(f"copies checked identical by hash before each run and at the end: "
                     f"{len(sec.get('checks', [])) - len(bad)} of {len(sec.get('checks', []))}")
    return "\n".join(parts)


# -- checks and options ----------------------------------------------------------------

def preflight(args) -> str | None:
    """A one-line reason the run cannot start, or None."""
    problem = fio_nbd_problem()
    if problem:
        return problem
    wants = [(args.tmp_root, 64 * MiB, "--tmpdir", None)]
    if "downtime" in args.sections:
        wants.append((args.dir_root, 2 * args.size + 256 * MiB, "--dir", "--size"))
    if "latency" in args.sections:
        wants.append((args.shm, 2 * args.latency_size + 64 * MiB, "--shm-dir",
                      "--latency-size"))
    by_dev: dict[int, list] = {}
    for d, need, opt, size_opt in wants:
        if not os.path.isdir(d) or not os.access(d, os.W_OK):
            return f"{d} ({opt}) is not a writable directory"
        entry = by_dev.setdefault(os.stat(d).st_dev, [d, 0, [], []])
        entry[1] += need
        if size_opt:                       # name the options that put files there
            if not entry[2]:
                entry[0] = d
            entry[2].append(opt)
            entry[3].append(size_opt)
    for d, need, opts, size_opts in by_dev.values():
        st = os.statvfs(d)
        free = st.f_bavail * st.f_frsize
        if free < need:
            return (f"{d} ({fs_type(d)}) has {free / GiB:,.1f} GiB free, this run needs "
                    f"{need / GiB:,.1f} GiB there (source and target files); free some, "
                    f"or choose another {' or '.join(opts)} or a smaller "
                    f"{' or '.join(size_opts)}")
    if len(os.path.join(args.tmp_root, "bmig-bench-cutover-xxxxxxxx", "cut99.nbd.sock")) > 100:
        return f"--tmpdir {args.tmp_root} is too long for Unix socket paths"
    return None


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="1 GiB device, 2 cutovers, 5 s fio runs, 1 latency round (explicit "
                        "options still win)")
    p.add_argument("--only", choices=("downtime", "latency"), help="one section [both]")
    p.add_argument("--repeat", type=int, help="cutovers [5]")
    p.add_argument("--size", help="device size for the downtime section [4G]")
    p.add_argument("--load-seconds", type=float,
                   help="seconds of load between the full sync and the cutover [5]")
    p.add_argument("--dir", help="where the downtime section's source and target go (a "
                   "real disk) [a temporary directory under /var/tmp]")
    p.add_argument("--runtime", type=int, help="seconds per fio run of the latency section [15]")
    p.add_argument("--rounds", type=int, help="rounds of the latency section (each mode and "
                   "depth once per round) [3]")
    p.add_argument("--modes", default=",".join(MODES),
                   help="modes of the latency section, comma-separated [%(default)s]")
    p.add_argument("--depths", default=",".join(map(str, DEPTHS)),
                   help="fio iodepths of the latency section [%(default)s]")
    p.add_argument("--jobs", type=int, default=1,
                   help="latency section: fio jobs per run, each on its own NBD connection "
                        "at the iodepth, as a multi-conn client opens them; the figures "
                        "are their sum [1]")
    p.add_argument("--latency-size", default="1G", help="device size for the latency section "
                   "[1G]")
    p.add_argument("--shm-dir", default="/dev/shm",
                   help="where the latency section's files go [/dev/shm]")
    p.add_argument("--tmpdir", default="/tmp",
                   help="sockets, logs, breqd's and breceive's state [/tmp]")
    p.add_argument("--json", metavar="FILE",
                   help="write the results here [bench/results/cutover-YYYYmmdd-HHMMSS.json]")
    args = p.parse_args()
    args.repeat = args.repeat or (2 if args.quick else 5)
    args.runtime = args.runtime or (5 if args.quick else 15)
    args.rounds = args.rounds or (1 if args.quick else 3)
    args.load_seconds = 5.0 if args.load_seconds is None else args.load_seconds
    try:
        args.size = parse_size(args.size or ("1G" if args.quick else "4G"))
        args.latency_size = parse_size(args.latency_size)
    except Exception as exc:
        p.error(str(exc))
    for v, what in ((args.size, "--size"), (args.latency_size, "--latency-size")):
        if v < 64 * MiB or v % CHUNK:
            p.error(f"{what} must be at least 64M and a multiple of 64K")
    if args.repeat < 1 or args.runtime < 1 or args.rounds < 1 or args.load_seconds < 0:
        p.error("--repeat, --runtime and --rounds must be positive, --load-seconds >= 0")
    if not 1 <= args.jobs <= 16:
        p.error("--jobs takes 1 to 16")
    args.modes = tuple(m for m in args.modes.split(",") if m)
    if not args.modes or set(args.modes) - set(MODES):
        p.error(f"--modes takes some of {','.join(MODES)}")
    try:
        args.depths = tuple(int(d) for d in args.depths.split(","))
    except ValueError:
        p.error("--depths takes iodepths such as 1,32")
    if not args.depths or min(args.depths) < 1:
        p.error("--depths takes iodepths such as 1,32")
    args.sections = [args.only] if args.only else ["downtime", "latency"]
    args.dir_root = os.path.abspath(args.dir or "/var/tmp")
    args.shm = os.path.abspath(args.shm_dir)
    args.tmp_root = os.path.abspath(args.tmpdir)
    return args


def main() -> int:
    args = parse_args()
    problem = preflight(args)
    if problem:
        print(f"bench/cutover.py: {problem}", file=sys.stderr)
        return 2
    install_signal_handlers()
    stamp = time.strftime("%Y%m%d-%H%M%S")
    facts = provenance(fio=["fio", "--version"])
    out: dict = {**facts, "quick": args.quick, "sections": args.sections,
                 "repeat": args.repeat, "rounds": args.rounds, "runtime": args.runtime}
    print(f"cutover benchmark: {', '.join(args.sections)}", flush=True)
    print(provenance_line(facts), flush=True)
    t0 = time.monotonic()
    code = 0
    try:
        tmp = tempfile.mkdtemp(prefix="bmig-bench-cutover-", dir=args.tmp_root)
        PATHS.insert(0, tmp)
        b = Bench(args, tmp)
        b.secret = write_secret(b.path("secret"))
        b.start_breqd()
        for name in args.sections:
            started = time.monotonic()
            {"downtime": downtime, "latency": latency}[name](b, out)
            out.setdefault("section_seconds", {})[name] = round(time.monotonic() - started, 1)
    except (KeyboardInterrupt, Stopped):
        print("\ninterrupted; cleaning up", file=sys.stderr)
        code = 130
    except (RuntimeError, OSError, subprocess.SubprocessError) as exc:
        print(f"bench/cutover.py: {exc}", file=sys.stderr)
        code = 1
    finally:
        cleanup()
    have = any(out.get(s, {}).get("runs") for s in ("downtime", "latency"))
    if code == 130 or not have:
        return code
    out["total_seconds"] = round(time.monotonic() - t0, 1)
    changed = provenance_end(out)
    if changed:
        print(changed, file=sys.stderr)
    print(report(out))
    print(f"\ntotal {out['total_seconds']} s; load average before {out['loadavg_before']}, "
          f"after {out['loadavg_after']} (fio, bmig-nbd, breqd, bmigrate and breceive share "
          f"{out['cpus']} CPUs with whatever else runs)")
    path = args.json or os.path.join(HERE, "results", f"cutover-{stamp}.json")
    save_json(path, out)
    print(f"results: {path}")
    if code == 0 and out.get("downtime", {}).get("summary", {}).get("failed"):
        code = 1
    return code


if __name__ == "__main__":
    sys.exit(main())
