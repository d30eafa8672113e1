#!/usr/bin/env python3
"""Catch-up amplification: what `bmigrate run` sends per byte the application writes.

A device served by bmig-nbd (1 GiB of random data, synced to a breceive once), then
`bmigrate run` ships what becomes dirty while fio writes 4 KiB blocks at random through
bmig-nbd at a steady rate (2 MiB/s by default) for --seconds. Once fio stopped and the run
caught up (nothing dirty, held or in flight), the run is stopped and its summary read.

Reported, per round: bytes written by fio, bytes the run sent (its summary's
bytes_sent: after compression; the data is random, so about what was read), the
amplification (sent / written), and its floor: every chunk fio touched shipped exactly
once (distinct chunks x chunk size / written, from fio's I/O log). Target: at most 2x the
bytes written at 64 KiB chunks, where the floor allows it; the figure that matters is
sent / floor (1.0: each touched chunk went once). A second floor counts the bursts of
writes per chunk (a chunk written again after HOLD_IDLE seconds of quiet starts a new
one): a shipper that keeps the copy within seconds of the source ships a chunk once its
writes settle, and once more for each later burst; sent / that floor is what such a
shipper wastes.

    .venv/bin/python bench/catchup.py [--quick] [--rounds N] [--seconds S] [--rate 2m]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import benchlib  # noqa: E402
from benchlib import (BMIGRATE, PATHS, cleanup,  # noqa: E402
                      install_signal_handlers, provenance, provenance_line, save_json)
from cutover import Bench, Proc, fio_argv, read_fio, write_file, write_secret  # noqa: E402

from bmig.config import parse_size  # noqa: E402
from bmig.constants import HOLD_IDLE, KiB, MiB  # noqa: E402
from bmig.processes import Stopped  # noqa: E402

CHUNK = 64 * KiB
SIZE = 1024 * MiB


def wait_caught_up(b: Bench, name: str, timeout: float) -> float:
    """Seconds until breqd has nothing dirty, held or in flight for ``name``."""
    t0 = time.monotonic()
    while True:
        s = b.stats(name)
        if not (s["dirty_bytes"] or s["held_bytes"] or s["inflight_bytes"]):
            return time.monotonic() - t0
        if time.monotonic() - t0 > timeout:
            raise RuntimeError(f"the run did not catch up within {timeout:g} s: {s}")
        time.sleep(0.2)          # polling a daemon's counters, not synchronising


def distinct_chunks(iolog: str) -> int:
    """Chunks touched by the writes in fio's I/O log (version 2 or 3)."""
    chunks: set[int] = set()
    with open(iolog) as f:
        for line in f:
            parts = line.split()
            if len(parts) >= 4 and parts[-3] == "write":
                offset, length = int(parts[-2]), int(parts[-1])
                chunks.update(range(offset // CHUNK, (offset + length - 1) // CHUNK + 1))
    return len(chunks)


def write_bursts(iolog: str, quiet_us: float) -> int | None:
    """Bursts of writes per chunk, summed over the chunks: a burst ends after ``quiet_us``
    microseconds without a write to the chunk. A shipper that keeps the copy fresh ships a
    chunk once its writes settle, so a chunk written again after a quiet spell ships
    again: one shipment per burst is about the floor of such a shipper. None for an I/O
    log without times (fio's version 2; version 3 starts each line with microseconds
    since the log began)."""
    last: dict[int, float] = {}
    bursts = 0
    with open(iolog) as f:
        if "version 3" not in f.readline():
            return None
        for line in f:
            parts = line.split()
            if len(parts) >= 5 and parts[-3] == "write":
                at, offset, length = float(parts[0]), int(parts[-2]), int(parts[-1])
                for c in range(offset // CHUNK, (offset + length - 1) // CHUNK + 1):
                    if c not in last or at - last[c] > quiet_us:
                        bursts += 1
                    last[c] = at
    return bursts


def one_round(b: Bench, k: int, seconds: float, rate: str,
              interval: float | None = None) -> dict:
    name = f"c{k}"
    src, dst = b.path(f"{name}.img"), b.path(f"{name}-target.img")
    PATHS.extend([src, dst])
    write_file(src, SIZE, random_data=True)
    b.bmigrate("track", "add", name, "--size-of", src)
    nbd, sock = b.start_nbd(name, src)
    recv = b.start_receiver(f"breceive-{name}", name, dst)
    run = None
    try:
        b.sync(name, src, recv.url(name), SIZE)
        out = b.path(f"{name}-run.json")
        run = benchlib.Proc(f"bmigrate run {name}",
                   [*BMIGRATE, "run", name, "--source", src, "--to", recv.url(name),
                    "--secret-file", b.secret, "--json",
                    *([] if interval is None else ["--interval", f"{interval:g}"])],
                   b.path(f"{name}-run.log"))
        with open(out, "w") as stdout:
            run.start(b.env(), stdout=stdout)
        iolog, fio_out = b.path(f"{name}.iolog"), b.path(f"{name}-fio.json")
        fio = Proc(f"fio {name}", fio_argv(name, sock, fio_out, "--bs=4k", "--iodepth=1",
                                           f"--rate={rate}", f"--runtime={seconds:g}",
                                           f"--write_iolog={iolog}"),
                   b.path(f"{name}-fio.log")).start(b.env())
        fio.proc.wait(seconds + 120)
        job = read_fio(fio_out, fio)
        settle = wait_caught_up(b, name, 120.0)
        run.stop()
        events = [json.loads(line) for line in open(out) if line.startswith("{")]
        summary = next(e for e in reversed(events) if e.get("event") == "summary")
        written = int(job["write"]["io_bytes"])
        touched = distinct_chunks(iolog)
        bursts = write_bursts(iolog, HOLD_IDLE * 1e6)
        sent = int(summary["bytes_sent"])
        row = {"round": k, "seconds": seconds, "rate": rate, "interval": interval,
               "written": written,
               "chunks_touched": touched, "floor_bytes": touched * CHUNK,
               "bytes_sent": sent, "bytes_read": int(summary.get("bytes_read", 0)),
               "passes": int(summary.get("passes", 0)),
               "amplification": round(sent / written, 3) if written else None,
               "floor": round(touched * CHUNK / written, 3) if written else None,
               "sent_per_floor": round(sent / (touched * CHUNK), 3) if touched else None,
               "bursts": bursts,
               "sent_per_burst_floor": (round(sent / (bursts * CHUNK), 3) if bursts
                                        else None),
               "caught_up_after_s": round(settle, 2)}
        print(f"  round {k}: written {written / MiB:.1f} MiB, {touched} chunks touched, "
              f"sent {sent / MiB:.1f} MiB in {row['passes']} passes: {row['amplification']}x "
              f"the bytes written (floor {row['floor']}x), {row['sent_per_floor']}x the "
              "floor; " + (f"{bursts} bursts of writes (a chunk written again after "
                           f"{HOLD_IDLE:g} s of quiet), {row['sent_per_burst_floor']}x one "
                           "shipment per burst" if bursts else "bursts n/a"), flush=True)
        return row
    finally:
        if run is not None:
            run.stop()
        recv.proc.stop()
        nbd.stop()
        for p in (src, dst):
            benchlib.remove(p)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="one round of 10 s")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=30.0)
    ap.add_argument("--rate", default="2m", help="fio's --rate (default 2m: 2 MiB/s)")
    ap.add_argument("--interval", type=float,
                    help="bmigrate run's --interval: how often it looks for new writes "
                         "(its default if not given); a longer one lets the copy lag and "
                         "ships a chunk's bursts together")
    ap.add_argument("--tmp-root", default="/var/tmp")
    ap.add_argument("--json", metavar="FILE", help="save the results there too")
    args = ap.parse_args()
    if args.quick:
        args.rounds, args.seconds = 1, 10.0
    if args.interval is not None and not 0.05 <= args.interval <= 3600:
        ap.error("--interval takes 0.05 to 3600 seconds, as bmigrate run does")
    parse_size(args.rate)                       # a size fio and we both read
    install_signal_handlers()
    facts = provenance(fio=["fio", "--version"])
    print(provenance_line(facts), flush=True)
    out: dict = {**facts, "args": vars(args), "rounds": []}
    code = 0
    try:
        tmp = tempfile.mkdtemp(prefix="bmig-bench-catchup-", dir=args.tmp_root)
        PATHS.insert(0, tmp)
        b = Bench(args, tmp)
        b.secret = write_secret(b.path("secret"))
        b.start_breqd()
        for k in range(args.rounds):
            out["rounds"].append(one_round(b, k, args.seconds, args.rate, args.interval))
    except (KeyboardInterrupt, Stopped):
        print("\ninterrupted; cleaning up", file=sys.stderr)
        code = 130
    except (RuntimeError, OSError, subprocess.SubprocessError) as exc:
        print(f"bench/catchup.py: {exc}", file=sys.stderr)
        code = 1
    finally:
        cleanup()
    rows = out["rounds"]
    if rows:
        amp = sorted(r["amplification"] for r in rows)[len(rows) // 2]
        per_floor = sorted(r["sent_per_floor"] for r in rows)[len(rows) // 2]
        floor = sorted(r["floor"] for r in rows)[len(rows) // 2]
        bursts = sorted(r["sent_per_burst_floor"] for r in rows
                        if r["sent_per_burst_floor"] is not None)
        per_burst = (f"{bursts[len(bursts) // 2]}x one shipment per burst of writes"
                     if bursts else "bursts n/a (fio wrote no times in its I/O log)")
        print(f"median: sent {amp}x the bytes written (target <= 2x; the floor of one "
              f"shipment per touched chunk is {floor}x), {per_floor}x the floor, "
              f"{per_burst}")
        os.makedirs(os.path.join(HERE, "results"), exist_ok=True)
        save_json(os.path.join(HERE, "results",
                               f"catchup-{time.strftime('%Y%m%d-%H%M%S')}.json"), out)
        if args.json:
            save_json(args.json, out)
    return code


if __name__ == "__main__":
    sys.exit(main())
