#!/usr/bin/env python3
"""The dm intercept's costs, measured in a throw-away kernel (tests/kernel/run-in-vm.sh).

    python bench/dm.py [--quick] [--crash N] [--only-cutover]

On the host it boots the kernel (User-Mode Linux) and runs itself there. Measures:
- fio 4 KiB random writes, iodepth 32 (libaio, O_DIRECT) on a linear dm device, then on
  the same device with dm-era attached: IOPS and their ratio;
- the import of 1 % random dirty blocks of a 64 GiB device (sparse, on tmpfs) into breqd;
- how long attach and detach hold the device's I/O, median and max over 20 tries;
- the downtime of a cutover of a dm-tracked device both ways, by freezing it and through
  bmig-nbd (--via-nbd, protocol C), each under a fio load (4 KiB random writes, O_DIRECT,
  at CUTOVER_IOPS: the freeze needs a light one), to a breceive on 127.0.0.1
  (--only-cutover: only these);
- with --crash N: N rounds of kill -9 of bmig-dm or breqd under writes, then a sync that
  must be identical (tests/kernel/test_kernel_dm_crash.py with more rounds).
The machine may be shared: the load average is printed with the figures.
"""

from __future__ import annotations

import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
GiB, MiB = 1 << 30, 1 << 20
CUTOVER_IOPS = {"freeze": 10, "via-nbd": 200}   # the fio load under each way


def sh(*argv: str, timeout: float = 600, env: dict | None = None) -> str:
    done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=env,
                          stdin=subprocess.DEVNULL)
    if done.returncode:
        raise SystemExit(f"{' '.join(argv)}: {done.stderr.strip()}")
    return done.stdout


def bmigrate(env: dict, *args: str) -> dict:
    out = sh(sys.executable, "-c", "from bmig.cli.main import main; main()", *args,
             "--json", env=env)
    return json.loads(out.splitlines()[-1])


def fio_iops(path: str, seconds: int) -> float:
    out = sh("fio", "--name=w", f"--filename={path}", "--rw=randwrite", "--bs=4k",
             "--iodepth=32", "--ioengine=libaio", "--direct=1", f"--runtime={seconds}",
             "--time_based", "--size=64M", "--randseed=3", "--output-format=json")
    return float(json.loads(out)["jobs"][0]["write"]["iops"])


class Rig:
    def __init__(self, tmp: str, size: int, name: str):
        self.image = os.path.join(tmp, f"{name}.img")
        with open(self.image, "wb") as f:
            f.truncate(size)
        self.loop = sh("losetup", "--find", "--show", self.image).strip()
        self.name = name
        self.path = f"/dev/mapper/{name}"
        sh("dmsetup", "create", name, "--table", f"0 {size // 512} linear {self.loop} 0")

    def close(self) -> None:
        subprocess.run(["dmsetup", "remove", self.name], capture_output=True)
        subprocess.run(["losetup", "-d", self.loop], capture_output=True)


def in_vm(quick: bool, crash: int, only_cutover: bool = False) -> dict:
    from tests.daemon import Daemon, breqd_argv

    sh("modprobe", "-a", "dm-era", "dm-flakey", "loop")
    tmp = tempfile.mkdtemp(prefix="bench-dm.")
    breqd = Daemon(breqd_argv(f"{tmp}/state", f"{tmp}/devices.d", f"{tmp}/breqd.sock"),
                   f"{tmp}/breqd.log").start()
    env = dict(os.environ, BMIG_CONTROL=f"{tmp}/breqd.sock", BMIG_DM_STATE=f"{tmp}/dm")
    out: dict = {"load_before": open("/proc/loadavg").read().split()[:3], "quick": quick}
    try:
        if only_cutover:
            cutovers(out, env, tmp, quick)
            return out
        seconds = 5 if quick else 15
        rig = Rig(tmp, 256 * MiB, "fio")
        out["fio_linear_iops"] = fio_iops(rig.path, seconds)
        bmigrate(env, "track", "attach", "f1", "--dm", rig.path)
        out["fio_era_iops"] = fio_iops(rig.path, seconds)
        out["fio_ratio"] = round(out["fio_era_iops"] / out["fio_linear_iops"], 3)
        held = {"attach": [], "detach": []}
        for _ in range(5 if quick else 20):
            held["detach"].append(bmigrate(env, "track", "detach", "f1")["held_seconds"])
            held["attach"].append(bmigrate(env, "track", "attach", "f1", "--dm",
                                           rig.path)["held_seconds"])
        for kind, values in held.items():
            out[f"{kind}_held_ms_median"] = round(statistics.median(values) * 1000, 2)
            out[f"{kind}_held_ms_max"] = round(max(values) * 1000, 2)
            out[f"{kind}_tries"] = len(values)
        bmigrate(env, "track", "detach", "f1")
        rig.close()

        size = (8 if quick else 64) * GiB
        big = Rig(tmp, size, "big")
        bmigrate(env, "track", "attach", "b1", "--dm", big.path)
        importer = [sys.executable, "-c", "from bmig.cli.dm import main; main()",
                    "--control", env["BMIG_CONTROL"], "--dm-state", env["BMIG_DM_STATE"],
                    "--once", "b1"]
        sh(*importer, env=env)
        blocks = size // (64 << 10)
        chosen = random.Random(5).sample(range(blocks), blocks // 100)
        fd = os.open(big.path, os.O_WRONLY | os.O_DIRECT)
        import mmap
        buf = mmap.mmap(-1, 4096)
        try:
            for block in chosen:
                os.pwrite(fd, buf, block * (64 << 10))
        finally:
            os.close(fd)
        started = time.monotonic()
        sh(*importer, env=env)
        out["import_device_bytes"] = size
        out["import_dirty_blocks"] = len(chosen)
        out["import_seconds"] = round(time.monotonic() - started, 3)
        with open(os.path.join(env["BMIG_DM_STATE"], "b1.json")) as f:
            out["import_marked_bytes"] = json.load(f)["last_import_bytes"]
        bmigrate(env, "track", "detach", "b1")
        big.close()
        cutovers(out, env, tmp, quick)
    finally:
        breqd.stop()
    if crash:
        done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                               "tests/kernel/test_kernel_dm_crash.py"], cwd=ROOT,
                              env=dict(os.environ, BMIG_DM_CRASH_ROUNDS=str(crash)),
                              capture_output=True, text=True)
        out["crash_rounds_per_seed"] = crash
        out["crash_result"] = done.stdout.strip().splitlines()[-1]
    out["load_after"] = open("/proc/loadavg").read().split()[:3]
    return out


