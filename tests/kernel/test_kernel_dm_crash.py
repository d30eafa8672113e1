"""kill -9 of the importer (bmig-dm) and of breqd at random moments while a writer writes
to the dm-tracked device: after restarts and a final sync, source and target are the same
bytes (a re-import is harmless; an era counts as imported only once breqd has it).

Runs only in a throw-away kernel (see test_kernel_dm.py). A few seeded iterations here;
bench/dm.py --crash runs many.
"""

from __future__ import annotations

import os
import random
import threading
import time

import pytest

from tests.daemon import Daemon
from tests.integration.sync_helpers import receivers, start_receiver  # noqa: F401
from tests.kernel.dm_helpers import (MiB, Volume, bmig_dm_argv, bmigrate,
                                     detach_metadata_loops, run, same_content, write_at)

pytestmark = pytest.mark.skipif(not os.environ.get("RUN_IN_VM"),
                                reason="needs device-mapper: runs in a VM")

SIZE = 8 * MiB
ROUNDS = int(os.environ.get("BMIG_DM_CRASH_ROUNDS", "4"))


class BlockWriter(threading.Thread):
    """4 KiB O_DIRECT writes at random offsets until stopped; ``error`` if one fails."""

    def __init__(self, path: str, seed: int):
        super().__init__(daemon=True)
        self.path, self.rng = path, random.Random(seed)
        self.stop = threading.Event()
        self.count = 0
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            while not self.stop.is_set():
                write_at(self.path, self.rng.randrange(SIZE // 4096) * 4096,
                         self.rng.randbytes(4096))
                self.count += 1
        except BaseException as exc:      # noqa: BLE001 - the test reports it
            self.error = exc


def crash_rounds(breqd, daemon: Daemon, rng: random.Random, rounds: int) -> Daemon:
    for _ in range(rounds):
        time.sleep(rng.uniform(0.05, 0.8))          # a random moment, not a sync point
        if rng.random() < 0.5:
            daemon.kill9()
            daemon = Daemon(daemon.argv, daemon.log_path).start()
        else:
            breqd.daemon.kill9()
            breqd.restart()
    return daemon


@pytest.mark.timeout(300)
@pytest.mark.parametrize("seed", [1, 2])
def test_kill9_of_the_importer_and_of_breqd_under_writes_loses_nothing(
        breqd, tmp_path, receivers, seed):
    run("modprobe", "-a", "dm-era", "loop")
    dm_state = str(tmp_path / "dm")
    vol = Volume(f"crash{os.getpid() % 1000}", str(tmp_path / "vol.img"), SIZE)
    target = str(tmp_path / "target.img")
    with open(target, "wb") as f:
        f.truncate(SIZE)
    receiver = start_receiver(tmp_path, {"d1": target})
    receivers.append(receiver)
    sync = ("sync", "d1", "--source", vol.path, "--to", receiver.url("d1"),
            "--secret-file", receiver.secret_file)
    writer = BlockWriter(vol.path, seed)
    daemon = None
    try:
        bmigrate(breqd, dm_state, "track", "attach", "d1", "--dm", vol.path)
        writer.start()
        # The first copy, under the writer: done, or it stops as not converging (exit 10:
        # the import after each pass shows the writer dirtying the whole device again).
        assert bmigrate(breqd, dm_state, *sync, check=False).returncode in (0, 10, 15)
        daemon = Daemon(bmig_dm_argv(breqd, dm_state, "--interval", "0.1", "d1"),
                        str(tmp_path / "bmig-dm.log")).start()
        daemon = crash_rounds(breqd, daemon, random.Random(seed), ROUNDS)
        writer.stop.set()
        writer.join(30)
        assert writer.error is None, writer.error
        assert writer.count > 0
        daemon.stop()
        done = bmigrate(breqd, dm_state, *sync, check=False)
        assert done.returncode == 0, done.stderr          # identical
        assert same_content(vol.path, target, SIZE)
    finally:
        writer.stop.set()
        if daemon is not None:
            daemon.stop()
        run("dmsetup", "resume", "bmig-d1-era", check=False)
        vol.close()
        detach_metadata_loops(dm_state)
