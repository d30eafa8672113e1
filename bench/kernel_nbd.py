#!/usr/bin/env python3
"""The kernel's own NBD client (/dev/nbd0) on bmig-nbd and on qemu-nbd, in a throw-away
kernel: how a file system meets bmig-nbd.

    .venv/bin/python bench/kernel_nbd.py                 # 3 rounds x 2 servers (~4.5 min)
    .venv/bin/python bench/kernel_nbd.py --quick         # 1 round, 5 s fio runs (~40 s)
    .venv/bin/python bench/kernel_nbd.py --rounds 5 --json /tmp/knbd.json

This machine's kernel has no nbd module, so the script boots User-Mode Linux once with
tests/kernel/run-in-vm.sh (``-b uml``) and runs itself inside it (``--guest``). In the
guest, for each server in turn (the order rotates each round, so noise hits both alike):

  * a fresh, sparse 1 GiB backing file on the guest's /dev/shm (tmpfs, in the guest's
    memory: nothing goes through the host's file systems);
  * the server on a Unix socket, started as bench/nbd.py starts it: bmig-nbd with breqd
    tracking the device (one breqd for the whole run; the device is new, so all dirty, and
    marks are answered from memory, as bench/nbd.py's default), or ``qemu-nbd -f raw
    --cache=writeback --aio=threads``, which like bmig-nbd writes into the page cache and
    makes data durable on NBD_CMD_FLUSH;
  * ``nbd-client -unix SOCKET /dev/nbd0 -N EXPORT``;
  * raw: fio on /dev/nbd0, 4 KiB random writes, iodepth 32, libaio, direct=1;
  * mkfs.ext4 on /dev/nbd0 (timed), mount, then ext4: fio on a 128 MiB file in it, 4 KiB
    random writes with an fsync every 32 writes (sync engine);
  * unmount, ``nbd-client -d``, the server stopped.

The host prints a table per workload (medians, min-max) with the ratio bmig-nbd / qemu-nbd,
and writes the JSON. UML runs one CPU and its syscalls are slow (ptrace): the ratios, not
the absolute figures, are what this reports. Ctrl-C (or SIGTERM, SIGHUP) on the host stops
the VM, and with it everything started inside it.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
sys.path.insert(1, ROOT)

from benchlib import (PATHS, Proc, cleanup, install_signal_handlers, provenance,  # noqa: E402
                      provenance_end, provenance_line, save_json, table, tool_version)
from nbd import Setup, start_breqd, start_server  # noqa: E402

from bmig import processes  # noqa: E402
from bmig.constants import GiB, MiB  # noqa: E402
from bmig.processes import Stopped  # noqa: E402

SERVERS = ("bmig-nbd", "qemu-nbd")
NBD_DEVICE = "/dev/nbd0"
SIZE = 1 * GiB
EXT4_FILE = "128M"
FSYNC_EVERY = 32
VM_SCRIPT = os.path.join(ROOT, "tests", "kernel", "run-in-vm.sh")
VM_MEMORY = "3G"               # the 1 GiB backing file lives in the guest's memory
TOOL_TIMEOUT = 300.0
FIO_GRACE = 300.0              # fio gets runtime + this (its file layout is slow in UML)


# -- workloads (in the guest) ------------------------------------------------------------

WORKLOADS = {
    "raw": ("fio on /dev/nbd0: 4 KiB random write, iodepth 32, libaio, direct=1", "iops"),
    "mkfs": ("mkfs.ext4 on /dev/nbd0 (seconds, lower is better)", "seconds"),
    "ext4": (f"fio on a {EXT4_FILE} file in ext4: 4 KiB random write, fsync every "
             f"{FSYNC_EVERY}", "iops"),
}


def run(*argv: str, timeout: float = TOOL_TIMEOUT) -> str:
    """A short command to its end (listed while it runs); its stdout, or RuntimeError."""
    done = processes.run(list(argv), timeout=timeout, name=os.path.basename(argv[0]))
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({done.returncode}): "
                           f"{(done.stdout + done.stderr).strip()}")
    return done.stdout


def fio(out: str, runtime: int, *args: str) -> dict:
    """One fio job, 4 KiB random writes for ``runtime`` seconds; IOPS and MB/s."""
    run("fio", "--name=w", "--rw=randwrite", "--bs=4k", "--time_based",
        f"--runtime={runtime}", "--norandommap", "--randrepeat=0", "--numjobs=1",
        "--output-format=json", f"--output={out}", *args, timeout=runtime + FIO_GRACE)
    with open(out, errors="replace") as f:
        text = f.read()
    job = json.loads(text[text.index("{"):])["jobs"][0]    # fio may warn before the JSON
    if job.get("error"):
        raise RuntimeError(f"fio failed with error {job['error']}")
    side = job["write"]
    return {"iops": round(side["iops"], 1), "mbps": round(side["bw_bytes"] / 1e6, 2),
            "ios": int(side["total_ios"]),
            "clat_ms_p50": round(side.get("clat_ns", {}).get("percentile", {})
                                 .get("50.000000", 0) / 1e6, 3)}


def one_server(setup: Setup, name: str, runtime: int, mnt: str, tag: str) -> dict:
    """The raw, mkfs and ext4 figures of one server on a fresh backing file."""
    with open(setup.backing, "wb") as f:
        f.truncate(setup.size)
    server = start_server(setup, name)
    connected = mounted = False
    try:
        run("nbd-client", "-unix", server.sock, NBD_DEVICE, "-N", server.export)
        connected = True
        size = int(run("blockdev", "--getsize64", NBD_DEVICE))
        if size != setup.size:
            raise RuntimeError(f"{NBD_DEVICE} has {size} bytes, not {setup.size}")
        result = {"server": name}
        result["raw"] = fio(os.path.join(setup.tmp, f"raw-{tag}.json"), runtime,
                            f"--filename={NBD_DEVICE}", "--ioengine=libaio", "--direct=1",
                            "--iodepth=32")
        t0 = time.monotonic()
        run("mkfs.ext4", "-q", "-F", NBD_DEVICE)
        result["mkfs"] = {"seconds": round(time.monotonic() - t0, 3)}
        run("mount", NBD_DEVICE, mnt)
        mounted = True
        result["ext4"] = fio(os.path.join(setup.tmp, f"ext4-{tag}.json"), runtime,
                             f"--filename={os.path.join(mnt, 'fio.dat')}", f"--size={EXT4_FILE}",
                             "--ioengine=sync", f"--fsync={FSYNC_EVERY}")
        run("umount", mnt)
        mounted = False
        run("nbd-client", "-d", NBD_DEVICE)
        connected = False
        code = server.proc.stop()
        if code not in (0, None) and name == "bmig-nbd":
            raise RuntimeError(f"{name} exited with {code}:\n{server.proc.log_tail()}")
        return result
    finally:
        if mounted:
            processes.run(["umount", "-l", mnt], timeout=TOOL_TIMEOUT)
        if connected:
            processes.run(["nbd-client", "-d", NBD_DEVICE], timeout=TOOL_TIMEOUT)
        server.proc.stop()
        os.unlink(setup.backing)


def guest(args) -> int:
    """Inside the throw-away kernel: every round, every server; the results to args.out."""
    install_signal_handlers()
    out: dict = {"kernel": os.uname().release, "machine": os.uname().machine,
                 "nbd_client": tool_version(["nbd-client", "-V"]), "runs": []}
    try:
        run("modprobe", "nbd", "nbds_max=2")
        tmp = tempfile.mkdtemp(prefix="bmig-knbd-", dir="/tmp")
        PATHS.append(tmp)
        setup = Setup(tmp, os.path.join("/dev/shm", "bmig-knbd.img"), SIZE)
        mnt = os.path.join(tmp, "mnt")
        os.makedirs(mnt)
        setup.breqd = start_breqd(setup)
        for rnd in range(args.rounds):
            order = list(SERVERS[rnd % 2:] + SERVERS[:rnd % 2])
            for name in order:
                r = one_server(setup, name, args.runtime, mnt, f"{rnd}-{name}")
                r["round"] = rnd
                out["runs"].append(r)
                print(f"  round {rnd + 1} {name:<8}  raw {r['raw']['iops']:>8,.0f} IOPS  "
                      f"mkfs {r['mkfs']['seconds']:>6.2f} s  ext4 "
                      f"{r['ext4']['iops']:>7,.0f} IOPS", flush=True)
                save_json(args.out, out)           # what is done so far survives a stop
        out["breqd_exit"] = setup.breqd.stop()
    except (KeyboardInterrupt, Stopped):
        return 130
    except RuntimeError as exc:
        print(f"bench/kernel_nbd.py (guest): {exc}", file=sys.stderr)
        return 1
    finally:
        cleanup()
    out["done"] = True
    save_json(args.out, out)
    return 0


# -- the host: boot, then report --------------------------------------------------------

def preflight() -> str | None:
    """A one-line reason the run cannot start, or None."""
    for tool, package in (("linux.uml", "user-mode-linux"), ("nbd-client", "nbd-client"),
                          ("fio", "fio"), ("qemu-nbd", "qemu-utils"),
                          ("mkfs.ext4", "e2fsprogs")):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (Debian: apt-get install {package})"
    if not os.path.isdir("/usr/lib/uml/modules"):
        return "/usr/lib/uml/modules is missing (Debian: apt-get install user-mode-linux)"
    return None


def summarize(runs: list[dict]) -> dict:
    """Per workload and server: the median and range of the workload's metric."""
    out: dict = {}
    for key, (_, metric) in WORKLOADS.items():
        rows = {}
        for name in SERVERS:
            vals = [r[key][metric] for r in runs if r["server"] == name]
            if vals:
                rows[name] = {"median": statistics.median(vals), "min": min(vals),
                              "max": max(vals), "runs": len(vals)}
        ratio = None
        if len(rows) == 2 and rows["qemu-nbd"]["median"]:
            ratio = round(rows["bmig-nbd"]["median"] / rows["qemu-nbd"]["median"], 3)
        per_round = []          # the ratio within each round: how far one run can be off
        for rnd in sorted({r["round"] for r in runs}):
            pair = {r["server"]: r[key][metric] for r in runs if r["round"] == rnd}
            if len(pair) == 2 and pair["qemu-nbd"]:
                per_round.append(round(pair["bmig-nbd"] / pair["qemu-nbd"], 3))
        out[key] = {"metric": metric, "servers": rows, "ratio": ratio,
                    "round_ratios": per_round}
    return out