def cutovers(out: dict, env: dict, tmp: str, quick: bool) -> None:
    for way in ("freeze", "via-nbd"):
        try:
            out.update(cutover_downtime(env, tmp, way, quick))
        except (Exception, SystemExit) as exc:          # the other figures still count
            out[f"cutover_{way.replace('-', '_')}_error"] = str(exc)[-500:]


def cutover_downtime(env: dict, tmp: str, way: str, quick: bool) -> dict:
    """One cutover of a fresh 256 MiB dm-tracked device under fio: its downtime, wall time
    and what the switch onto bmig-nbd held (via-nbd only)."""
    import pathlib

    from tests.integration.sync_helpers import start_receiver

    name = "c" + way.replace("-", "")
    here = pathlib.Path(tmp) / name
    here.mkdir()
    rig = Rig(tmp, 256 * MiB, name)
    target = str(here / "target.img")
    with open(target, "wb") as f:
        f.truncate(256 * MiB)
    receiver = start_receiver(here, {name: target})
    fio = None
    try:
        bmigrate(env, "track", "attach", name, "--dm", rig.path)
        bmigrate(env, "sync", name, "--source", rig.path, "--to", receiver.url(name),
                 "--secret-file", receiver.secret_file)
        fio = subprocess.Popen(
            ["fio", "--name=w", f"--filename={rig.path}", "--rw=randwrite", "--bs=4k",
             "--iodepth=4", "--ioengine=libaio", "--direct=1",
             f"--rate_iops={CUTOVER_IOPS[way]}", "--runtime=600", "--time_based",
             "--size=64M", "--randseed=4"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(2 if quick else 5)                     # the load under way
        started = time.monotonic()
        result = bmigrate(env, "cutover", name, "--source", rig.path, "--to",
                          receiver.url(name), "--secret-file", receiver.secret_file,
                          "--record-dir", str(here / "records"),
                          *(["--via-nbd"] if way == "via-nbd" else []))
        wall = time.monotonic() - started
        steps = {s["step"]: s for s in result.get("steps", [])}
        key = way.replace("-", "_")
        out = {f"cutover_{key}_downtime_s": result["downtime_seconds"],
               f"cutover_{key}_wall_s": round(wall, 2),
               f"cutover_{key}_iops": CUTOVER_IOPS[way]}
        if way == "via-nbd":
            out["cutover_via_nbd_switch_held_ms"] = round(steps[0]["held_seconds"] * 1000, 2)
        return out
    finally:
        if fio is not None:
            fio.kill()
            fio.wait(30)
        subprocess.run([sys.executable, "-c", "from bmig.cli.main import main; main()", "track",
                        "detach", name], env=env, capture_output=True, timeout=120)
        rig.close()
        receiver.daemon.stop()


def main() -> None:
    quick = "--quick" in sys.argv
    crash = int(sys.argv[sys.argv.index("--crash") + 1]) if "--crash" in sys.argv else 0
    if os.environ.get("RUN_IN_VM"):
        print(json.dumps(in_vm(quick, crash, "--only-cutover" in sys.argv), indent=1))
        return
    host_load = open("/proc/loadavg").read().split()[:3]
    print(f"host load average before: {' '.join(host_load)} (2 cores, may be shared)",
          file=sys.stderr)
    script = os.path.join(ROOT, "tests", "kernel", "run-in-vm.sh")
    sys.exit(subprocess.call([script, "-b", "uml", "-m", "3G", "-t", "3000", "-w", ROOT, "--",
                              sys.executable, os.path.abspath(__file__), *sys.argv[1:]],
                             cwd=ROOT))


if __name__ == "__main__":
    main()
