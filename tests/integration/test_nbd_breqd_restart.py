"""breqd killed (kill -9) and restarted under load: writes fail or succeed, none untracked.

fio's nbd engine writes random data over the first half of the export the whole time; a
writer on our own NBD client writes patterns over the second half and records what the
server answered. breqd is killed twice and started again. Afterwards every chunk of the
backing file that differs from what it was (zeros) must be dirty in breqd (invariants 1
and 4), every write that was acknowledged must be in the backing file, and no request may
have hung.
"""

from __future__ import annotations

import json
import random
import subprocess
import threading

from bmig.nbdclient import NbdClient, NbdError
from bmig.errors import BmigError
from tests.daemon import wait_until
from tests.integration.nbd_helpers import require, start_nbd

MiB = 1 << 20
SIZE = 64 * MiB
HALF = SIZE // 2
BLOCK = 4096


class Writer(threading.Thread):
    """4 KiB pattern writes at random places in the second half; results recorded."""

    def __init__(self, uri: str):
        super().__init__(daemon=True)
        self.uri = uri
        self.ok: dict[int, int] = {}          # offset -> pattern byte of the last success
        self.failed = 0
        self.stop = threading.Event()
        self.error: BaseException | None = None
        self.count = 0

    def run(self) -> None:
        rng = random.Random(7)
        try:
            with NbdClient.connect(self.uri, timeout=60) as client:
                while not self.stop.is_set():
                    offset = HALF + rng.randrange(HALF // BLOCK) * BLOCK
                    pattern = rng.randrange(1, 256)
                    try:
                        client.pwrite(bytes([pattern]) * BLOCK, offset)
                    except NbdError as exc:
                        assert exc.errno_name == "EIO", exc
                        self.failed += 1
                    else:
                        self.ok[offset] = pattern
                    self.count += 1
        except BaseException as exc:      # reported by the test
            self.error = exc


def dirty_chunks(breqd, chunk: int) -> set[int]:
    runs, end = breqd.client().query("d1", 0, SIZE)
    assert end == SIZE
    return {c for offset, length in runs
            for c in range(offset // chunk, (offset + length - 1) // chunk + 1)}


def test_breqd_killed_and_restarted_under_fio_leaves_no_write_untracked(breqd, tmp_path):
    require("fio")
    server = start_nbd(breqd, tmp_path, SIZE)
    fio = subprocess.Popen(
        ["fio", "--name=load", "--ioengine=nbd", f"--uri={server.uri}", "--rw=randwrite",
         "--bs=4k", "--iodepth=16", f"--size={HALF}", "--time_based", "--runtime=600",
         "--norandommap", "--randrepeat=0", "--continue_on_error=all",
         "--output-format=json", f"--output={tmp_path / 'fio.json'}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    writer = Writer(server.uri)
    writer.start()
    try:
        for _ in range(2):
            done = len(writer.ok)
            wait_until(lambda: len(writer.ok) > done + 50 or writer.error, timeout=60,
                       what="writes to succeed")
            breqd.daemon.kill9()
            failed = writer.failed
            wait_until(lambda: writer.failed > failed or writer.error, timeout=60,
                       what="writes to fail while breqd is gone")
            breqd.restart()
        done = len(writer.ok)
        wait_until(lambda: len(writer.ok) > done + 50 or writer.error, timeout=60,
                   what="writes to succeed after the restart")
    finally:
        writer.stop.set()
        writer.join(timeout=60)
        fio.terminate()
        try:
            fio.wait(timeout=60)
        except subprocess.TimeoutExpired:
            fio.kill()
            fio.wait(timeout=60)
        fio.stderr.close()
        assert server.daemon.stop() == 0
    assert writer.error is None, writer.error
    assert not writer.is_alive()
    text = (tmp_path / "fio.json").read_text()
    report = json.loads(text[text.index("{"):])      # after fio's "terminating" line
    assert report["jobs"][0]["write"]["total_ios"] > 0

    chunk = breqd.client().stats("d1")["chunk_size"]
    dirty = dirty_chunks(breqd, chunk)
    changed = set()
    with open(server.backing, "rb") as f:
        for c in range(SIZE // chunk):
            if f.read(chunk) != bytes(chunk):
                changed.add(c)
    assert changed, "the load wrote nothing"
    untracked = sorted(changed - dirty)
    assert not untracked, f"chunks written but not dirty in breqd: {untracked[:10]}"
    with open(server.backing, "rb") as f:
        for offset, pattern in writer.ok.items():
            f.seek(offset)
            assert f.read(BLOCK) == bytes([pattern]) * BLOCK, offset
    assert writer.failed > 0
