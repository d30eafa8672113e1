"""bmigrate sync to a plain NBD server (qemu-nbd, nbdkit) on a Unix socket.

An NBD target keeps no lineage: the summary's relation is "none", and each sync ships
everything again, unless --checksum, which compares per-chunk hashes (read back over
NBD) and sends only what differs. A target smaller than the source is refused with one
line and exit status 11. Sizes are not multiples of the chunk size.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess

import pytest

from tests.daemon import wait_until
from tests.integration.sync_helpers import (CHUNK, MiB, digest, make_image, same_bytes,
                                            summary_of, sync, track)

SIZE = 8 * MiB + 12345            # not a multiple of the chunk size, nor of 512
SERVERS = ["qemu-nbd", "nbdkit"]


def server_argv(kind: str, sock: str, path: str) -> list[str]:
    if kind == "qemu-nbd":
        return ["qemu-nbd", "-f", "raw", "-k", sock, path, "-t", "--discard=unmap"]
    return ["nbdkit", "-f", "-U", sock, "file", path]


def answers(sock: str) -> bool:
    if not os.path.exists(sock):
        return False
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        try:
            s.connect(sock)
        except OSError:
            return False
    return True


class NbdServe:
    """qemu-nbd or nbdkit serving ``path`` on a Unix socket, until stop()."""

    def __init__(self, kind: str, directory: str, path: str):
        if shutil.which(kind) is None:
            pytest.skip(f"{kind} is not installed")
        self.kind = kind
        self.sock = os.path.join(directory, f"{kind}.sock")
        self.log_path = os.path.join(directory, f"{kind}.log")
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(server_argv(kind, self.sock, path),
                                         stdin=subprocess.DEVNULL, stdout=log, stderr=log)
        try:
            wait_until(lambda: self.proc.poll() is not None or answers(self.sock),
                       timeout=20, what=f"{kind} to listen on {self.sock}")
            assert self.proc.poll() is None, f"{kind} exited:\n{self.log()}"
        except BaseException:
            self.stop()
            raise

    @property
    def url(self) -> str:
        return f"nbd+unix:///?socket={self.sock}"

    def log(self) -> str:
        with open(self.log_path, errors="replace") as f:
            return f.read()

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=20)
        return self.proc.returncode


@pytest.fixture(params=SERVERS)
def kind(request) -> str:
    return request.param


@pytest.fixture
def served(tmp_path):
    """Start NBD servers with served(kind, path); all stopped at teardown."""
    started: list[NbdServe] = []

    def serve(kind: str, path: str) -> NbdServe:
        server = NbdServe(kind, str(tmp_path), path)
        started.append(server)
        return server

    yield serve
    for server in reversed(started):
        server.stop()


def presized(path: str, size: int) -> str:
    with open(path, "wb") as f:
        f.truncate(size)
    return path


def test_sync_to_an_nbd_server_is_byte_identical_and_has_no_lineage(breqd, tmp_path,
                                                                    served, kind):
    source = make_image(str(tmp_path / "src.img"), SIZE, "mixed")
    target = presized(str(tmp_path / "tgt.img"), SIZE)
    track(breqd, "d", source)
    server = served(kind, target)
    args = ["d", "--source", source, "--to", server.url, "--json"]

    first = summary_of(sync(breqd, *args))
    assert same_bytes(source, target)
    assert first["relation"] == "none" and first["converged"] and first["dirty_bytes"] == 0
    assert first["target"] == server.url
    assert first["bytes_committed"] == SIZE
    assert first["bytes_zero"] > 0 and 0 < first["bytes_sent"] < SIZE
    assert first["bytes_sent"] <= first["bytes_read"]     # raw: NBD has no compression
    assert breqd.client().stats("d")["dirty_bytes"] == 0

    # No lineage: the next sync cannot know the target is up to date, so it ships it all.
    second = sync(breqd, *args)
    events = [json.loads(line) for line in second.stdout.splitlines()]
    notes = [e["message"] for e in events if e["event"] == "note"]
    assert any("holds no copy" in n for n in notes), notes
    again = events[-1]
    assert again["relation"] == "none" and again["bytes_committed"] == SIZE
    assert again["bytes_sent"] == first["bytes_sent"]
    assert again["bytes_zero"] == first["bytes_zero"]
    assert same_bytes(source, target)

    # --checksum reads the target's chunks back and sends none of them.
    checked = summary_of(sync(breqd, *args, "--checksum"))
    assert checked["relation"] == "none" and checked["converged"]
    assert checked["bytes_same"] == SIZE and checked["bytes_sent"] == 0
    assert checked["bytes_committed"] == SIZE
    assert same_bytes(source, target) and os.path.getsize(target) == SIZE


def test_checksum_sends_only_the_chunks_that_differ(breqd, tmp_path, served, kind):
    size = 24 * MiB + 777
    source = make_image(str(tmp_path / "src.img"), size, "random", seed=5)
    target = str(tmp_path / "tgt.img")
    shutil.copyfile(source, target)                 # an older copy, stale in places
    stale = list(range(0, size // CHUNK, 7))
    with open(target, "r+b") as f:
        for chunk in stale:
            f.seek(chunk * CHUNK + 100)
            f.write(b"\xee" * 200)
    track(breqd, "d", source)
    server = served(kind, target)
    summary = summary_of(sync(breqd, "d", "--source", source, "--to", server.url,
                              "--checksum", "--window", "4M", "--json"))
    assert same_bytes(source, target)
    assert summary["bytes_same"] == size - len(stale) * CHUNK
    assert summary["bytes_sent"] == len(stale) * CHUNK


def test_an_nbd_target_smaller_than_the_source_is_refused(breqd, tmp_path, served, kind):
    source = make_image(str(tmp_path / "src.img"), SIZE, "mixed")
    target = presized(str(tmp_path / "tgt.img"), 4 * MiB)
    with open(target, "r+b") as f:
        f.write(b"old data" * 1000)
    before = digest(target)
    track(breqd, "d", source)
    server = served(kind, target)
    done = sync(breqd, "d", "--source", source, "--to", server.url, check=False)
    assert done.returncode == 11, done.stderr
    lines = done.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("bmigrate: "), done.stderr
    assert f"has {4 * MiB} bytes, the source {SIZE}" in lines[0]
    assert server.url in lines[0]
    assert digest(target) == before and os.path.getsize(target) == 4 * MiB
    stats = breqd.client().stats("d")
    assert stats["dirty_bytes"] == SIZE and stats["inflight_bytes"] == 0
    assert server.proc.poll() is None                 # the server is fine with it
