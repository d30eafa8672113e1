#!/usr/bin/env python3
"""Fuzz every parser of the product in-process: crashes, hangs and memory growth.

One driver per parser (tests/fuzzing/: NBD handshake, transmission and client replies,
breqd's control protocol, the replication wire before and after authentication, sealed
frames, acknowledgements, the codec, the bitmap file, lineage and target records, every
TOML file kind). Each input is a mutated seed (real frames and files made by the product:
bit flips, cuts, length fields set to extremes, frames dropped, repeated, swapped or
spliced) or random bytes. A parser must accept it or raise the product's own errors
(for bmig-nbd: close the connection the documented way); anything else is a crash and
its input is saved under --crashes DIR/NAME/ with the traceback beside it. An input
that runs past --time-limit is a hang. RSS is sampled every 1000 inputs.

    python bench/fuzz.py                                  # 1,000,000 inputs per driver
    python bench/fuzz.py --inputs 20000 --only nbd-handshake,wire-codec --seed 7
    python bench/fuzz.py --list
    python bench/fuzz.py --replay fuzz-crashes/wire-session/crash-0123.bin --only wire-session

The run is reproducible from --seed (the inputs of each driver depend on it and the
driver's name only). The test suite runs each driver for a few seconds under hypothesis
(tests/unit/test_fuzz_parsers.py).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import signal
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

from benchlib import git_head, loadavg, source_digest, table  # noqa: E402
from tests.fuzzing import drivers  # noqa: E402
from tests.fuzzing.engine import Report, check, fuzz, main_thread_only  # noqa: E402

MiB = 1 << 20


def _mib(n: int) -> str:
    return f"{n / MiB:.1f}"


def _progress(report: Report) -> None:
    if report.inputs % 100_000 == 0:
        rate = report.inputs / report.seconds if report.seconds else 0
        print(f"  {report.name}: {report.inputs:,} inputs, {report.accepted:,} accepted, "
              f"{len(report.errors)} distinct errors, {len(report.crash_signatures)} kinds of "
              f"crash, {report.hangs} hangs, RSS {_mib(report.rss_max)} MiB, {rate:,.0f}/s",
              flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--inputs", type=int, default=1_000_000, help="inputs per driver")
    parser.add_argument("--only", default="", help="comma-separated driver names")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--json", metavar="FILE", help="write the results as JSON")
    parser.add_argument("--crashes", default="fuzz-crashes", metavar="DIR",
                        help="where reproducers go (default: ./fuzz-crashes)")
    parser.add_argument("--time-limit", type=float, default=None,
                        help="seconds per input before it counts as a hang "
                        "(default: each driver's own, 2 to 5 s)")
    parser.add_argument("--list", action="store_true", help="list the drivers and exit")
    parser.add_argument("--replay", metavar="FILE",
                        help="feed one saved input to the --only driver and show the outcome")
    args = parser.parse_args()
    main_thread_only()
    for sig in (signal.SIGTERM, signal.SIGHUP):   # stop as on Ctrl-C: the finally cleans up
        signal.signal(sig, _interrupt)
    known = drivers()
    if args.list:
        for name, cls in known.items():
            print(f"{name:24} {cls.what}")
        return 0
    names = [n for n in args.only.split(",") if n] or list(known)
    unknown = [n for n in names if n not in known]
    if unknown:
        parser.error(f"unknown driver(s) {', '.join(unknown)}; --list shows them")
    if args.replay:
        return replay(known[names[0]], args.replay)

    provenance = {"commit": git_head(), "sources": source_digest(), "seed": args.seed,
                  "inputs": args.inputs, "load_before": loadavg()}
    print(f"fuzz: {len(names)} driver(s), {args.inputs:,} inputs each, seed {args.seed}, "
          f"load {provenance['load_before']}", flush=True)
    reports: list[Report] = []
    for name in names:
        workdir = tempfile.mkdtemp(prefix=f"bmig-fuzz-{name}-", dir=_scratch())
        try:
            driver = known[name](workdir)
            if args.time_limit:
                driver.time_limit = args.time_limit
            gc.collect()
            print(f"{name}: {driver.what}", flush=True)
            report = fuzz(driver, args.inputs, args.seed, args.crashes, progress=_progress)
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
        reports.append(report)
        print(f"  done: {report.inputs:,} inputs in {report.seconds:.0f} s, "
              f"{len(report.crashes)} crash reproducer(s)", flush=True)
    print()
    print(table(["driver", "inputs", "accepted", "distinct errors", "crashes", "hangs",
                 "RSS start", "RSS 10%", "RSS end", "seconds"],
                [[r.name, f"{r.inputs:,}", f"{r.accepted:,}", str(len(r.errors)),
                  str(sum(r.crash_signatures.values()) - r.hangs), str(r.hangs),
                  _mib(r.rss_start), _mib(r.rss_warm), _mib(r.rss_end), f"{r.seconds:.0f}"]
                 for r in reports]))
    print("(RSS in MiB: at the start, after the first tenth of the inputs, at the end)")
    for r in reports:
        for signature, count in r.crash_signatures.items():
            print(f"{r.name}: {count} x {signature}")
        if r.crashes:
            print(f"{r.name}: reproducers in {os.path.dirname(r.crashes[0])}")
    provenance["load_after"] = loadavg()
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"provenance": provenance, "drivers": [r.to_json() for r in reports]},
                      f, indent=1)
    return 1 if any(r.crash_signatures for r in reports) else 0


def replay(cls, path: str) -> int:
    workdir = tempfile.mkdtemp(prefix="bmig-fuzz-replay-", dir=_scratch())
    try:
        driver = cls(workdir)
        with open(path, "rb") as f:
            data = f.read()
        started = time.monotonic()
        outcome = check(driver, data)
        driver.close()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    print(f"{outcome.kind} after {time.monotonic() - started:.3f} s: {outcome.signature}")
    if outcome.detail:
        print(outcome.detail)
    return 0 if outcome.kind in ("accepted", "error") else 1


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def _scratch() -> str | None:
    """tmpfs when there is one: the drivers write small files for every input."""
    return "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) \
        else None


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        sys.exit(130)