def report(summary: dict) -> str:
    parts = []
    for key, (title, metric) in WORKLOADS.items():
        s = summary[key]
        rows = [[name, v["median"], f"{v['min']:,.{2 if metric == 'seconds' else 0}f}-"
                 f"{v['max']:,.{2 if metric == 'seconds' else 0}f}", v["runs"]]
                for name, v in s["servers"].items()]
        fmt = (lambda v: f"{v:,.2f}" if isinstance(v, float) and metric == "seconds"
               else f"{v:,.0f}" if isinstance(v, float) else str(v))
        parts.append(f"\n{key}: {title}\n" + table(["server", f"median {metric}", "min-max",
                                                   "runs"], rows, fmt))
        if s["ratio"] is not None:
            better = "lower" if metric == "seconds" else "higher"
            spread = s["round_ratios"]
            parts.append(f"bmig-nbd / qemu-nbd: {s['ratio']:.2f}x ({better} is better); "
                         f"within each round {min(spread):.2f}-{max(spread):.2f}x")
    return "\n".join(parts)


def host(args) -> int:
    problem = preflight()
    if problem:
        print(f"bench/kernel_nbd.py: {problem}", file=sys.stderr)
        return 2
    install_signal_handlers()
    stamp = time.strftime("%Y%m%d-%H%M%S")
    facts = provenance(fio=["fio", "--version"], qemu_nbd=["qemu-nbd", "--version"],
                       nbd_client=["nbd-client", "-V"], mke2fs=["mke2fs", "-V"],
                       uml=["linux.uml", "--version"])
    out: dict = {**facts, "quick": args.quick, "rounds": args.rounds, "runtime": args.runtime,
                 "size": SIZE, "backing": "guest /dev/shm (tmpfs)", "vm": "uml",
                 "vm_memory": VM_MEMORY}
    print(f"The kernel's NBD client on {' and '.join(SERVERS)} in User-Mode Linux: "
          f"{args.rounds} round(s), fio runs of {args.runtime} s, {SIZE / GiB:g} GiB "
          "backing on the guest's tmpfs", flush=True)
    print(provenance_line(facts), flush=True)
    t0 = time.monotonic()
    try:
        shared = tempfile.mkdtemp(prefix="bmig-bench-knbd-")
        PATHS.append(shared)
        guest_out = os.path.join(shared, "guest.json")
        timeout = 120 + args.rounds * len(SERVERS) * (2 * args.runtime + 120)
        vm = Proc("run-in-vm", [VM_SCRIPT, "-b", "uml", "-m", VM_MEMORY, "-t", str(timeout),
                                "-w", shared, "--", sys.executable, os.path.abspath(__file__),
                                "--guest", "--out", guest_out, "--rounds", str(args.rounds),
                                "--runtime", str(args.runtime)], log_path=None)
        vm.start(cwd=ROOT)           # its output is ours: the per-round lines as they come
        assert vm.proc is not None
        code = vm.proc.wait(timeout + 60)
        vm.stop()
        try:
            with open(guest_out) as f:
                guest_results = json.load(f)
        except (OSError, ValueError):
            raise RuntimeError(f"the VM exited with {code} and no results") from None
        if code != 0 or not guest_results.get("done"):
            raise RuntimeError(f"the VM exited with {code} after "
                               f"{len(guest_results['runs'])} server run(s)")
        out.update(guest_results)
    except (KeyboardInterrupt, Stopped):
        print("\ninterrupted; cleaning up", file=sys.stderr)
        return 130
    except RuntimeError as exc:
        print(f"bench/kernel_nbd.py: {exc}", file=sys.stderr)
        return 1
    finally:
        cleanup()
    out["total_seconds"] = round(time.monotonic() - t0, 1)
    changed = provenance_end(out)
    out["summary"] = summarize(out["runs"])
    print(f"\nguest kernel {out['kernel']} ({out['machine']}, one CPU; syscalls through "
          "ptrace): compare the ratios, not the absolute figures")
    print(report(out["summary"]))
    print(f"\ntotal {out['total_seconds']} s; load average before {out['loadavg_before']}, "
          f"after {out['loadavg_after']}")
    if changed:
        print(changed, file=sys.stderr)
    path = args.json or os.path.join(HERE, "results", f"kernel_nbd-{stamp}.json")
    save_json(path, out)
    print(f"results: {path}")
    return 0


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="1 round, fio runs of 5 s (explicit options still win)")
    p.add_argument("--rounds", type=int, help="rounds, each server once per round [3]")
    p.add_argument("--runtime", type=int, help="seconds per fio run [20]")
    p.add_argument("--json", metavar="FILE",
                   help="write the results here [bench/results/kernel_nbd-STAMP.json]")
    p.add_argument("--guest", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.rounds is None:
        args.rounds = 1 if args.quick else 3
    if args.runtime is None:
        args.runtime = 5 if args.quick else 20
    if args.rounds < 1 or args.runtime < 1:
        p.error("--rounds and --runtime must be positive")
    if args.guest and not (args.out and os.environ.get("RUN_IN_VM")):
        p.error("--guest runs only inside the VM the script boots")
    return args


def main() -> int:
    args = parse_args()
    return guest(args) if args.guest else host(args)


if __name__ == "__main__":
    sys.exit(main())
