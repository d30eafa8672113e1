#!/usr/bin/env python3
"""bmigrate sync against the tools a user would otherwise copy a device with, in one run.

    .venv/bin/python bench/sync.py                  # all five cases, 4 GiB, 3 rounds (~6 min)
    .venv/bin/python bench/sync.py --quick          # 1 GiB, 1 round (~80 s)
    .venv/bin/python bench/sync.py --only 1,3 --repeat 5
    .venv/bin/python bench/sync.py --target-dir /srv/scratch --shm-dir none --json out.json

Everything runs as a user would run it: a real breqd, a real breceive on 127.0.0.1 (its
port from its STATUS= on a private NOTIFY_SOCKET), `bmigrate track add`, `bmigrate track
set-dirty` and `bmigrate sync --json` as subprocesses (the last JSON line is the summary).
Each bmig measurement is compared with a peer measured in the same run, in the same
directory, rounds interleaved (the first peer of a round rotates), medians reported:

  1  full sync of --size random bytes over loopback TCP into a file, against
     `socat -u -b 1048576` (file -> TCP -> file); both end with the same fsync of the
     target, and the time is until it returned. On --target-dir (the disk) with a fresh
     target file and with one whose pages are cached, and on --shm-dir (tmpfs), where
     tls:// (client certificates, no shared secret: TLS's encryption instead of the AEAD
     tcp:// seals every frame with) runs beside; and what sealing and opening a GiB costs
     in one process. Targets: bmig >= 0.9x socat's throughput on disk; >= 0.8x on tmpfs
     over tcp:// (with the AEAD) and tls://.
  2  full sync of an ext4 image of --size built with `mkfs.ext4 -d` from copies of
     /usr/share, /usr/lib/python3*, /usr/bin, /usr/lib (about 32 % of the image in files),
     against the same socat copy, with bmigrate --level 0 (never compress) and
     --compress always (every frame) beside; then the three again through a --bwlimit of
     100M (a slow link). Targets: >= 1.5x socat; the default (adaptive) no more than 10 %
     behind either of the two, on loopback and on the slow link.
  3  incremental: after a full sync of the random image, 1 % of its 64 KiB chunks
     rewritten at random (marked in breqd first, as bmig-nbd does), then `bmigrate sync`;
     against the full sync (target: <= 3 % of its time) and against a hash-compare scan of
     both files (xxh3-64 and blake2b per 64 KiB chunk, single-threaded, as blocksync or
     bdsync must do; target: bmig >= 20x faster).
  4  SSH to a throw-away sshd on 127.0.0.1: bmigrate with paramiko and with openssh
     (aes128-gcm@openssh.com) against `ssh -c aes128-gcm@openssh.com HOST 'cat > FILE'`;
     the client's CPU (bmigrate with its ssh child, or ssh) and the server's (sshd's
     sessions with breceive or cat). Targets: openssh >= 0.9x, paramiko >= 0.6x.
  5  memory: peak RSS of bmigrate (wait4's ru_maxrss) and breceive (VmHWM, reset through
     /proc/PID/clear_refs before each sync) for a 1 GiB random file and a 64 GiB sparse
     file holding the same 1 GiB, with the default --window (256M) and --window 64M.
     Target: the 64 GiB peak within 1.10x of the 1 GiB peak (--sparse-size for others).

Every process runs in its own session (sshd and what it spawns are found through /proc)
and is stopped at the end, also on Ctrl-C, SIGTERM, SIGHUP or an error; every file goes
too, and nothing else is touched.

One file over 500 lines on purpose: a benchmark is a script, read top to bottom
beside its figures in bench/README.md; what the scripts share is in benchlib.py.
"""

from __future__ import annotations

import argparse
import functools
import contextlib
import glob
import hashlib
import json
import os
import random
import re
import resource
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

import xxhash  # noqa: E402

import benchlib  # noqa: E402
from benchlib import (BMIGRATE, BRECEIVE, PATHS, START_TIMEOUT,  # noqa: E402
                      STOP_TIMEOUT, child_env, cleanup, evict, fs_type,
                      install_signal_handlers, provenance, provenance_end,
                      provenance_line, remove, run_bmigrate, save_json, start_breqd,
                      start_notified)
from bmig.config import parse_size  # noqa: E402
from bmig.processes import Stopped  # noqa: E402
from bmig.constants import GiB, KiB, MiB  # noqa: E402
from bmig.tracker.blocking_client import TrackerClient  # noqa: E402

CHUNK = 64 * KiB
SOCAT_BUFFER = MiB
SSH_CIPHER = "aes128-gcm@openssh.com"
SSHD = "/usr/sbin/sshd"
MARK_BATCH = 256               # ranges per MARK in case 3
SCAN_READ = 4 * MiB            # read size of the reference hash scan
DIRTY_FRACTION = 0.01          # case 3
MEM_PIECE = 4 * MiB            # case 5: the 1 GiB is spread in pieces of this size
RETENTION_SESSIONS = 8         # case 5: sessions one breceive serves in the retention probe
MEM_SPARSE_SIZE = 64 * GiB
MEM_DATA_SIZE = 1 * GiB
IMAGE_DATA_FRACTION = 0.32     # of the image, in files
IMAGE_SOURCES = ("/usr/share", "/usr/lib/python3*", "/usr/bin", "/usr/lib")
# sshd is started as a child subreaper (prctl PR_SET_CHILD_SUBREAPER = 36, kept across
# exec): a remote command that outlives its connection stays below sshd, where the
# cleanup finds it (as tests/sshd.py does).
SUBREAPER_EXEC = ("import ctypes, os, sys; ctypes.CDLL(None).prctl(36, 1, 0, 0, 0); "
                  "os.execv(sys.argv[1], sys.argv[1:])")


def _tool(name: str) -> str | None:
    """On PATH, or next to this Python (the virtualenv's bin)."""
    here = os.path.join(os.path.dirname(sys.executable), name)
    return shutil.which(name) or (here if os.access(here, os.X_OK) else None)



CASES = {
    "1": "full sync, random data, loopback TCP, vs socat",
    "2": "full sync, ext4 image, vs socat",
    "3": "incremental sync (1 % of chunks), vs full sync and a hash scan",
    "4": "SSH, vs ssh cat",
    "5": "memory vs device size and --window",
}


# -- process bookkeeping ---------------------------------------------------------------

class Proc(benchlib.Proc):
    def __init__(self, label: str, argv: list[str], log_path: str, subreaper: bool = False):
        super().__init__(label, argv, log_path)
        self.subreaper = subreaper    # stop its descendants first (sshd)

    def start(self, env: dict[str, str] | None = None, stdin: str | None = None,
              stdout: str | None = None, **kwargs) -> "Proc":
        """stdin from the file ``stdin``, stdout to the file ``stdout`` (else the log)."""
        with contextlib.ExitStack() as stack:
            fin = stack.enter_context(open(stdin, "rb")) if stdin else subprocess.DEVNULL
            fout = stack.enter_context(open(stdout, "wb")) if stdout else None
            super().start(env, stdin=fin, stdout=fout, **kwargs)
        return self

    def reset_peak(self) -> bool:
        """Reset VmHWM to the current RSS (clear_refs 5, Linux >= 4.0)."""
        try:
            with open(f"/proc/{self.pid}/clear_refs", "w") as f:
                f.write("5")
            return True
        except OSError:
            return False

    def wait(self, timeout: float) -> resource.struct_rusage:
        """Wait for the exit with wait4, which gives this process's own rusage (peak RSS,
        CPU); killed after ``timeout`` seconds."""
        assert self.proc is not None
        killed = threading.Event()

        def kill() -> None:
            killed.set()
            self.signal(signal.SIGKILL)

        timer = threading.Timer(timeout, kill)
        timer.daemon = True
        timer.start()
        try:
            _, status, usage = os.wait4(self.pid, 0)
        finally:
            timer.cancel()
        self.proc.returncode = os.waitstatus_to_exitcode(status)
        if killed.is_set():
            raise RuntimeError(f"{self.label} did not finish in {timeout:.0f} s:\n"
                               f"{self.log_tail()}")
        return usage

    def before_stop(self) -> None:
        if self.subreaper:
            stop_descendants(self.pid)


def descendants(pid: int) -> list[int]:
    """Every live process below ``pid`` (from /proc), children first."""
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    parents[int(entry)] = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
    found, frontier = [], [pid]
    while frontier:
        parent = frontier.pop()
        children = [c for c, p in parents.items() if p == parent]
        found.extend(children)
        frontier.extend(children)
    return found


