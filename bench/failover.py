#!/usr/bin/env python3
"""Failover figures: promotion after the source's death, rejoin, catch-up after a partition.

    promote   the HA replication (protocol C) runs under a writer; kill -9 of bmig-nbd,
              breqd and the HA process (the source host dies); the time from the kill to
              a promoted, writable copy served by bmig-nbd on the target host (bmigrate
              promote --no-fence --track, bmig-nbd started, one write answered): the
              median over --tries (10)
    rejoin    a device synced and promoted; the new primary is written for --write-seconds
              (60) to 1 % of it, the old source has a few chunks it never shipped; the
              rejoin sync's bytes against the union of both dirty sets, and its time
              against a full resync of the same device
    catch-up  the HA replication through a relay that stops forwarding for
              --partition-seconds (30) under a writer: the time from the link's return to
              synchronous again

    python bench/failover.py                 # 4 GiB device, 10 tries, 60 s, 30 s
    python bench/failover.py --quick         # 256 MiB, 3 tries, 5 s, 5 s
    python bench/failover.py --json out.json

Everything runs on 127.0.0.1 in a temporary directory, removed at the end, with every
process it started stopped. The machine may be shared: the load average is printed.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

from benchlib import loadavg, provenance, provenance_end, provenance_line, table  # noqa: E402
from bmig.nbdclient import NbdClient  # noqa: E402
from tests.daemon import wait_until  # noqa: E402
from tests.integration.failover_helpers import (PartitionRelay, dirty_chunks,  # noqa: E402
                                                second_host, serve, wait_state)
from tests.integration.nbd_helpers import Writer  # noqa: E402
from tests.integration.sync_helpers import (CHUNK, Background, bmigrate,  # noqa: E402
                                            start_receiver, summary_of, sync)

MiB = 1 << 20


class Host:
    """breqd (and later bmig-nbd) on directories of their own: one host."""

    def __init__(self, root: Path, name: str):
        self.root = root / name
        self.breqd = second_host(root, name)
        self.nbd = None

    def track(self, backing: str, size: int) -> None:
        client = self.breqd.client()
        client.add_device("d1", size)
        client.clear_all("d1", force=True)
        client.close()

    def serve(self, backing: str):
        self.nbd = serve(self.breqd, backing, str(self.root))
        return self.nbd

    def stop(self) -> None:
        if self.nbd is not None:
            self.nbd.daemon.stop()
        self.breqd.stop()


def image(path: Path, size: int, fill: bool) -> str:
    with open(path, "wb") as f:
        if fill:
            block = os.urandom(MiB)
            for _ in range(size // MiB):
                f.write(block)
        else:
            f.truncate(size)
    return str(path)


def ha(host: Host, url: str, secret: str) -> Background:
    return Background(host.breqd, "replicate", "d1", "--keep", "--to", url, "--source",
                      host.nbd.backing, "--secret-file", secret, "--manage-dir",
                      host.nbd.manage_dir, "--control", host.breqd.control, "--json",
                      "--ack-timeout", "2")


def one_promotion(root: Path, size: int) -> float:
    source = Host(root, "source")
    backing = image(root / "source.img", size, False)
    source.track(backing, size)
    source.serve(backing)
    r = start_receiver(root, {"d1": str(root / "target.img")})
    keeper = ha(source, r.url("d1"), r.secret_file)
    target = None
    writer = Writer(source.nbd.uri, per_second=200, size=size)
    try:
        wait_state(keeper, "synchronous", timeout=300)
        writer.start()
        wait_until(lambda: writer.writes >= 100, timeout=60, what="writes")
        target = Host(root, "target")       # the target host's breqd runs already
        started = time.monotonic()
        source.nbd.daemon.kill9()
        source.breqd.daemon.kill9()
        keeper.kill9()
        bmigrate(target.breqd, "promote", "d1", "--target", str(root / "target.img"),
                 "--receiver-state-dir", r.state_dir, "--no-fence", "--track")
        served = target.serve(str(root / "target.img"))
        with NbdClient.connect(served.uri) as client:
            client.pwrite(b"w" * 4096, 0)
        return time.monotonic() - started
    finally:
        writer.stop.set()
        writer.join(timeout=30)
        keeper.close()
        r.daemon.stop()
        source.stop()
        if target is not None:
            target.stop()


def rejoin(root: Path, size: int, write_seconds: float) -> dict:
    source = Host(root, "old")
    backing = image(root / "old.img", size, True)
    source.track(backing, size)
    copy = str(root / "copy.img")
    r = start_receiver(root, {"d1": copy})
    new = None
    back = None
    try:
        sync(source.breqd, "d1", "--source", backing, "--to", r.url("d1"), "--secret-file",
             r.secret_file, "--threshold", "0")
        source.serve(backing)
        rng = random.Random(5)
        with NbdClient.connect(source.nbd.uri) as client:   # written, never shipped
            for _ in range(max(1, size // CHUNK // 1000)):
                client.pwrite(rng.randbytes(4096), rng.randrange(size // 4096) * 4096)
            client.flush()
        source.nbd.daemon.kill9()
        source.nbd = None
        r.daemon.stop()
        new = Host(root, "new")
        bmigrate(new.breqd, "promote", "d1", "--target", copy, "--receiver-state-dir",
                 r.state_dir, "--no-fence", "--track")
        served = new.serve(copy)
        region = max(CHUNK, size // 100)
        writer = Writer(served.uri, per_second=300, size=size, low=size // 2,
                        high=size // 2 + region)
        writer.start()
        time.sleep(write_seconds)          # the workload's duration, not synchronisation
        writer.finish()
        union = dirty_chunks(source.breqd, size) | dirty_chunks(new.breqd, size)
        state = str(root / "old-breceive-state")
        bmigrate(source.breqd, "rejoin", "d1", "--backing", backing, "--receiver-state-dir",
                 state, "--manage-dir", str(root / "nothing"))
        back = start_receiver(root, {"d1": backing, "full": str(root / "full.img")},
                              name="old-breceive")
        started = time.monotonic()
        done = summary_of(sync(new.breqd, "d1", "--source", copy, "--to", back.url("d1"),
                               "--secret-file", back.secret_file, "--threshold", "0",
                               "--json"))
        rejoin_seconds = time.monotonic() - started
        full_host = Host(root, "full")
        full_host.track(copy, size)
        full_host.breqd.client().set_all_dirty("d1")
        started = time.monotonic()
        full = summary_of(sync(full_host.breqd, "d1", "--source", copy, "--to",
                               back.url("full"), "--secret-file", back.secret_file,
                               "--threshold", "0", "--json"))
        full_seconds = time.monotonic() - started
        full_host.stop()
        return {"union_bytes": len(union) * CHUNK, "sent": done["bytes_committed"],
                "ratio": round(done["bytes_committed"] / max(1, len(union) * CHUNK), 3),
                "rejoin_seconds": round(rejoin_seconds, 2),
                "full_bytes": full["bytes_committed"],
                "full_seconds": round(full_seconds, 2),
                "speedup": round(full_seconds / max(rejoin_seconds, 1e-3), 1)}
    finally:
        for h in (source, new):
            if h is not None:
                h.stop()
        for rec in (r, back):
            if rec is not None:
                rec.daemon.stop()


def catch_up(root: Path, size: int, partition_seconds: float) -> dict:
    source = Host(root, "src")
    backing = image(root / "src.img", size, False)
    source.track(backing, size)
    source.serve(backing)
    r = start_receiver(root, {"d1": str(root / "dst.img")})
    relay = PartitionRelay(("127.0.0.1", r.port)).start()
    keeper = ha(source, r.url("d1", port=relay.port), r.secret_file)
    writer = Writer(source.nbd.uri, per_second=400, size=size)
    try:
        wait_state(keeper, "synchronous", timeout=300)
        writer.start()
        relay.partition()
        wait_state(keeper, "degraded", after=keeper.seen, timeout=120)
        time.sleep(partition_seconds)      # the partition's length
        lag = dirty_chunks(source.breqd, size)
        relay.heal()
        healed = time.monotonic()
        wait_state(keeper, "synchronous", after=keeper.seen, timeout=600)
        return {"partition_seconds": partition_seconds, "dirty_at_heal": len(lag) * CHUNK,
                "seconds_to_synchronous": round(time.monotonic() - healed, 2),
                "writes": writer.writes}
    finally:
        writer.stop.set()
        writer.join(timeout=30)
        keeper.close()
        relay.stop()
        r.daemon.stop()
        source.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small and short")
    parser.add_argument("--size-mib", type=int)
    parser.add_argument("--tries", type=int)
    parser.add_argument("--write-seconds", type=float)
    parser.add_argument("--partition-seconds", type=float)
    parser.add_argument("--json", metavar="FILE")
    args = parser.parse_args()
    size = (args.size_mib or (256 if args.quick else 4096)) * MiB
    tries = args.tries or (3 if args.quick else 10)
    write_seconds = args.write_seconds or (5.0 if args.quick else 60.0)
    partition = args.partition_seconds or (5.0 if args.quick else 30.0)
    facts = provenance()
    print(provenance_line(facts), flush=True)
    print(f"load average at start: {loadavg()} (the machine may be shared)", flush=True)
    out: dict = {**facts, "size": size}
    with tempfile.TemporaryDirectory(prefix="bmig-failover-") as tmp:
        times = []
        for i in range(tries):
            root = Path(tmp) / f"promote-{i}"
            root.mkdir()
            times.append(one_promotion(root, 64 * MiB))
        out["promote_seconds"] = [round(t, 3) for t in times]
        print(table(["promotion (64 MiB, protocol C)", "median s", "min s", "max s"],
                    [[f"{tries} tries", round(statistics.median(times), 3),
                      round(min(times), 3), round(max(times), 3)]]), flush=True)
        root = Path(tmp) / "rejoin"
        root.mkdir()
        out["rejoin"] = rj = rejoin(root, size, write_seconds)
        print(table(["rejoin", "union", "sent", "sent/union", "s", "full resync s",
                     "full/rejoin"],
                    [[f"{size // MiB} MiB, {write_seconds:g} s of writes",
                      rj["union_bytes"], rj["sent"], rj["ratio"], rj["rejoin_seconds"],
                      rj["full_seconds"], rj["speedup"]]]), flush=True)
        root = Path(tmp) / "catchup"
        root.mkdir()
        out["catch_up"] = cu = catch_up(root, size, partition)
        print(table(["catch-up", "dirty at the link's return", "s to synchronous"],
                    [[f"{partition:g} s partition", cu["dirty_at_heal"],
                      cu["seconds_to_synchronous"]]]), flush=True)
    print(f"load average at end: {loadavg()}")
    end = provenance_end(out)
    if end:
        print(end)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
