#!/usr/bin/env python3
"""An application's writes through bmig-nbd while a full sync runs, against none.

    .venv/bin/python bench/contention.py              # 3 rounds x 2 settings x 10 s
    .venv/bin/python bench/contention.py --quick      # 1 round of 5 s runs

fio's nbd engine writes 4 KiB at random, iodepth 32, over the first --working-set
(256 MiB) of a 1 GiB export that bmig-nbd serves from /dev/shm, tracked by a breqd with
its state on a real disk (--disk-dir, /var/tmp). In two settings, taking turns each
round (the first one rotating):

  alone      no sync runs;
  sync       `bmigrate track set-dirty`, then a full `bmigrate sync` to a breceive on
             127.0.0.1 (target on /dev/shm) that ends after its full pass (a threshold
             of the device's size), over and over while fio runs; the sync running
             when fio ends is stopped with SIGTERM.

Before each run every chunk is dirty (set-dirty), as at the start of a sync. Reported:
IOPS and fio's p99 per setting, the ratio sync / alone (the target: at least 0.8, with
no --bwlimit), and the sync's MB/s while fio ran. fio, bmig-nbd, breqd, bmigrate and
breceive share the machine's cores here (each in a session of its own, as services
are); in production breceive runs on the target host. Every process is stopped and
every file removed at the end, also on Ctrl-C.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
import signal
import subprocess
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

import benchlib  # noqa: E402
from benchlib import (BRECEIVE, PATHS, Proc, child_env, cleanup,  # noqa: E402
                      fio_nbd_problem, install_signal_handlers, provenance, provenance_end,
                      provenance_line, save_json, start_notified, table)
from bmig.config import parse_size  # noqa: E402
from bmig.constants import GiB, MiB  # noqa: E402
from bmig.processes import Child, Group, Stopped  # noqa: E402
from nbd import (DEVICE, Setup, _stats, _wait, fill_random, hot_fio,  # noqa: E402
                 start_breqd_with, start_server)

SETTINGS = ("alone", "sync")
TARGET = 0.8


class SyncLoop(threading.Thread):
    """Full syncs one after another (set-dirty, then sync) until ``stop``; the sync
    running then is stopped with SIGTERM (it ends cleanly and says what it sent). Its
    bytes and seconds cover the loop up to that stop, the window fio ran in."""

    def __init__(self, env: dict[str, str], common: list[str], size: int):
        super().__init__(daemon=True)
        self.env, self.common, self.size = env, common, size
        self.stop = threading.Event()
        self.bytes = 0
        self.seconds = 0.0
        self.syncs = 0
        self.error: str | None = None

    def run(self) -> None:
        t0 = time.monotonic()
        while not self.stop.is_set() and self.error is None:
            benchlib.run_bmigrate(self.env, "track", "set-dirty", DEVICE)
            # A threshold of the device's size: the sync ends after its full pass, and
            # the next one starts, so a full copy runs the whole time fio does.
            child = Child([*benchlib.BMIGRATE, "sync", *self.common, "--threshold",
                           str(self.size), "--json"], name="bmigrate sync",
                          group=Group.SESSION)
            child.start(self.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            assert child.proc is not None
            try:
                while child.proc.poll() is None and not self.stop.wait(0.05):
                    pass
                if self.stop.is_set():
                    child.signal(signal.SIGTERM)
                out, err = child.proc.communicate(timeout=600)
            finally:
                child.stop()
            # 0 identical, 10 not converging, 15 converged while written, 130 stopped
            if child.proc.returncode not in (0, 10, 15, 130):
                self.error = f"sync exited {child.proc.returncode}: {err.strip()[-500:]}"
                break
            # What each pass shipped (a sync that ends "not converging" says no summary:
            # the chunks fio keeps writing are held, and it stops after a few passes).
            passes = [e for e in map(_json_or_none, out.splitlines())
                      if isinstance(e, dict) and e.get("event") == "pass"]
            self.bytes += sum(int(e["bytes_sent"]) + int(e["bytes_zero"]) for e in passes)
            self.syncs += 1
        self.seconds = time.monotonic() - t0


def _json_or_none(line: str):
    try:
        return json.loads(line)
    except ValueError:
        return None


def start_receiver(setup: Setup, state: str) -> tuple[Proc, list[str]]:
    secret = os.path.join(state, "secret")
    with open(os.open(secret, os.O_WRONLY | os.O_CREAT, 0o600), "w") as f:
        f.write(os.urandom(32).hex() + "\n")
    target = os.path.join(os.path.dirname(setup.backing),
                          f"bmig-bench-contention-target-{os.getpid()}.img")
    PATHS.append(target)
    recv = Proc("breceive", [*BRECEIVE, "--listen", "127.0.0.1:0", "--target",
                             f"{DEVICE}={target}", "--secret-file", secret,
                             "--state-dir", os.path.join(state, "receiver")],
                os.path.join(state, "breceive.log"))
    pattern = r"STATUS=listening on 127\.0\.0\.1:(\d+)"
    notes = start_notified(recv, setup.tmp, child_env(), pattern)
    url = f"tcp://127.0.0.1:{re.search(pattern, chr(10).join(notes)).group(1)}/{DEVICE}"
    return recv, [DEVICE, "--source", setup.backing, "--to", url, "--secret-file", secret]


def one_run(setup: Setup, server, args, env: dict[str, str], common: list[str],
            setting: str, rnd: int) -> dict:
    _wait("bmig-nbd letting go of its holds",
          lambda: int(_stats(setup)["held_bytes"]) == 0)
    with setup.tracker() as c:
        c.set_all_dirty(DEVICE)
    loop = None
    if setting == "sync":
        loop = SyncLoop(env, common, setup.size)
        loop.start()
        _wait("the sync to check chunks out",
              lambda: int(_stats(setup)["inflight_bytes"]) > 0 or loop.error is not None)
    try:
        r = hot_fio(setup, server, args, f"{setting}-{rnd}", args.runtime)
    finally:
        if loop is not None:
            loop.stop.set()
            loop.join(600)
    if loop is not None:
        if loop.error is not None:
            raise RuntimeError(f"the sync loop failed: {loop.error}")
        if loop.syncs == 0:
            raise RuntimeError("no sync ended while fio ran")
        r["sync_mb_s"] = round(loop.bytes / max(loop.seconds, 1e-9) / 1e6, 1)
        r["syncs"] = loop.syncs
    r.update(setting=setting, round=rnd)
    print(f"  round {rnd + 1} {setting:<10} {r['iops']:>10,.0f} IOPS  p99 "
          f"{r['clat_ms_p99']:.2f} ms" + (f"  sync {r['sync_mb_s']:,.0f} MB/s "
                                          f"({r['syncs']} syncs)" if loop else ""),
          flush=True)
    return r


def report(out: dict) -> str:
    runs = out["runs"]
    rows, medians = [], {}
    for setting in SETTINGS:
        mine = [r for r in runs if r["setting"] == setting]
        iops = [r["iops"] for r in mine]
        medians[setting] = statistics.median(iops)
        sync = [r["sync_mb_s"] for r in mine if "sync_mb_s" in r]
        rows.append([setting, f"{medians[setting]:,.0f}", f"{min(iops):,.0f}-{max(iops):,.0f}",
                     f"{statistics.median(r['clat_ms_p99'] for r in mine):.2f}",
                     f"{statistics.median(sync):,.0f}" if sync else "-"])
    lines = ["", f"fio 4 KiB random writes, iodepth 32, through bmig-nbd (medians of "
             f"{out['repeat']} round(s))",
             table(["setting", "IOPS", "min-max", "p99 ms", "sync MB/s"], rows)]
    ratio_rows = []
    for setting in SETTINGS[1:]:
        per_round = [next(r["iops"] for r in runs if r["setting"] == setting
                          and r["round"] == n) /
                     next(r["iops"] for r in runs if r["setting"] == "alone"
                          and r["round"] == n) for n in range(out["repeat"])]
        ratio = medians[setting] / medians["alone"]
        ratio_rows.append([f"{setting} / alone", f"{ratio:.2f}",
                           f"{min(per_round):.2f}-{max(per_round):.2f}", f">= {TARGET}",
                           "PASS" if ratio >= TARGET else "BELOW"])
    lines += ["", table(["ratio", "median", "per round", "need", ""], ratio_rows)]
    return "\n".join(lines)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="1 round of 5 s runs")
    p.add_argument("--runtime", type=int, help="seconds per fio run [10]")
    p.add_argument("--repeat", type=int, help="rounds [3]")
    p.add_argument("--size", default="1G", help="export size [1G]")
    p.add_argument("--working-set", default="256M", help="the part fio writes [256M]")
    p.add_argument("--backing-dir", default="/dev/shm", help="backing and target [/dev/shm]")
    p.add_argument("--disk-dir", default="/var/tmp", help="breqd's state [/var/tmp]")
    p.add_argument("--tmpdir", default="/tmp", help="sockets and logs [/tmp]")
    p.add_argument("--json", metavar="FILE", help="results [bench/results/contention-*.json]")
    args = p.parse_args()
    args.runtime = args.runtime or (5 if args.quick else 10)
    args.repeat = args.repeat or (1 if args.quick else 3)
    args.size = parse_size(args.size)
    args.working_set = min(parse_size(args.working_set), args.size)
    args.py_spy = None
    if args.runtime < 1 or args.repeat < 1 or args.size < 64 * MiB:
        p.error("--runtime and --repeat must be positive, --size at least 64M")
    return args


def main() -> int:
    args = parse_args()
    problem = fio_nbd_problem()
    if problem:
        print(f"bench/contention.py: {problem}", file=sys.stderr)
        return 2
    install_signal_handlers()
    facts = provenance(fio=["fio", "--version"])
    out: dict = {**facts, "runtime": args.runtime, "repeat": args.repeat, "size": args.size,
                 "working_set": args.working_set, "runs": []}
    print(f"contention: fio through bmig-nbd alone and during full syncs; {args.repeat} x "
          f"{args.runtime} s per setting; {args.size / GiB:g} GiB export in "
          f"{args.backing_dir}, breqd's state in {args.disk_dir}", flush=True)
    print(provenance_line(facts), flush=True)
    t0 = time.monotonic()
    procs: list[Proc] = []
    try:
        tmp = tempfile.mkdtemp(prefix="bmig-bench-contention-", dir=args.tmpdir)
        state = tempfile.mkdtemp(prefix="bmig-bench-contention-", dir=args.disk_dir)
        PATHS.extend([tmp, state])
        backing = os.path.join(args.backing_dir, f"bmig-bench-contention-{os.getpid()}.img")
        PATHS.append(backing)
        setup = Setup(tmp, backing, args.size)
        fill_random(backing, args.size)
        setup.breqd = start_breqd_with(setup, state, None)
        procs.append(setup.breqd)
        server = start_server(setup, "bmig-nbd")
        procs.append(server.proc)
        recv, common = start_receiver(setup, state)
        procs.append(recv)
        env = child_env(BMIG_CONTROL=setup.control)
        benchlib.run_bmigrate(env, "sync", *common, "--threshold", "0", timeout=600.0)
        hot_fio(setup, server, args, "warm", 2)
        names = list(SETTINGS)
        for rnd in range(args.repeat):
            for setting in names[rnd % len(names):] + names[:rnd % len(names)]:
                out["runs"].append(one_run(setup, server, args, env, common, setting, rnd))
    except (KeyboardInterrupt, Stopped):
        print("\ninterrupted; cleaning up", file=sys.stderr)
        return 130
    except RuntimeError as exc:
        print(f"bench/contention.py: {exc}", file=sys.stderr)
        return 1
    finally:
        for p in reversed(procs):
            p.stop()
        cleanup()
    out["total_seconds"] = round(time.monotonic() - t0, 1)
    changed = provenance_end(out)
    print(report(out))
    print(f"\ntotal {out['total_seconds']} s; load average before {out['loadavg_before']}, "
          f"after {out['loadavg_after']}")
    if changed:
        print(changed, file=sys.stderr)
    path = args.json or os.path.join(HERE, "results",
                                     f"contention-{time.strftime('%Y%m%d-%H%M%S')}.json")
    save_json(path, out)
    print(f"results: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