def stop_descendants(pid: int) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for child in descendants(pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(child, sig)
        deadline = time.monotonic() + STOP_TIMEOUT
        while descendants(pid) and time.monotonic() < deadline:
            time.sleep(0.02)
        if not descendants(pid):
            return


# -- files -------------------------------------------------------------------------------

def fsync_path(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_random(path: str, size: int, fill: Callable[[int], bytes] = os.urandom) -> None:
    """``size`` bytes of ``fill`` output, made durable so writeback does not disturb the
    runs that follow."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        left = size
        while left:
            block = fill(min(16 * MiB, left))
            os.write(fd, block)
            left -= len(block)
        os.fsync(fd)
    finally:
        os.close(fd)


def prefill(path: str, size: int) -> None:
    """A file that exists at full size with every page written (tmpfs: allocated)."""
    zeros = bytes(16 * MiB)
    write_random(path, size, lambda n: zeros[:n])


def data_bytes(path: str) -> int:
    """Bytes in data runs (SEEK_DATA / SEEK_HOLE)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        size, pos, total = os.fstat(fd).st_size, 0, 0
        while pos < size:
            try:
                start = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError:
                break
            end = os.lseek(fd, start, os.SEEK_HOLE)
            total += end - start
            pos = end
        return total
    finally:
        os.close(fd)


def allocated(path: str) -> int:
    return os.stat(path).st_blocks * 512


def file_digest(path: str, size: int) -> str:
    """xxh3-128 of the first ``size`` bytes (a short file reads as zeros past its end)."""
    h = xxhash.xxh3_128()
    buf = bytearray(8 * MiB)
    fd = os.open(path, os.O_RDONLY)
    try:
        pos = 0
        while pos < size:
            n = min(len(buf), size - pos)
            view = memoryview(buf)[:n]
            got = os.preadv(fd, [view], pos)
            if got < n:
                view[got:] = bytes(n - got)
            h.update(view)
            pos += n
    finally:
        os.close(fd)
    return h.hexdigest()


def same_content(a: str, b: str, size: int) -> bool:
    return file_digest(a, size) == file_digest(b, size)


def data_runs(path: str) -> list[tuple[int, int]]:
    fd = os.open(path, os.O_RDONLY)
    try:
        size, pos, runs = os.fstat(fd).st_size, 0, []
        while pos < size:
            try:
                start = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError:            # ENXIO: no data after pos
                break
            end = os.lseek(fd, start, os.SEEK_HOLE)
            runs.append((start, end - start))
            pos = end
        return runs
    finally:
        os.close(fd)


def same_sparse(a: str, b: str) -> bool:
    """Equal content of two mostly sparse files without reading their holes: a's data runs
    compared byte for byte, and b's data outside them must read as zeros."""
    def read(fd: int, offset: int, length: int) -> bytes:
        return os.pread(fd, length, offset).ljust(length, b"\0")

    fa, fb = os.open(a, os.O_RDONLY), os.open(b, os.O_RDONLY)
    try:
        if os.fstat(fa).st_size > os.fstat(fb).st_size:
            return False
        ours = data_runs(a)
        for offset, length in ours:
            for pos in range(offset, offset + length, 8 * MiB):
                n = min(8 * MiB, offset + length - pos)
                if read(fa, pos, n) != read(fb, pos, n):
                    return False
        covered = IntervalCover(ours)
        for offset, length in data_runs(b):
            for start, n in covered.outside(offset, length):
                for pos in range(start, start + n, 8 * MiB):
                    m = min(8 * MiB, start + n - pos)
                    if read(fb, pos, m).count(0) != m:
                        return False
        return True
    finally:
        os.close(fa)
        os.close(fb)


class IntervalCover:
    """Sorted, disjoint (offset, length) runs; what of a range lies outside them."""

    def __init__(self, runs: list[tuple[int, int]]):
        self.runs = sorted(runs)

    def outside(self, offset: int, length: int) -> list[tuple[int, int]]:
        out, pos, end = [], offset, offset + length
        for start, n in self.runs:
            if start + n <= pos:
                continue
            if start >= end:
                break
            if start > pos:
                out.append((pos, start - pos))
            pos = max(pos, start + n)
        if pos < end:
            out.append((pos, end - pos))
        return out


HASHES: dict[str, Callable[[memoryview], bytes | int]] = {
    "xxh3": xxhash.xxh3_64_intdigest,
    "blake2b": lambda v: hashlib.blake2b(v, digest_size=32).digest(),
}


def hash_scan(src: str, dst: str, size: int, algo: str, chunk: int = CHUNK) -> dict:
    """The reference a tool without a dirty bitmap must run: read both sides in full and
    compare a hash per chunk. One thread; both files read in SCAN_READ pieces."""
    digest = HASHES[algo]
    a, b = bytearray(SCAN_READ), bytearray(SCAN_READ)
    va, vb = memoryview(a), memoryview(b)
    differ = 0
    t0 = time.monotonic()
    fs, fd = os.open(src, os.O_RDONLY), os.open(dst, os.O_RDONLY)
    try:
        for f in (fs, fd):
            os.posix_fadvise(f, 0, 0, os.POSIX_FADV_SEQUENTIAL)
        pos = 0
        while pos < size:
            n = min(SCAN_READ, size - pos)
            if os.preadv(fs, [va[:n]], pos) != n or os.preadv(fd, [vb[:n]], pos) != n:
                raise RuntimeError(f"short read scanning {src} / {dst} at {pos}")
            for i in range(0, n, chunk):
                if digest(va[i:i + chunk]) != digest(vb[i:i + chunk]):
                    differ += 1
            pos += n
    finally:
        os.close(fs)
        os.close(fd)
    return {"seconds": time.monotonic() - t0, "differing_chunks": differ}


def copy_tree(sources: Iterable[str], dest: str, budget: int) -> dict:
    """Copies of real files (and symlinks) until ``budget`` bytes of file data."""
    total = files = links = 0
    taken: list[str] = []
    roots: list[str] = []
    for pattern in sources:
        roots.extend(sorted(glob.glob(pattern)))
    seen: set[str] = set()
    for root in roots:
        root = os.path.realpath(root)
        if root in seen or not os.path.isdir(root):
            continue
        seen.add(root)
        name = os.path.basename(root)
        taken.append(root)
        for dirpath, dirnames, filenames in os.walk(root):
            filenames.extend(d for d in dirnames if os.path.islink(os.path.join(dirpath, d)))
            dirnames[:] = sorted(d for d in dirnames
                                 if not os.path.islink(os.path.join(dirpath, d)))
            # /usr/lib/python3* were taken already when /usr/lib comes
            dirnames[:] = [d for d in dirnames
                           if os.path.realpath(os.path.join(dirpath, d)) not in seen]
            rel = os.path.relpath(dirpath, root)
            out_dir = os.path.normpath(os.path.join(dest, name, rel))
            os.makedirs(out_dir, exist_ok=True)
            for fname in sorted(filenames):
                src = os.path.join(dirpath, fname)
                out = os.path.join(out_dir, fname)
                try:
                    if os.path.islink(src):
                        os.symlink(os.readlink(src), out)
                        links += 1
                    elif os.path.isfile(src):
                        shutil.copyfile(src, out)
                        total += os.path.getsize(out)
                        files += 1
                except OSError:
                    continue
                if total >= budget:
                    return {"bytes": total, "files": files, "symlinks": links,
                            "from": taken}
    return {"bytes": total, "files": files, "symlinks": links, "from": taken}


# -- readiness ---------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tcp_listening(port: int) -> bool:
    """Something is in LISTEN on ``port`` (from /proc/net/tcp, without connecting: socat
    would take a probe for the transfer)."""
    for name in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError), open(name) as f:
            next(f)
            for line in f:
                parts = line.split()
                if parts[3] == "0A" and int(parts[1].rsplit(":", 1)[1], 16) == port:
                    return True
    return False


def wait_for(condition: Callable[[], bool], what: str, p: Proc | None = None,
             timeout: float = START_TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    delay = 0.002
    while not condition():
        if p is not None and not p.alive():
            raise RuntimeError(f"{p.label} exited with {p.proc.returncode} before "
                               f"{what}:\n{p.log_tail()}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(delay)
        delay = min(delay * 2, 0.05)


# -- the bmig side -------------------------------------------------------------------------

@dataclass
class Receiver:
    proc: Proc
    port: int
    exports: dict[str, str]
    scheme: str = "tcp"

    def url(self, export: str) -> str:
        return f"{self.scheme}://127.0.0.1:{self.port}/{export}"


@dataclass
class TlsFiles:
    """A throw-away CA, a server certificate for 127.0.0.1 and a client certificate."""
    ca: str
    server_cert: str
    server_key: str
    client_cert: str
    client_key: str

    def sender_args(self) -> list[str]:
        return ["--tls-ca", self.ca, "--tls-cert", self.client_cert, "--tls-key",
                self.client_key, "--trust-tls-server"]


def make_tls(directory: str) -> TlsFiles:
    import datetime
    import ipaddress
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.timezone.utc)

    def issue(subject: str, key, issuer_name, issuer_key, ca: bool, server: bool):
        builder = (x509.CertificateBuilder()
                   .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
                   .issuer_name(issuer_name).public_key(key.public_key())
                   .serial_number(x509.random_serial_number())
                   .not_valid_before(now - datetime.timedelta(hours=1))
                   .not_valid_after(now + datetime.timedelta(days=1))
                   .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
        if server:
            builder = builder.add_extension(x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        return builder.sign(issuer_key, hashes.SHA256())

    def save(name: str, data: bytes) -> str:
        path = os.path.join(directory, name)
        with open(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "wb") as f:
            f.write(data)
        return path

    pem = serialization.Encoding.PEM
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "bench CA")])
    ca_cert = issue("bench CA", ca_key, ca_name, ca_key, True, False)
    files = {"ca": save("tls-ca.pem", ca_cert.public_bytes(pem))}
    for who in ("server", "client"):
        key = ec.generate_private_key(ec.SECP256R1())
        cert = issue(f"bench {who}", key, ca_name, ca_key, False, who == "server")
        files[f"{who}_cert"] = save(f"tls-{who}.pem", cert.public_bytes(pem))
        files[f"{who}_key"] = save(f"tls-{who}.key", key.private_bytes(
            pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    return TlsFiles(**files)


def aead_cost(total: int = GiB, frame: int = 4 * MiB) -> dict:
    """CPU seconds per GiB that sealing and opening the frames of a copy cost, in this
    process (bmig.wire.seal, the AEAD of tcp:// after authentication)."""
    from bmig.wire.seal import Opener, Sealer
    key = os.urandom(32)
    sealer, opener = Sealer(key), Opener(key, "bench")
    body = os.urandom(frame)
    prefix = b"\0" * 8
    cpu0 = time.process_time()
    for _ in range(total // frame):
        opener.open(prefix, sealer.seal(prefix, body))
    cpu = time.process_time() - cpu0
    return {"seal_and_open_cpu_per_gib": round(cpu * GiB / total, 3),
            "seal_and_open_mbps": round(total / cpu / 1e6, 1)}


@dataclass
class Sshd:
    proc: Proc
    port: int
    user: str
    identity: str
    known_hosts: str


@dataclass
class Bench:
    args: argparse.Namespace
    work: str               # sources, state, logs, sockets
    tdir: str               # targets
    shm: str | None         # case 1's second target directory
    breqd: Proc | None = None
    devices: set[str] = field(default_factory=set)
    secret: str = ""
    tls: TlsFiles | None = None
    profiles: int = 0
    sources: dict[str, str] = field(default_factory=dict)

    def path(self, name: str) -> str:
        return os.path.join(self.work, name)

    @property
    def control(self) -> str:
        return self.path("breqd.sock")

    def env(self) -> dict[str, str]:
        return child_env(BMIG_CONTROL=self.control)

    def timeout(self, size: int) -> float:
        return 120.0 + size / (10 * MiB)

    # breqd and devices
    def start_breqd(self) -> None:
        self.breqd = start_breqd(self.work, self.control)

    def bmigrate(self, *args: str, timeout: float = 120.0) -> str:
        """A short bmigrate command (track add, set-dirty); its stdout."""
        return run_bmigrate(self.env(), *args, timeout=timeout)

    def track(self, name: str, path: str) -> None:
        if name not in self.devices:
            self.bmigrate("track", "add", name, "--size-of", path)
            self.devices.add(name)

    def set_dirty(self, name: str) -> None:
        self.bmigrate("track", "set-dirty", name)

    def start_receiver(self, label: str, exports: dict[str, str],
                       tls: "TlsFiles | None" = None) -> Receiver:
        """breceive on 127.0.0.1; with ``tls``, speaking TLS and knowing senders by their
        client certificate alone (no shared secret, so no AEAD on top of TLS)."""
        argv = [*BRECEIVE, "--listen", "127.0.0.1:0",
                "--state-dir", self.path(f"{label}-state"), "--log-level", "info"]
        if tls is None:
            argv += ["--secret-file", self.secret]
        else:
            argv += ["--tls-cert", tls.server_cert, "--tls-key", tls.server_key,
                     "--tls-client-ca", tls.ca]
        for export, path in exports.items():
            argv += ["--target", f"{export}={path}"]
        pattern = r"STATUS=listening on 127\.0\.0\.1:(\d+)"
        p = Proc(label, argv, self.path(f"{label}.log"))
        notes = start_notified(p, self.work, child_env(), pattern)
        port = int(re.search(pattern, "\n".join(notes)).group(1))
        return Receiver(p, port, dict(exports), "tls" if tls else "tcp")

    # one bmigrate sync
    def sync(self, label: str, device: str, source: str, url: str, target: str | None,
             extra: Iterable[str] = (), receiver: Proc | None = None,
             size: int = 0) -> dict:
        """Time ``bmigrate sync`` from its start until it exited and an fsync of the
        target returned; its summary, CPU and peak RSS; the receiver's CPU and peak."""
        out = self.path(f"{label}.out")
        argv = [*BMIGRATE, "sync", device, "--source", source, "--to", url, "--json",
                "--threshold", "0", *extra]
        if url.startswith("tcp://"):
            argv += ["--secret-file", self.secret]
        elif url.startswith("tls://"):
            assert self.tls is not None
            argv += self.tls.sender_args()
        profiler = None
        if self.args.profile:
            self.profiles += 1
            base = os.path.join(self.args.profile, f"{self.profiles:03d}-{label}")
            pyspy = _tool("py-spy") or "py-spy"
            argv = [pyspy, "record", "-f", "raw", "--threads", "-r", "200", "-o",
                    base + "-bmigrate.txt", "--", *argv]
            if receiver is not None:
                profiler = Proc(f"py-spy {label}", [pyspy, "record", "-f", "raw",
                                                    "--threads", "-r", "200", "-o",
                                                    base + "-breceive.txt", "-p",
                                                    str(receiver.pid)],
                                self.path("py-spy.log")).start()
                time.sleep(1.0)          # attached
        if receiver is not None:
            receiver.reset_peak()
            rcpu0 = receiver.cpu_seconds()
        p = Proc(f"bmigrate {label}", argv, self.path(f"{label}.log"))
        t0 = time.monotonic()
        p.start(self.env(), stdout=out)
        usage = p.wait(self.timeout(size))
        if target is not None and os.path.exists(target):
            fsync_path(target)
        wall = time.monotonic() - t0
        if profiler is not None:
            profiler.proc.send_signal(signal.SIGINT)
            with contextlib.suppress(subprocess.TimeoutExpired):
                profiler.proc.wait(30)
            profiler.stop()
        r = {"seconds": wall, "cpu": usage.ru_utime + usage.ru_stime,
             "rss": usage.ru_maxrss * KiB}
        if receiver is not None:
            if not receiver.alive():
                raise RuntimeError(f"{receiver.label} exited with "
                                   f"{receiver.proc.returncode}:\n{receiver.log_tail()}")
            r["receiver_cpu"] = receiver.cpu_seconds() - rcpu0
            mem = receiver.memory()
            r["receiver_hwm"], r["receiver_rss"] = mem["VmHWM"], mem["VmRSS"]
        if p.proc.returncode != 0:
            raise RuntimeError(f"bmigrate sync ({label}) exited with {p.proc.returncode}:\n"
                               f"{p.log_tail()}")
        summary = last_summary(out)
        if summary is None:
            raise RuntimeError(f"bmigrate sync ({label}) printed no summary:\n{p.log_tail()}")
        for key in ("bytes_read", "bytes_sent", "bytes_zero", "bytes_committed",
                    "compression_ratio", "relation", "passes", "converged"):
            r[key] = summary.get(key)
        r["sync_seconds"] = summary.get("seconds")
        if not summary.get("converged") or summary.get("dirty_bytes"):
            raise RuntimeError(f"bmigrate sync ({label}) did not converge: {summary}")
        remove(out)
        remove(self.path(f"{label}.log"))
        return r


def last_summary(path: str) -> dict | None:
    with open(path, errors="replace") as f:
        for line in reversed(f.read().splitlines()):
            with contextlib.suppress(ValueError):
                event = json.loads(line)
                if isinstance(event, dict) and event.get("event") == "summary":
                    return event
    return None


# -- the peers -------------------------------------------------------------------------------

def socat_copy(b: Bench, label: str, src: str, dst: str, fresh: bool, size: int) -> dict:
    """socat file -> TCP -> file with 1 MiB buffers; the listener is up before the clock
    starts (as breceive is), the time ends when the fsync of the target returned."""
    write_opts = "creat,trunc" if fresh else "wronly"
    for _ in range(5):
        port = free_port()
        listener = Proc(f"socat-listen {label}",
                        ["socat", "-u", "-b", str(SOCAT_BUFFER),
                         f"TCP-LISTEN:{port},reuseaddr,bind=127.0.0.1",
                         f"OPEN:{dst},{write_opts}"], b.path("socat.log")).start()
        try:
            wait_for(lambda: tcp_listening(port), f"socat listening on {port}", listener)
            break
        except RuntimeError:
            if listener.alive():
                raise
            listener.stop()          # lost the port to someone else: another one
    else:
        raise RuntimeError("socat found no free port in 5 attempts")
    sender = Proc(f"socat-send {label}", ["socat", "-u", "-b", str(SOCAT_BUFFER),
                                          f"OPEN:{src}", f"TCP:127.0.0.1:{port}"],
                  b.path("socat.log"))
    t0 = time.monotonic()
    sender.start()
    u1 = sender.wait(b.timeout(size))
    u2 = listener.wait(b.timeout(size))
    fsync_path(dst)
    wall = time.monotonic() - t0
    for p in (sender, listener):
        p.stop()
        if p.proc.returncode != 0:
            raise RuntimeError(f"{p.label} exited with {p.proc.returncode}:\n{p.log_tail()}")
    return {"seconds": wall, "cpu": u1.ru_utime + u1.ru_stime,
            "receiver_cpu": u2.ru_utime + u2.ru_stime}


def ssh_cat(b: Bench, sshd: Sshd, label: str, src: str, dst: str, size: int) -> dict:
    argv = ssh_base(sshd) + ["--", "127.0.0.1", f"cat > {shlex.quote(dst)}"]
    p = Proc(f"ssh-cat {label}", argv, b.path("ssh.log"))
    t0 = time.monotonic()
    p.start(stdin=src)
    usage = p.wait(b.timeout(size))
    fsync_path(dst)
    wall = time.monotonic() - t0
    p.stop()
    if p.proc.returncode != 0:
        raise RuntimeError(f"ssh cat exited with {p.proc.returncode}:\n{p.log_tail()}")
    return {"seconds": wall, "cpu": usage.ru_utime + usage.ru_stime}


def sessions_cpu(sshd: Sshd) -> float:
    """CPU seconds of every session sshd has ended: its children's, as wait4 added them up
    (cutime + cstime in /proc/PID/stat): the session processes with what they ran."""
    with open(f"/proc/{sshd.proc.pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[13]) + int(fields[14])) / os.sysconf("SC_CLK_TCK")


def sessions_ended(sshd: Sshd) -> None:
    wait_for(lambda: not descendants(sshd.proc.pid), "the SSH session to end", sshd.proc)


def ssh_base(sshd: Sshd) -> list[str]:
    """The options bmigrate --ssh-program openssh gives ssh (bmig.wire.ssh.openssh_argv),
    so both ssh clients are configured alike."""
    return ["ssh", "-o", "BatchMode=yes", "-o", "ConnectTimeout=10", "-p", str(sshd.port),
            "-l", sshd.user, "-i", sshd.identity, "-o", "IdentitiesOnly=yes",
            "-o", f"UserKnownHostsFile={sshd.known_hosts}", "-o", "StrictHostKeyChecking=yes",
            "-c", SSH_CIPHER, "-o", "LogLevel=ERROR", "-o", "ControlPath=none", "-e", "none",
            "-T"]


def start_sshd(b: Bench) -> Sshd:
    """A throw-away sshd on 127.0.0.1 for the current user, keys in the work directory."""
    d = b.path("sshd")
    os.makedirs(d, exist_ok=True)
    with contextlib.suppress(PermissionError):
        os.makedirs("/run/sshd", mode=0o755, exist_ok=True)    # privilege separation
    keys = {}
    for name in ("ssh_host_ed25519_key", "id_ed25519"):
        path = os.path.join(d, name)
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "bmig-bench",
                        "-f", path], check=True, capture_output=True, timeout=30)
        with open(path + ".pub") as f:
            keys[name] = " ".join(f.read().split()[:2])
    with open(os.path.join(d, "authorized_keys"), "w") as f:
        f.write(keys["id_ed25519"] + "\n")
    user = "root" if os.getuid() == 0 else os.environ.get("USER") or os.getlogin()
    for _ in range(5):
        port = free_port()
        lines = [f"Port {port}", "ListenAddress 127.0.0.1",
                 f"HostKey {os.path.join(d, 'ssh_host_ed25519_key')}",
                 f"PidFile {os.path.join(d, 'sshd.pid')}",
                 f"AuthorizedKeysFile {os.path.join(d, 'authorized_keys')}",
                 "PermitRootLogin prohibit-password", "StrictModes no", "UsePAM no",
                 "PubkeyAuthentication yes", "PasswordAuthentication no",
                 "KbdInteractiveAuthentication no", "X11Forwarding no", "PrintMotd no",
                 "LogLevel INFO"]
        config = os.path.join(d, "sshd_config")
        for extra in (["PerSourcePenalties no"], []):      # OpenSSH >= 9.8 knows it
            with open(config, "w") as f:
                f.write("\n".join(lines + extra) + "\n")
            test = subprocess.run([SSHD, "-t", "-f", config], capture_output=True,
                                  text=True, timeout=30)
            if test.returncode == 0:
                break
        else:
            raise RuntimeError(f"sshd rejects the configuration: {test.stderr.strip()}")
        p = Proc("sshd", [sys.executable, "-c", SUBREAPER_EXEC, SSHD, "-D", "-e", "-f",
                          config], os.path.join(d, "sshd.log"), subreaper=True).start()
        try:
            wait_for(lambda: tcp_listening(port), f"sshd on port {port}", p)
            break
        except RuntimeError:
            if p.alive() or "Address already in use" not in p.log_tail():
                raise
            p.stop()
    else:
        raise RuntimeError("sshd found no free port in 5 attempts")
    known = os.path.join(d, "known_hosts")
    with open(known, "w") as f:
        f.write(f"[127.0.0.1]:{port} {keys['ssh_host_ed25519_key']}\n")
    return Sshd(p, port, user, os.path.join(d, "id_ed25519"), known)


# -- cases -------------------------------------------------------------------------------

def rotate(items: list, n: int) -> list:
    k = n % len(items)
    return items[k:] + items[:k]


def mbps(size: int, seconds: float) -> float:
    return size / seconds / 1e6


def record(out: dict, case: str, variant: str, peer: str, rnd: int, r: dict,
           size: int | None = None) -> dict:
    r = {"case": case, "variant": variant, "peer": peer, "round": rnd, **r}
    if size:
        r["size"] = size
        r["mbps"] = round(mbps(size, r["seconds"]), 1)
    r["seconds"] = round(r["seconds"], 3)
    out["runs"].append(r)
    extra = ""
    if "bytes_sent" in r and r.get("bytes_sent") is not None:
        extra = f", sent {r['bytes_sent'] / MiB:,.0f} MiB"
    if "rss" in r and case == "5":
        extra += f", bmigrate peak {r['rss'] / MiB:,.1f} MiB"
        if "receiver_hwm" in r:
            extra += f", breceive peak {r['receiver_hwm'] / MiB:,.1f} MiB"
    rate = f" ({r['mbps']:,.0f} MB/s)" if "mbps" in r else ""
    print(f"  {case}/{variant} round {rnd}: {peer} {r['seconds']:.2f} s{rate}{extra}",
          flush=True)
    return r


def random_source(b: Bench, key: str, size: int) -> str:
    if key not in b.sources:
        path = b.path(f"{key}.img")
        PATHS.append(path)
        t0 = time.monotonic()
        write_random(path, size)
        print(f"  made {os.path.basename(path)}: {size / MiB:,.0f} MiB from os.urandom in "
              f"{time.monotonic() - t0:.1f} s", flush=True)
        b.sources[key] = path
    return b.sources[key]


def target_mode(args, directory: str) -> str:
    if args.target_file != "auto":
        return args.target_file
    return "existing" if fs_type(directory) == "tmpfs" else "fresh"


def prepare_target(path: str, size: int, mode: str) -> None:
    """fresh: no file (each peer creates it); existing: there at full size, pages
    written once (so tmpfs pays no first touch during the runs)."""
    if mode == "fresh":
        remove(path)
    elif not os.path.exists(path) or os.path.getsize(path) != size \
            or allocated(path) < size:
        remove(path)
        prefill(path, size)


def case1(b: Bench, out: dict) -> None:
    args = b.args
    size = args.size
    src = random_source(b, "random", size)
    b.track("c1", src)
    # the disk as asked (a fresh target file), the disk again with a target file whose
    # pages are in the page cache already (this VM makes fresh pages expensive, see
    # bench/README.md), tmpfs
    variants = [("disk", b.tdir, target_mode(args, b.tdir))]
    if args.target_file == "auto" and variants[0][2] == "fresh":
        variants.append(("disk-existing", b.tdir, "existing"))
    if b.shm:
        variants.append(("shm", b.shm, target_mode(args, b.shm)))
    exports = {f"c1-{name}": os.path.join(d, "c1.img") for name, d, _ in variants}
    recv = b.start_receiver("breceive", exports)
    # tls:// beside tcp:// on tmpfs: TLS with client certificates and no shared secret,
    # i.e. TLS's encryption in place of the AEAD that tcp:// seals its frames with
    b.tls = b.tls or make_tls(b.work)
    tls_recv = b.start_receiver("breceive-tls", exports, tls=b.tls) if b.shm else None
    info = out.setdefault("case1", {"size": size, "variants": {}})
    info["aead"] = aead_cost()
    print(f"case 1: sealing and opening cost {info['aead']['seal_and_open_cpu_per_gib']} "
          f"CPU-s per GiB in one process ({info['aead']['seal_and_open_mbps']:,.0f} MB/s)",
          flush=True)
    try:
        for name, d, mode in variants:
            target = exports[f"c1-{name}"]
            PATHS.append(target)
            info["variants"][name] = {"dir": d, "fs": fs_type(d), "target_file": mode}
            print(f"case 1/{name}: {size / MiB:,.0f} MiB of random data into {d} "
                  f"({fs_type(d)}), target file {mode}", flush=True)
            peers = ["bmig", "socat"] + (["bmig tls"] if name == "shm" and tls_recv else [])
            for rnd in range(args.repeat):
                for peer in rotate(peers, rnd):
                    prepare_target(target, size, mode)
                    if peer.startswith("bmig"):
                        b.set_dirty("c1")
                        via = tls_recv if peer == "bmig tls" else recv
                        assert via is not None
                        r = b.sync(f"c1-{name}-{peer.replace(' ', '-')}-{rnd}", "c1", src,
                                   via.url(f"c1-{name}"), target, receiver=via.proc,
                                   size=size)
                    else:
                        r = socat_copy(b, f"c1-{name}-{rnd}", src, target, mode == "fresh",
                                       size)
                    if rnd == args.repeat - 1 and not same_content(src, target, size):
                        raise RuntimeError(f"case 1/{name}: {peer}'s target differs from "
                                           "the source")
                    record(out, "1", name, peer, rnd, r, size)
            remove(target)
    finally:
        recv.proc.stop()
        if tls_recv is not None:
            tls_recv.proc.stop()


def build_image(b: Bench, size: int) -> tuple[str, dict]:
    files = b.path("image-files")
    image = b.path("ext4.img")
    PATHS.extend([files, image])
    budget = int(size * IMAGE_DATA_FRACTION)
    t0 = time.monotonic()
    copied = copy_tree(IMAGE_SOURCES, files, budget)
    t1 = time.monotonic()
    done = subprocess.run(["mkfs.ext4", "-q", "-F", "-d", files, image, str(size // KiB)],
                          capture_output=True, text=True, timeout=1800,
                          start_new_session=True)
    if done.returncode != 0:
        raise RuntimeError(f"mkfs.ext4 -d failed ({done.returncode}): {done.stderr.strip()}")
    fsync_path(image)
    remove(files)
    info = {"file_bytes": copied["bytes"], "files": copied["files"],
            "symlinks": copied["symlinks"], "copied_from": copied["from"],
            "image_size": os.path.getsize(image), "image_allocated": allocated(image),
            "image_data_runs": data_bytes(image), "copy_seconds": round(t1 - t0, 1),
            "mkfs_seconds": round(time.monotonic() - t1, 1)}
    print(f"  ext4 image: {info['files']:,} files + {info['symlinks']:,} symlinks, "
          f"{info['file_bytes'] / MiB:,.0f} MiB of file data copied from "
          f"{', '.join(info['copied_from'])} in {info['copy_seconds']} s; mkfs.ext4 -d "
          f"{info['mkfs_seconds']} s; image {size / MiB:,.0f} MiB, allocated "
          f"{info['image_allocated'] / MiB:,.0f} MiB, data runs "
          f"{info['image_data_runs'] / MiB:,.0f} MiB", flush=True)
    return image, info


LINK_LIMIT = "100M"
LINK_VARIANT = f"ext4, --bwlimit {LINK_LIMIT}"


def case2(b: Bench, out: dict) -> None:
    args = b.args
    size = args.size
    print(f"case 2: ext4 image of {size / MiB:,.0f} MiB into {b.tdir} "
          f"({fs_type(b.tdir)})", flush=True)
    image, info = build_image(b, size)
    b.track("c2", image)
    target = os.path.join(b.tdir, "c2.img")
    PATHS.append(target)
    mode = target_mode(args, b.tdir)
    out["case2"] = {"size": size, "image": info, "dir": b.tdir, "fs": fs_type(b.tdir),
                    "target_file": mode}
    recv = b.start_receiver("breceive", {"c2": target})
    # "bmig --level 0": holes and zero chunks as ranges, no zstd; it tells the part of
    # compression from the part of skipping. "--compress always": every frame
    # compressed. The default (adaptive) is to keep up with the better of the two: raw
    # where the CPU is the limit (loopback on two shared cores), compressed where the
    # link is (LINK_LIMIT, a --bwlimit standing in for a slow network).
    bmigs = ["bmig", "bmig --level 0", "bmig --compress always"]
    variants = [("ext4", [], bmigs + ["socat"]), (LINK_VARIANT, ["--bwlimit", LINK_LIMIT], bmigs)]
    try:
        for variant, extra, peers in variants:
            for rnd in range(args.repeat):
                for peer in rotate(peers, rnd):
                    prepare_target(target, size, mode)
                    if peer.startswith("bmig"):
                        b.set_dirty("c2")
                        r = b.sync(f"c2-{len(extra)}-{rnd}", "c2", image, recv.url("c2"),
                                   target, peer.split()[1:] + extra, receiver=recv.proc,
                                   size=size)
                    else:
                        r = socat_copy(b, f"c2-{rnd}", image, target, mode == "fresh", size)
                    r["target_allocated"] = allocated(target)
                    if rnd == args.repeat - 1 and not same_content(image, target, size):
                        raise RuntimeError(f"case 2: {peer}'s target differs from the image")
                    record(out, "2", variant, peer, rnd, r, size)
    finally:
        recv.proc.stop()
        remove(target)


def rewrite_chunks(b: Bench, device: str, path: str, size: int, rng: random.Random,
                   count: int | None = None) -> int:
    """``count`` chunks (1 % of them if not given), chosen at random, rewritten with
    random bytes in place; each batch marked in breqd before it is written, as bmig-nbd
    does."""
    chunks = size // CHUNK
    if count is None:
        count = max(1, round(chunks * DIRTY_FRACTION))
    picked = sorted(rng.sample(range(chunks), count))
    fd = os.open(path, os.O_WRONLY)
    try:
        with TrackerClient(b.control, timeout=60.0, client="bench-sync") as client:
            for i in range(0, len(picked), MARK_BATCH):
                batch = [(c * CHUNK, CHUNK) for c in picked[i:i + MARK_BATCH]]
                client.mark(device, batch)
                for offset, length in batch:
                    os.pwrite(fd, rng.randbytes(length), offset)
        os.fsync(fd)
    finally:
        os.close(fd)
    return len(picked)


def incremental_round(b: Bench, src: str, target: str, recv: Receiver, rnd: int,
                      rng: random.Random, suffix: str, peers: list[str], out: dict) -> dict:
    """Rewrite 1 % of the chunks, then the peers in this round's order: the scans
    (they find the rewritten chunks if they come before the sync, none after it) and
    the incremental sync; then check that the target is the source again. With
    suffix " (cold cache)" both files leave the page cache before each peer."""
    size = b.args.size
    written = rewrite_chunks(b, "c3", src, size, rng)
    check = {"round": rnd, "cache": "cold" if suffix else "warm",
             "chunks_rewritten": written, "scans": []}
    synced = False
    for peer in rotate(peers, rnd):
        if suffix:
            evict(src, target)
        if peer == "bmig incremental":
            r = b.sync(f"c3-incr-{rnd}{suffix.strip(' ()').replace(' ', '-')}", "c3", src,
                       recv.url("c3"), target, receiver=recv.proc, size=written * CHUNK)
            synced = True
            record(out, "3", "random", peer + suffix, rnd, r)
            continue
        algo = peer.split()[1]
        r = hash_scan(src, target, size, algo)
        want = 0 if synced else written
        check["scans"].append({"algo": algo, "after_sync": synced,
                               "differing_chunks": r["differing_chunks"], "expected": want})
        if r["differing_chunks"] != want:
            raise RuntimeError(f"case 3: the {algo} scan found {r['differing_chunks']} "
                               f"differing chunks, expected {want}")
        record(out, "3", "random", peer + suffix, rnd, r, size)
    if not any(sc["after_sync"] for sc in check["scans"]):
        v = hash_scan(src, target, size, "xxh3")
        check["scans"].append({"algo": "xxh3", "after_sync": True, "untimed": True,
                               "differing_chunks": v["differing_chunks"], "expected": 0})
        if v["differing_chunks"]:
            raise RuntimeError(f"case 3: after the incremental sync {v['differing_chunks']} "
                               "chunks still differ")
    check["identical"] = same_content(src, target, size)
    if not check["identical"]:
        raise RuntimeError("case 3: the target differs from the source after the "
                           "incremental sync")
    return check


def case3(b: Bench, out: dict) -> None:
    args = b.args
    size = args.size
    src = random_source(b, "random", size)
    b.track("c3", src)
    target = os.path.join(b.tdir, "c3.img")
    PATHS.append(target)
    mode = target_mode(args, b.tdir)
    chunks = size // CHUNK
    info = out["case3"] = {"size": size, "chunks": chunks, "dir": b.tdir,
                           "fs": fs_type(b.tdir), "target_file": mode, "checks": []}
    print(f"case 3: {size / MiB:,.0f} MiB random image into {b.tdir} ({fs_type(b.tdir)}); "
          f"{DIRTY_FRACTION:.0%} of {chunks:,} chunks rewritten, then scans and sync with "
          "both files in the page cache"
          + (", and again with both evicted first" if args.cold else ""), flush=True)
    recv = b.start_receiver("breceive", {"c3": target})
    rng = random.Random(args.seed)
    try:
        for rnd in range(args.repeat):
            prepare_target(target, size, mode)
            b.set_dirty("c3")
            r = b.sync(f"c3-full-{rnd}", "c3", src, recv.url("c3"), target,
                       receiver=recv.proc, size=size)
            record(out, "3", "random", "bmig full", rnd, r, size)
            phases = [("", ["scan xxh3", "scan blake2b", "bmig incremental"])]
            if args.cold:
                phases.append((" (cold cache)", ["scan xxh3", "bmig incremental"]))
            for suffix, peers in phases:
                check = incremental_round(b, src, target, recv, rnd, rng, suffix, peers, out)
                info["checks"].append(check)
            r = b.sync(f"c3-noop-{rnd}", "c3", src, recv.url("c3"), target,
                       receiver=recv.proc, size=0)
            record(out, "3", "random", "bmig nothing dirty", rnd, r)
    finally:
        recv.proc.stop()
        remove(target)


def case4(b: Bench, out: dict) -> None:
    args = b.args
    size = args.ssh_size
    src = random_source(b, "ssh-random", size)
    b.track("c4", src)
    target = os.path.join(b.tdir, "c4.img")
    PATHS.append(target)
    sshd = start_sshd(b)
    breceive = os.path.join(os.path.dirname(sys.executable), "breceive")
    remote = (shlex.quote(breceive) if os.access(breceive, os.X_OK)
              else " ".join(shlex.quote(a) for a in BRECEIVE))
    command = (f"{remote} --stdio --target c4={shlex.quote(target)} --state-dir "
               f"{shlex.quote(b.path('ssh-breceive-state'))}")
    out["case4"] = {"size": size, "dir": b.tdir, "fs": fs_type(b.tdir), "cipher": SSH_CIPHER,
                    "ssh_command": command, "target_file": "fresh",
                    "ssh": subprocess.run(["ssh", "-V"], capture_output=True,
                                          text=True).stderr.strip()}
    print(f"case 4: {size / MiB:,.0f} MiB random file over SSH ({SSH_CIPHER}) to "
          f"127.0.0.1:{sshd.port} into {b.tdir} ({fs_type(b.tdir)}), fresh target file",
          flush=True)
    url = f"ssh://{sshd.user}@127.0.0.1:{sshd.port}/c4"
    try:
        for rnd in range(args.repeat):
            for peer in rotate(["bmig paramiko", "bmig openssh", "ssh cat"], rnd):
                remove(target)
                server0 = sessions_cpu(sshd)
                if peer == "ssh cat":
                    r = ssh_cat(b, sshd, f"c4-{rnd}", src, target, size)
                else:
                    b.set_dirty("c4")
                    program = peer.split()[1]
                    r = b.sync(f"c4-{program}-{rnd}", "c4", src, url, target,
                               ["--ssh-command", command, "--ssh-program", program,
                                "--ssh-cipher", SSH_CIPHER, "--known-hosts",
                                sshd.known_hosts, "--identity", sshd.identity], size=size)
                sessions_ended(sshd)
                r["server_cpu"] = sessions_cpu(sshd) - server0
                if rnd == args.repeat - 1 and not same_content(src, target, size):
                    raise RuntimeError(f"case 4: {peer}'s target differs from the source")
                record(out, "4", "ssh", peer, rnd, r, size)
    finally:
        sshd.proc.stop()
        remove(target)


def case5(b: Bench, out: dict) -> None:
    args = b.args
    small = random_source(b, "mem-1g", MEM_DATA_SIZE)
    sparse = b.path("mem-64g.img")
    PATHS.append(sparse)
    pieces = MEM_DATA_SIZE // MEM_PIECE
    sparse_size = args.sparse_size
    stride = sparse_size // pieces
    fd_in, fd_out = os.open(small, os.O_RDONLY), os.open(sparse, os.O_RDWR | os.O_CREAT,
                                                         0o600)
    try:
        os.ftruncate(fd_out, sparse_size)
        for i in range(pieces):
            os.pwrite(fd_out, os.pread(fd_in, MEM_PIECE, i * MEM_PIECE), i * stride)
        os.fsync(fd_out)
    finally:
        os.close(fd_in)
        os.close(fd_out)
    b.track("m1", small)
    b.track("m64", sparse)
    targets = {"m1": os.path.join(b.tdir, "m1.img"), "m64": os.path.join(b.tdir, "m64.img")}
    PATHS.extend(targets.values())
    info = out["case5"] = {"data": MEM_DATA_SIZE, "sparse_size": sparse_size,
                           "piece": MEM_PIECE, "stride": stride, "dir": b.tdir,
                           "fs": fs_type(b.tdir), "target_file": "fresh"}
    print(f"case 5: memory; {MEM_DATA_SIZE / MiB:,.0f} MiB random file, and "
          f"{sparse_size // GiB:,} GiB sparse with the same data in {pieces:,} pieces of "
          f"{MEM_PIECE // MiB} MiB every {stride // MiB} MiB; a fresh breceive for each sync",
          flush=True)
    configs = [("m1", "256M"), ("m64", "256M"), ("m1", "64M"), ("m64", "64M")]
    try:
        for rnd in range(args.repeat):
            for dev, window in rotate(configs, rnd):
                remove(targets[dev])
                b.set_dirty(dev)
                # a breceive of its own: its peak is this session's, not what earlier
                # sessions left behind (see the retention probe below)
                recv = b.start_receiver("breceive-mem", targets)
                try:
                    idle = recv.proc.memory()["VmRSS"]
                    extra = [] if window == "256M" else ["--window", window]
                    source = small if dev == "m1" else sparse
                    r = b.sync(f"c5-{dev}-{window}-{rnd}", dev, source, recv.url(dev),
                               targets[dev], extra, receiver=recv.proc, size=MEM_DATA_SIZE)
                finally:
                    recv.proc.stop()
                r.update(window=window, receiver_idle=idle)
                what = "1 GiB" if dev == "m1" else f"{sparse_size // GiB:,} GiB sparse"
                label = f"{what}, window {window}"
                record(out, "5", label, "bmig", rnd, r)
        if not same_content(small, targets["m1"], MEM_DATA_SIZE) \
                or not same_sparse(sparse, targets["m64"]):
            raise RuntimeError("case 5: a target differs from its source")
        # incremental: the same number of rewritten chunks on each device, so the time
        # should follow what is dirty, not the device's size
        count = max(1, round(MEM_DATA_SIZE // CHUNK * DIRTY_FRACTION))
        info["incremental_chunks"] = count
        recv = b.start_receiver("breceive-mem", targets)   # its records: incremental
        rng = random.Random(args.seed)
        try:
            for rnd in range(args.repeat):
                for dev in rotate(["m1", "m64"], rnd):
                    source = small if dev == "m1" else sparse
                    size = MEM_DATA_SIZE if dev == "m1" else sparse_size
                    rewrite_chunks(b, dev, source, size, rng, count)
                    r = b.sync(f"c5-incr-{dev}-{rnd}", dev, source, recv.url(dev),
                               targets[dev], receiver=recv.proc, size=count * CHUNK)
                    what = "1 GiB" if dev == "m1" else f"{sparse_size // GiB:,} GiB sparse"
                    record(out, "5", f"{what}, incremental", "bmig", rnd, r)
        finally:
            recv.proc.stop()
        if not same_content(small, targets["m1"], MEM_DATA_SIZE) \
                or not same_sparse(sparse, targets["m64"]):
            raise RuntimeError("case 5: a target differs from its source after the "
                               "incremental syncs")
        # bmigrate's floor (nothing to ship), and what one breceive keeps after sessions
        recv = b.start_receiver("breceive-mem", targets)
        try:
            rss = [recv.proc.memory()["VmRSS"]]
            for i in range(RETENTION_SESSIONS):
                r = b.sync(f"c5-noop-{i}", "m1", small, recv.url("m1"), targets["m1"],
                           receiver=recv.proc, size=0)
                if i < args.repeat:
                    record(out, "5", "nothing dirty (1 GiB)", "bmig", i, r)
                rss.append(recv.proc.memory()["VmRSS"])
        finally:
            recv.proc.stop()
        info["retention_rss"] = rss
        print(f"  one breceive's RSS after 0..{RETENTION_SESSIONS} sessions that shipped "
              f"nothing (MiB): {', '.join(f'{v / MiB:.1f}' for v in rss)}", flush=True)
    finally:
        for t in targets.values():
            remove(t)


RUNNERS = {"1": case1, "2": case2, "3": case3, "4": case4, "5": case5}


# -- summary and targets -----------------------------------------------------------------

METRICS = ("seconds", "mbps", "cpu", "receiver_cpu", "server_cpu", "rss", "receiver_hwm", "bytes_read",
           "bytes_sent", "bytes_zero", "compression_ratio", "sync_seconds",
           "target_allocated", "differing_chunks", "receiver_idle")


def summarize(runs: list[dict]) -> list[dict]:
    groups: dict[tuple[str, str, str], list[dict]] = {}
    for r in runs:
        groups.setdefault((r["case"], r["variant"], r["peer"]), []).append(r)
    rows = []
    for (case, variant, peer), rs in groups.items():
        row = {"case": case, "variant": variant, "peer": peer, "runs": len(rs)}
        for k in METRICS:
            vals = [r[k] for r in rs if r.get(k) is not None]
            if vals:
                row[k] = statistics.median(vals)
                row[k + "_min"], row[k + "_max"] = min(vals), max(vals)
        rows.append(row)
    return rows


@dataclass(frozen=True)
class Target:
    title: str
    case: str
    num: tuple[str, str]      # (variant, peer) of the numerator
    den: tuple[str, str]
    metric: str               # the ratio is num[metric] / den[metric]
    op: str                   # ">=" or "<="
    need: float


def targets(out: dict) -> list[Target]:
    sparse = f"{out.get('case5', {}).get('sparse_size', MEM_SPARSE_SIZE) // GiB:,} GiB"
    t = [Target("1 disk: bmig / socat throughput", "1", ("disk", "socat"), ("disk", "bmig"),
                "seconds", ">=", 0.9),
         Target("1 disk, target pages cached: bmig / socat throughput", "1",
                ("disk-existing", "socat"), ("disk-existing", "bmig"), "seconds", ">=", 0.9),
         Target("1 disk: breceive CPU, fresh / existing target file", "1",
                ("disk", "bmig"), ("disk-existing", "bmig"), "receiver_cpu", "<=", 1.5),
         Target("1 tmpfs: bmig tcp:// (AEAD) / socat throughput", "1", ("shm", "socat"),
                ("shm", "bmig"), "seconds", ">=", 0.8),
         Target("1 tmpfs: bmig tls:// (client certificate, no AEAD) / socat throughput", "1",
                ("shm", "socat"), ("shm", "bmig tls"), "seconds", ">=", 0.8),
         Target("2 ext4 image: bmig / socat throughput", "2", ("ext4", "socat"),
                ("ext4", "bmig"), "seconds", ">=", 1.5),
         Target("2 ext4 image: bmig --level 0 / socat throughput", "2", ("ext4", "socat"),
                ("ext4", "bmig --level 0"), "seconds", ">=", 1.5),
         # adaptive compression no more than 10 % behind either fixed choice
         Target("2 ext4 image: bmig / bmig --level 0 throughput", "2",
                ("ext4", "bmig --level 0"), ("ext4", "bmig"), "seconds", ">=", 0.91),
         Target("2 ext4 image: bmig / bmig --compress always throughput", "2",
                ("ext4", "bmig --compress always"), ("ext4", "bmig"), "seconds", ">=",
                0.91),
         Target(f"2 ext4 image, {LINK_LIMIT}/s link: bmig / bmig --level 0 throughput", "2",
                (LINK_VARIANT, "bmig --level 0"), (LINK_VARIANT, "bmig"), "seconds", ">=",
                0.91),
         Target(f"2 ext4 image, {LINK_LIMIT}/s link: bmig / bmig --compress always "
                "throughput", "2", (LINK_VARIANT, "bmig --compress always"),
                (LINK_VARIANT, "bmig"), "seconds", ">=", 0.91),
         Target("3 incremental time / full sync time", "3", ("random", "bmig incremental"),
                ("random", "bmig full"), "seconds", "<=", 0.03),
         Target("3 xxh3 scan time / bmig incremental time", "3", ("random", "scan xxh3"),
                ("random", "bmig incremental"), "seconds", ">=", 20),
         Target("3 blake2b scan time / bmig incremental time", "3",
                ("random", "scan blake2b"), ("random", "bmig incremental"), "seconds",
                ">=", 20),
         Target("3 cold cache: xxh3 scan time / bmig incremental time", "3",
                ("random", "scan xxh3 (cold cache)"),
                ("random", "bmig incremental (cold cache)"), "seconds", ">=", 20),
         Target("4 SSH: bmig paramiko / ssh cat throughput", "4", ("ssh", "ssh cat"),
                ("ssh", "bmig paramiko"), "seconds", ">=", 0.6),
         Target("4 SSH: bmig openssh / ssh cat throughput", "4", ("ssh", "ssh cat"),
                ("ssh", "bmig openssh"), "seconds", ">=", 0.9)]
    for window in ("256M", "64M"):
        for metric, who in (("rss", "bmigrate"), ("receiver_hwm", "breceive")):
            t.append(Target(f"5 {who} peak RSS, {sparse} sparse / 1 GiB, window {window}",
                            "5", (f"{sparse} sparse, window {window}", "bmig"),
                            (f"1 GiB, window {window}", "bmig"), metric, "<=", 1.10))
    t.append(Target(f"5 incremental, same dirty chunks: {sparse} sparse / 1 GiB time", "5",
                    (f"{sparse} sparse, incremental", "bmig"), ("1 GiB, incremental", "bmig"),
                    "seconds", "<=", 1.2))
    return t


def ratios(summary: list[dict], runs: list[dict], out: dict) -> list[dict]:
    med = {(s["case"], s["variant"], s["peer"]): s for s in summary}
    rows = []
    for t in targets(out):
        a, b = (t.case, *t.num), (t.case, *t.den)
        row = {"target": t.title, "case": t.case, "metric": t.metric,
               "need": f"{t.op} {t.need}", "ratio": None, "verdict": "n/a"}
        if a in med and b in med and med[a].get(t.metric) and med[b].get(t.metric):
            ratio = med[a][t.metric] / med[b][t.metric]
            row["ratio"] = round(ratio, 4)
            ok = ratio >= t.need if t.op == ">=" else ratio <= t.need
            row["verdict"] = "PASS" if ok else "BELOW"
            per: dict[int, dict] = {}
            for r in runs:
                key = (r["case"], r["variant"], r["peer"])
                if key in (a, b) and r.get(t.metric):
                    per.setdefault(r["round"], {})[key] = r[t.metric]
            row["per_round"] = [round(v[a] / v[b], 4) for v in per.values()
                                if a in v and b in v]
        rows.append(row)
    return rows


# -- report ----------------------------------------------------------------------------

def _fmt(v) -> str:
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, float):
        return f"{v:,.3f}" if abs(v) < 10 else f"{v:,.1f}" if abs(v) < 100 else f"{v:,.0f}"
    return "-" if v is None else str(v)


table = functools.partial(benchlib.table, fmt=_fmt, left=2)


def _mib(v) -> float | None:
    return None if v is None else round(v / MiB, 1)


def _range(s: dict, key: str, digits: int = 2) -> str | None:
    if key + "_min" not in s:
        return None
    return f"{s[key + '_min']:.{digits}f}-{s[key + '_max']:.{digits}f}"


def report(out: dict) -> str:
    parts = []
    rows_of = lambda case: [s for s in out["summary"] if s["case"] == case]  # noqa: E731
    if rows_of("1") or rows_of("2"):
        for case in ("1", "2"):
            rows = rows_of(case)
            if not rows:
                continue
            title = (f"1. full sync, {out['case1']['size'] / MiB:,.0f} MiB random data, "
                     "loopback TCP" if case == "1" else
                     f"2. full sync, {out['case2']['size'] / MiB:,.0f} MiB ext4 image "
                     f"({out['case2']['image']['file_bytes'] / MiB:,.0f} MiB of files, "
                     f"{out['case2']['image']['image_data_runs'] / MiB:,.0f} MiB in data runs)")
            parts.append(f"\n{title} (medians of {rows[0]['runs']} run(s); time until the "
                         "fsync of the target returned)")
            parts.append(table(
                ["where", "peer", "seconds", "min-max", "MB/s", "sender CPU s",
                 "receiver CPU s", "read MiB", "sent MiB", "zero MiB", "target alloc MiB"],
                [[_where(out, s), s["peer"], s["seconds"], _range(s, "seconds"),
                  s.get("mbps"), s.get("cpu"), s.get("receiver_cpu"),
                  _mib(s.get("bytes_read")), _mib(s.get("bytes_sent")),
                  _mib(s.get("bytes_zero")), _mib(s.get("target_allocated"))]
                 for s in rows]))
            if case == "1" and out["case1"].get("aead"):
                a = out["case1"]["aead"]
                parts.append(f"sealing and opening 1 GiB of frames (tcp://'s AEAD, "
                             f"AES-256-GCM) in one process: {a['seal_and_open_cpu_per_gib']} "
                             f"CPU-s ({a['seal_and_open_mbps']:,.0f} MB/s)")
    rows = rows_of("3")
    if rows:
        c = out["case3"]
        parts.append(f"\n3. incremental, {c['size'] / MiB:,.0f} MiB random image, "
                     f"{DIRTY_FRACTION:.0%} of {c['chunks']:,} chunks rewritten (medians of "
                     f"{rows[0]['runs']} run(s))")
        parts.append(table(
            ["what", "", "seconds", "min-max", "MB/s", "bmigrate's own s", "bmigrate CPU s",
             "breceive CPU s", "read MiB", "sent MiB"],
            [[s["peer"], "", s["seconds"], _range(s, "seconds", 3), s.get("mbps"),
              s.get("sync_seconds"), s.get("cpu"), s.get("receiver_cpu"),
              _mib(s.get("bytes_read")), _mib(s.get("bytes_sent"))] for s in rows]))
        ok = all(ch.get("identical") for ch in c["checks"])
        before = [f"{x['differing_chunks']}/{x['expected']}" for ch in c["checks"]
                  for x in ch["scans"] if not x["after_sync"]]
        after = [str(x["differing_chunks"]) for ch in c["checks"] for x in ch["scans"]
                 if x["after_sync"]]
        parts.append(f"chunks found differing by the scans run before the sync (found/"
                     f"rewritten): {', '.join(before) or '-'}; after it: "
                     f"{', '.join(after) or '-'}; MB/s of a scan is per file (it reads two)")
        parts.append(f"target identical to the source after every incremental sync: "
                     f"{'yes' if ok else 'NO'} (whole-file xxh3-128 and the scans)")
    rows = rows_of("4")
    if rows:
        c = out["case4"]
        parts.append(f"\n4. SSH ({c['cipher']}), {c['size'] / MiB:,.0f} MiB random file "
                     f"(medians of {rows[0]['runs']} run(s); time until the fsync of the "
                     "target returned)")
        parts.append(table(
            ["peer", "", "seconds", "min-max", "MB/s", "client CPU s", "server CPU s"],
            [[s["peer"], "", s["seconds"], _range(s, "seconds"), s.get("mbps"), s.get("cpu"),
              s.get("server_cpu")] for s in rows]))
    rows = rows_of("5")
    if rows:
        c = out["case5"]
        parts.append(f"\n5. memory (MiB; medians of {rows[0]['runs']} run(s); each sync with "
                     "a fresh breceive)")
        parts.append(table(
            ["sync of", "", "bmigrate peak RSS", "min-max", "breceive idle",
             "breceive peak RSS", "min-max", "seconds", "sent MiB", "zero MiB"],
            [[s["variant"], "", _mib(s.get("rss")),
              f"{_mib(s['rss_min'])}-{_mib(s['rss_max'])}", _mib(s.get("receiver_idle")),
              _mib(s.get("receiver_hwm")),
              f"{_mib(s.get('receiver_hwm_min'))}-{_mib(s.get('receiver_hwm_max'))}",
              s["seconds"], _mib(s.get("bytes_sent")), _mib(s.get("bytes_zero"))]
             for s in rows]))
        if c.get("retention_rss"):
            parts.append("one breceive's RSS after 0, 1, 2... sessions that shipped nothing: "
                         + ", ".join(f"{v / MiB:.1f}" for v in c["retention_rss"]))
    parts.append("\ntargets (ratio of medians; per round: the ratio within each round)")
    parts.append(table(
        ["target", "", "ratio", "per round", "need", "verdict"],
        [[r["target"], "", r["ratio"],
          (f"{min(r['per_round']):.3f}-{max(r['per_round']):.3f}"
           if r.get("per_round") else None), r["need"], r["verdict"]]
         for r in out["ratios"] if r["case"] in out["cases"]]))
    return "\n".join(parts)


def _where(out: dict, s: dict) -> str:
    if s["case"] == "1":
        v = out["case1"]["variants"][s["variant"]]
        return f"{v['fs']} ({v['target_file']})"
    where = f"{out['case2']['fs']} ({out['case2']['target_file']})"
    return where if s["variant"] == "ext4" else f"{where}, --bwlimit {LINK_LIMIT}"


# -- checks and options ----------------------------------------------------------------

def needs(args) -> dict[str, int]:
    """Bytes that must be free on each file system (keyed by a directory on it), for the
    cases chosen: sources stay until the end, each case removes its targets."""
    c = set(args.cases)
    work = 512 * MiB
    if c & {"1", "3"}:
        work += args.size                                    # the random image
    if "2" in c:
        work += int(args.size * IMAGE_DATA_FRACTION * 2.4)   # copied files + the image
    if "4" in c:
        work += args.ssh_size
    if "5" in c:
        work += 2 * MEM_DATA_SIZE
    target = max([args.size if c & {"1", "2", "3"} else 0,
                  args.ssh_size if "4" in c else 0, 2 * MEM_DATA_SIZE if "5" in c else 0])
    wants = [(args.work_root, work), (args.target_root, target)]
    if "1" in c and args.shm:
        wants.append((args.shm, args.size + 256 * MiB))
    by_dev: dict[int, list] = {}
    for d, n in wants:
        entry = by_dev.setdefault(os.stat(d).st_dev, [d, 0])
        entry[1] += n
    return {d: n for d, n in by_dev.values()}


def preflight(args) -> str | None:
    """A one-line reason the run cannot start, or None."""
    c = set(args.cases)
    if c & {"1", "2"} and shutil.which("socat") is None:
        return ("socat is not installed (Debian: apt-get install socat); or leave out cases "
                "1 and 2")
    if "2" in c:
        if shutil.which("mkfs.ext4") is None:
            return "mkfs.ext4 is not installed (Debian: e2fsprogs); or leave out case 2"
        help_text = subprocess.run(["mkfs.ext4"], capture_output=True, text=True).stderr
        if "-d " not in help_text:
            return "this mkfs.ext4 has no -d (e2fsprogs >= 1.43 needed); or leave out case 2"
    if "4" in c:
        for tool in ("ssh", "ssh-keygen"):
            if shutil.which(tool) is None:
                return f"{tool} is not installed (Debian: openssh-client); or leave out case 4"
        if not os.access(SSHD, os.X_OK):
            return f"{SSHD} is not installed (Debian: openssh-server); or leave out case 4"
    if args.profile and _tool("py-spy") is None:
        return "--profile needs py-spy (.venv/bin/pip install py-spy)"
    for d in {args.work_root, args.target_root, *([args.shm] if args.shm else [])}:
        if not os.path.isdir(d) or not os.access(d, os.W_OK):
            return f"{d} is not a writable directory"
    for d, need in needs(args).items():
        st = os.statvfs(d)
        free = st.f_bavail * st.f_frsize
        if free < need:
            return (f"{d} ({fs_type(d)}) has {free / GiB:,.1f} GiB free, these cases need "
                    f"{need / GiB:,.1f} GiB there (sources, targets, image); free some, pick "
                    "others with --work-dir/--target-dir/--shm-dir, or use --quick or --size")
    return None


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="1 GiB instead of 4 (ssh 1 GiB), repeat 1 (explicit options win)")
    p.add_argument("--repeat", type=int, help="rounds per case [3]")
    p.add_argument("--only", default="1,2,3,4,5", help="cases to run [1,2,3,4,5]")
    p.add_argument("--size", help="random image and ext4 image size [4G]")
    p.add_argument("--ssh-size", help="file size of case 4 [2G]")
    p.add_argument("--target-dir", help="where targets go [a temporary directory under "
                   "/var/tmp, i.e. the disk]")
    p.add_argument("--shm-dir", default="/dev/shm",
                   help="case 1's second target directory [/dev/shm]; 'none' to skip")
    p.add_argument("--work-dir", help="where sources, state, logs and sockets go [a "
                   "temporary directory under /var/tmp]")
    p.add_argument("--target-file", choices=("auto", "fresh", "existing"), default="auto",
                   help="cases 1-3: targets created by each run (fresh) or there at full "
                        "size with every page written (existing) [auto: existing on tmpfs, "
                        "fresh elsewhere]")
    p.add_argument("--sparse-size", default="64G",
                   help="case 5: size of the sparse file holding the 1 GiB [64G]")
    p.add_argument("--seed", type=int, default=1, help="case 3's choice of chunks [1]")
    p.add_argument("--no-cold", dest="cold", action="store_false",
                   help="case 3: skip the second round of scan and sync with both files "
                        "evicted from the page cache (POSIX_FADV_DONTNEED) first")
    p.add_argument("--profile", metavar="DIR",
                   help="run every bmigrate under py-spy (raw, --threads) and attach py-spy "
                        "to breceive; one file each in DIR (times are then distorted)")
    p.add_argument("--json", metavar="FILE",
                   help="write the results here [bench/results/sync-YYYYmmdd-HHMMSS.json]")
    args = p.parse_args()
    args.repeat = args.repeat or (1 if args.quick else 3)
    try:
        args.size = parse_size(args.size or ("1G" if args.quick else "4G"))
        args.ssh_size = parse_size(args.ssh_size or ("1G" if args.quick else "2G"))
        args.sparse_size = parse_size(args.sparse_size)
    except Exception as exc:
        p.error(str(exc))
    if args.repeat < 1:
        p.error("--repeat must be positive")
    if args.sparse_size < 2 * MEM_DATA_SIZE or args.sparse_size % (256 * MEM_PIECE):
        p.error("--sparse-size must be at least 2G and a multiple of 1G")
    for name in ("size", "ssh_size"):
        v = getattr(args, name)
        if v < 64 * MiB or v % CHUNK:
            p.error(f"--{name.replace('_', '-')} must be at least 64M and a multiple of 64K")
    args.cases = []
    for item in (s.strip() for s in args.only.split(",")):
        if item and item not in CASES:
            p.error(f"unknown case {item!r} (choose from {', '.join(CASES)})")
        if item and item not in args.cases:
            args.cases.append(item)
    if not args.cases:
        p.error("no case chosen")
    args.cases.sort()
    args.shm = None if args.shm_dir in ("", "none") else os.path.abspath(args.shm_dir)
    args.work_root = os.path.abspath(args.work_dir or "/var/tmp")
    args.target_root = os.path.abspath(args.target_dir or args.work_root)
    if args.profile:
        args.profile = os.path.abspath(args.profile)
        os.makedirs(args.profile, exist_ok=True)
    return args


def main() -> int:
    args = parse_args()
    problem = preflight(args)
    if problem:
        print(f"bench/sync.py: {problem}", file=sys.stderr)
        return 2
    install_signal_handlers()
    stamp = time.strftime("%Y%m%d-%H%M%S")
    facts = provenance(socat=["socat", "-V"])
    out: dict = {**facts, "quick": args.quick, "repeat": args.repeat, "size": args.size,
                 "ssh_size": args.ssh_size, "cases": args.cases, "runs": []}
    print(f"bmigrate sync benchmark: cases {','.join(args.cases)}; {args.repeat} round(s); "
          f"{args.size / MiB:,.0f} MiB images, {args.ssh_size / MiB:,.0f} MiB over SSH",
          flush=True)
    print(provenance_line(facts), flush=True)
    t0 = time.monotonic()
    code = 0
    try:
        work = tempfile.mkdtemp(prefix="bmig-bench-sync-", dir=args.work_root)
        PATHS.insert(0, work)
        tdir = work if args.target_root == args.work_root else tempfile.mkdtemp(
            prefix="bmig-bench-sync-", dir=args.target_root)
        PATHS.insert(1, tdir)
        shm = tempfile.mkdtemp(prefix="bmig-bench-sync-", dir=args.shm) \
            if args.shm and "1" in args.cases else None
        if shm:
            PATHS.insert(2, shm)
        out.update(work_dir=work, target_dir=tdir, target_fs=fs_type(tdir), shm_dir=shm)
        b = Bench(args, work, tdir, shm)
        b.secret = b.path("secret")
        with open(os.open(b.secret, os.O_WRONLY | os.O_CREAT, 0o600), "w") as f:
            f.write(os.urandom(32).hex() + "\n")
        b.start_breqd()
        for case in args.cases:
            started = time.monotonic()
            RUNNERS[case](b, out)
            out.setdefault("case_seconds", {})[case] = round(time.monotonic() - started, 1)
    except (KeyboardInterrupt, Stopped):
        print("\ninterrupted; cleaning up", file=sys.stderr)
        code = 130
    except (RuntimeError, OSError, subprocess.SubprocessError) as exc:
        print(f"bench/sync.py: {exc}", file=sys.stderr)
        code = 1
    finally:
        cleanup()
    if code == 130 or not out["runs"]:
        return code
    out["total_seconds"] = round(time.monotonic() - t0, 1)
    changed = provenance_end(out)
    out["summary"] = summarize(out["runs"])
    out["ratios"] = ratios(out["summary"], out["runs"], out)
    out["cases"] = sorted({r["case"] for r in out["runs"]})
    print(report(out))
    print(f"\ntotal {out['total_seconds']} s; load average before {out['loadavg_before']}, "
          f"after {out['loadavg_after']} ({out['cpus']} CPUs shared by sender, receiver and "
          "whatever else runs: compare within a run)")
    path = args.json or os.path.join(HERE, "results", f"sync-{stamp}.json")
    save_json(path, out)
    if changed:
        print(changed)
    print(f"results: {path}{' (partial: the run failed)' if code else ''}")
    return code


if __name__ == "__main__":
    sys.exit(main())
