"""ext4 on a dm device, mounted and written all along: attach, sync, cutover.

Runs only in a throw-away kernel (see test_kernel_dm.py). A writer creates, appends to,
renames and fsyncs files the whole time; dm-era is attached under the mounted device, a
full sync and more writes follow, then the freeze cutover. The file system is never
unmounted before the handover; the target passes e2fsck -fn and holds every file as it
was last fsynced (or as the write that the freeze caught left it).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import threading

import pytest

from tests.integration.sync_helpers import receivers, start_receiver  # noqa: F401
from tests.kernel.dm_helpers import (MiB, Volume, bmigrate, detach_metadata_loops, run,
                                     table)

pytestmark = pytest.mark.skipif(not os.environ.get("RUN_IN_VM"),
                                reason="needs device-mapper: runs in a VM")

SIZE = 24 * MiB


class FileWriter(threading.Thread):
    """Creates (write, fsync, rename, fsync the directory), appends (write, fsync) and
    remembers each file's content once fsync returned: ``durable``; ``pending`` is the
    content a write in progress would leave."""

    def __init__(self, root: str, seed: int, names: int = 24, pause: float = 0.0):
        super().__init__(daemon=True)
        self.root, self.rng = root, random.Random(seed)
        self.names, self.pause = names, pause     # how many files; seconds between ops
        self.durable: dict[str, str] = {}
        self.pending: dict[str, str] = {}
        self.content: dict[str, bytes] = {}
        self.stop = threading.Event()
        self.ops = 0
        self.error: OSError | None = None
        self.progress = threading.Condition()

    def run(self) -> None:
        try:
            while not self.stop.is_set():
                self._one()
                with self.progress:
                    self.ops += 1
                    self.progress.notify_all()
                if self.pause:
                    self.stop.wait(self.pause)
        except OSError as exc:          # the handed-over source refuses writes
            self.error = exc
        with self.progress:
            self.progress.notify_all()

    def wait_ops(self, n: int, timeout: float = 120) -> None:
        target = self.ops + n
        with self.progress:
            assert self.progress.wait_for(lambda: self.ops >= target or self.error
                                          or not self.is_alive(), timeout)

    def _one(self) -> None:
        name = f"file{self.rng.randrange(self.names)}"
        path = os.path.join(self.root, name)
        data = self.rng.randbytes(self.rng.choice([100, 4096, 20000, 70000]))
        if name in self.content and len(self.content[name]) < 256 * 1024 \
                and self.rng.random() < 0.5:
            new = self.content[name] + data
            self.pending[name] = sha(new)
            with open(path, "ab") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
        else:
            new = data
            tmp = path + ".tmp"
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            self.pending[name] = sha(new)
            os.rename(tmp, path)
            fd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        self.content[name] = new
        self.durable[name] = sha(new)
        self.pending.pop(name, None)


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.mark.timeout(400)
def test_ext4_written_all_along_is_cut_over_without_unmounting(breqd, tmp_path, receivers):
    run("modprobe", "-a", "dm-era", "dm-flakey", "loop")
    dm_state = str(tmp_path / "dm")
    vol = Volume(f"ext4v{os.getpid() % 1000}", str(tmp_path / "vol.img"), SIZE)
    mnt = str(tmp_path / "mnt")
    os.makedirs(mnt)
    target = str(tmp_path / "target.img")
    with open(target, "wb") as f:
        f.truncate(SIZE)
    receiver = start_receiver(tmp_path, {"d1": target})
    receivers.append(receiver)
    url = receiver.url("d1")
    secret = ["--secret-file", receiver.secret_file]
    mounted = False
    writer = FileWriter(os.path.join(mnt, "data"), seed=13)
    try:
        run("mkfs.ext4", "-q", "-F", "-E", "nodiscard", vol.path)
        run("mount", vol.path, mnt)
        mounted = True
        os.makedirs(os.path.join(mnt, "data"))
        writer.start()
        writer.wait_ops(20)
        bmigrate(breqd, dm_state, "track", "attach", "d1", "--dm", vol.path)
        assert table(vol.name) != vol.original
        writer.wait_ops(20)
        done = bmigrate(breqd, dm_state, "sync", "d1", "--source", vol.path, "--to", url,
                        *secret, "--json", check=False)
        assert done.returncode in (0, 15), done.stderr
        writer.wait_ops(30)
        done = bmigrate(breqd, dm_state, "cutover", "d1", "--source", vol.path, "--to", url,
                        *secret, "--record-dir", str(tmp_path / "records"), "--json",
                        check=False)
        assert done.returncode == 0, done.stderr
        events = [json.loads(line) for line in done.stdout.splitlines()]
        result = [e for e in events if e.get("event") == "cutover"][0]
        assert result["handed_over"] and result["downtime_seconds"] is not None
        assert os.path.ismount(mnt)                 # never unmounted before the handover
        writer.stop.set()
        writer.join(60)
        assert not writer.is_alive()
    finally:
        writer.stop.set()
        if mounted:
            run("umount", mnt, check=False)
        vol.close()
        detach_metadata_loops(dm_state)
    assert writer.ops > 70
    check = run("e2fsck", "-fn", target, check=False)
    assert check.returncode == 0, check.stdout + check.stderr
    tmnt = str(tmp_path / "tmnt")
    os.makedirs(tmnt)
    run("mount", "-o", "ro,loop,noload", target, tmnt)
    try:
        for name, durable in writer.durable.items():
            with open(os.path.join(tmnt, "data", name), "rb") as f:
                got = sha(f.read())
            assert got in (durable, writer.pending.get(name)), name
    finally:
        run("umount", tmnt, check=False)
