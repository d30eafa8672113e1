"""bmig.nbdclient against real NBD servers (qemu-nbd, nbdkit) and a scripted fake one.

The real servers show the client works with what is deployed; the fake server sends what
real servers rarely do (chunks out of order, interleaved replies, error chunks, protocol
violations, silence) so that every branch of the reply parser is exercised.
"""

from __future__ import annotations

import datetime
import random
import shutil
import signal
import socket
import ssl
import struct
import subprocess
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator

import pytest

from bmig.errors import ProtocolError, UnreachableError
from bmig.nbd import protocol as p
from bmig.nbdclient import NbdAddress, NbdClient, NbdError, NbdExportError

KiB = 1 << 10
MiB = 1 << 20
SIZE = 64 * MiB
START_TIMEOUT = 30.0
STOP_TIMEOUT = 30.0


def require(*tools: str) -> None:
    missing = [t for t in tools if shutil.which(t) is None]
    if missing:
        pytest.skip(f"not installed: {', '.join(missing)}")


def wait_for_socket(address: NbdAddress, proc: subprocess.Popen, log: str,
                    timeout: float = START_TIMEOUT) -> None:
    """Poll until the server accepts a connection; fail at once if it exits first."""
    deadline = time.monotonic() + timeout
    delay = 0.005
    while True:
        if proc.poll() is not None:
            raise AssertionError(f"{proc.args[0]} exited with {proc.returncode} before "
                                 f"listening:\n{_read(log)}")
        family = socket.AF_UNIX if address.unix else socket.AF_INET
        target = address.unix if address.unix else (address.host, address.port)
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.settimeout(1.0)
            try:
                probe.connect(target)
                return
            except OSError:
                pass
        if time.monotonic() > deadline:
            raise AssertionError(f"{proc.args[0]} not listening after {timeout}s:\n{_read(log)}")
        time.sleep(delay)
        delay = min(delay * 2, 0.1)


def _read(path: str) -> str:
    try:
        with open(path, errors="replace") as f:
            return f.read()
    except FileNotFoundError:
        return ""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- real servers ----------------------------------------------------------------------------


@dataclass
class Server:
    """One NBD server process; stop() always ends it."""

    name: str
    argv: list[str]
    address: NbdAddress
    log: str
    backing: str | None = None         # the file it serves, or None (nbdkit memory)
    proc: subprocess.Popen | None = None

    @property
    def uri(self) -> str:
        return self.address.uri

    @property
    def kind(self) -> str:
        return "qemu-nbd" if self.name.startswith("qemu") else "nbdkit"

    def start(self) -> "Server":
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL, stdout=log,
                                         stderr=log)
        wait_for_socket(self.address, self.proc, self.log)
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=STOP_TIMEOUT)

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=STOP_TIMEOUT)

    def connect(self, **kw) -> NbdClient:
        kw.setdefault("meta_contexts", [p.META_BASE_ALLOCATION])
        return NbdClient.connect(self.uri, **kw)

    def image(self, tmp_path) -> bytes:
        """What the server stores, read without this client: the file, or nbdcopy."""
        if self.backing is not None:
            with open(self.backing, "rb") as f:
                return f.read()
        out = tmp_path / "nbdcopy.img"
        subprocess.run(["nbdcopy", self.uri, str(out)], check=True, capture_output=True,
                       timeout=120)
        try:
            return out.read_bytes()
        finally:
            out.unlink()


def sparse_file(path: str, size: int = SIZE) -> str:
    with open(path, "wb") as f:
        f.truncate(size)
    return path


def make_server(name: str, tmp_path, *extra: str, size: int = SIZE,
                plugin_args: tuple[str, ...] = ()) -> Server:
    """The servers of the brief, by name; ``extra`` goes before the file or plugin,
    ``plugin_args`` (nbdkit) after it.

    qemu-nbd gets --discard=unmap: by default it accepts NBD_CMD_TRIM and ignores it, so a
    trimmed range keeps its data and never becomes a hole."""
    sock = str(tmp_path / "nbd.sock")
    log = str(tmp_path / f"{name}.log")
    unix = NbdAddress(unix=sock)
    if name.startswith("qemu"):
        require("qemu-nbd")
        backing = sparse_file(str(tmp_path / "disk.img"), size)
        qemu = ["qemu-nbd", "-f", "raw", "--discard=unmap", *extra]
        if name == "qemu-tcp":
            port = free_port()
            return Server(name, [*qemu, "-b", "127.0.0.1", "-p", str(port), backing, "-t"],
                          NbdAddress(host="127.0.0.1", port=port), log, backing)
        cache = ["--cache=writeback"] if name == "qemu-writeback" else []
        return Server(name, [*qemu, *cache, "-k", sock, backing, "-t"], unix, log, backing)
    require("nbdkit")
    base = ["nbdkit", "-f", "--exit-with-parent", "-U", sock, *extra]
    if name == "nbdkit-file":
        backing = sparse_file(str(tmp_path / "disk.img"), size)
        return Server(name, [*base, "file", backing, *plugin_args], unix, log, backing)
    if name == "nbdkit-memory":
        return Server(name, [*base, "memory", str(size), *plugin_args], unix, log)
    raise ValueError(name)


SERVERS = ["qemu", "qemu-writeback", "qemu-tcp", "nbdkit-file", "nbdkit-memory"]


@pytest.fixture
def servers() -> Iterator[list[Server]]:
    """Servers a test starts itself; all stopped at teardown."""
    started: list[Server] = []
    try:
        yield started
    finally:
        for server in reversed(started):
            server.stop()


def start(servers: list[Server], server: Server, attempts: int = 3) -> Server:
    """Start ``server``; a TCP server whose free port was taken meanwhile gets another."""
    for attempt in range(attempts):
        servers.append(server)
        try:
            return server.start()
        except AssertionError:
            server.stop()
            if server.address.unix is not None or attempt == attempts - 1:
                raise
            port = free_port()
            server = Server(server.name, [str(port) if a == str(server.address.port) else a
                                          for a in server.argv],
                            NbdAddress(host="127.0.0.1", port=port), server.log, server.backing)
    raise AssertionError("unreachable")


@pytest.fixture(params=SERVERS)
def server(request, tmp_path, servers) -> Server:
    return start(servers, make_server(request.param, tmp_path))


@pytest.fixture
def client(server) -> Iterator[NbdClient]:
    c = server.connect()
    try:
        yield c
    finally:
        c.close()


def pattern(seed: int, n: int) -> bytes:
    return random.Random(seed).randbytes(n)


# -- handshake ------------------------------------------------------------------------------------


def test_handshake_reports_size_flags_contexts_and_block_sizes(server, client):
    assert client.size == SIZE
    assert client.export == ""
    assert client.structured is True
    assert p.META_BASE_ALLOCATION in client.contexts
    assert client.can_flush and client.can_fua and client.can_trim and client.can_zero
    assert not client.read_only
    assert client.flags & p.FLAG_HAS_FLAGS
    assert (client.min_block_size, client.preferred_block_size) == (1, 4096)
    assert client.max_block_size == 32 * MiB
    assert client.can_multi_conn == (server.kind == "nbdkit")
    assert client.in_flight == client.outstanding == 0


def test_without_structured_replies_reads_and_writes_still_work(server):
    with server.connect(structured=False) as c:
        assert c.structured is False and c.contexts == {}
        data = pattern(1, 3 * MiB + 5)
        c.pwrite(data, 777)
        assert c.pread(len(data), 777) == data
        c.strict = False
        with pytest.raises(NbdError) as info:
            c.pread(4096, SIZE)
        assert info.value.errno_name == "EINVAL" and info.value.from_server
        assert c.pread(5, 777) == data[:5]


def test_exit_from_the_with_block_waits_for_outstanding_writes(server, tmp_path):
    with server.connect() as c:
        for i in range(64):
            c.submit_write(bytes([i]) * 4096, i * 4096)
        assert c.outstanding == 64
    image = server.image(tmp_path)
    assert all(image[i * 4096:(i + 1) * 4096] == bytes([i]) * 4096 for i in range(64))
    c.close()  # idempotent
    with pytest.raises(UnreachableError, match="closed"):
        c.pread(1, 0)


# -- reads and writes -----------------------------------------------------------------------------


@pytest.mark.parametrize("offset, length", [
    (0, 4096), (1, 1), (4095, 2), (12345, 70001), (SIZE - 513, 513), (3 * MiB - 1, MiB + 2),
])
def test_pwrite_pread_round_trip_at_any_offset(server, client, tmp_path, offset, length):
    data = pattern(offset, length)
    client.pwrite(data, offset)
    assert client.pread(length, offset) == data
    buf = bytearray(length + 2)
    client.pread_into(memoryview(buf)[1:-1], offset)
    assert buf[1:-1] == data and buf[0] == buf[-1] == 0
    assert client.pread(1, offset - 1 if offset else length) == b"\0"
    assert server.image(tmp_path)[offset:offset + length] == data


def test_reads_and_writes_larger_than_the_maximum_block_size_are_split(server, client,
                                                                       tmp_path):
    data = pattern(7, 40 * MiB + 4096)
    client.pwrite(memoryview(data), 8 * MiB - 4096)
    assert client.pread(len(data), 8 * MiB - 4096) == data
    assert server.image(tmp_path)[8 * MiB - 4096:48 * MiB] == data
    whole = client.pread(SIZE, 0)
    assert whole[8 * MiB - 4096:48 * MiB] == data and whole[:8 * MiB - 4096].count(0) == \
        8 * MiB - 4096
    with pytest.raises(NbdError, match="maximum block size") as info:
        client.submit_write(data, 0)
    assert info.value.errno_name == "EINVAL" and not info.value.from_server


def test_qemu_io_sees_what_the_client_wrote(server, tmp_path):
    require("qemu-io")
    with server.connect() as c:
        c.pwrite(b"\xab" * MiB, MiB)
        c.pwrite(b"\xcd" * 4096, 5 * MiB + 3, fua=True)
        c.flush()
    done = subprocess.run(
        ["qemu-io", "-f", "raw", "-r", server.uri, "-c", f"read -P 0xab {MiB} {MiB}",
         "-c", f"read -P 0xcd {5 * MiB + 3} 4096", "-c", f"read -P 0 {5 * MiB} 3"],
        capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Pattern verification failed" not in done.stdout, done.stdout


def test_flush_and_fua(client):
    client.pwrite(b"f" * 8192, 0, fua=True)
    client.flush()
    client.wait(client.submit_flush())
    client.zero(0, 4096, fua=True)
    client.trim(4096, 4096, fua=True)
    client.flush()
    assert client.pread(8192, 0) == bytes(8192)


def test_trim_and_zero_read_back_as_zeros(server, client, tmp_path):
    client.pwrite(b"\x5a" * (8 * MiB), 0)
    client.trim(MiB, MiB)
    client.zero(3 * MiB, MiB)
    client.zero(5 * MiB + 1, 4095, no_hole=True)
    client.zero(0, 64 * KiB, fua=True)
    expected = bytearray(b"\x5a" * (8 * MiB))
    for start, n in ((MiB, MiB), (3 * MiB, MiB), (5 * MiB + 1, 4095), (0, 64 * KiB)):
        expected[start:start + n] = bytes(n)
    assert client.pread(8 * MiB, 0) == expected
    assert server.image(tmp_path)[:8 * MiB] == expected
    client.zero(0, SIZE)  # larger than the maximum block size: split
    assert client.pread(8 * MiB, 0) == bytes(8 * MiB)


def test_fast_zero_is_done_refused_by_the_server_or_refused_before_sending(client):
    client.pwrite(b"z" * 8192, 0)
    if not client.can_fast_zero:
        with pytest.raises(NbdError, match="fast zero") as info:
            client.zero(0, 8192, fast=True)
        assert info.value.errno_name == "ENOTSUP" and not info.value.from_server
        return
    try:
        client.zero(0, 8192, fast=True)
    except NbdError as exc:  # allowed: "not faster than writing"
        assert exc.errno_name == "ENOTSUP" and exc.from_server
        assert client.pread(8192, 0) == b"z" * 8192
    else:
        assert client.pread(8192, 0) == bytes(8192)


def test_block_status_sees_a_hole_after_trim_on_a_sparse_image(server, client):
    assert client.block_status(0, SIZE) == [(SIZE, p.STATE_HOLE | p.STATE_ZERO)]
    client.pwrite(b"d" * (4 * MiB), 0)
    client.flush()
    extents = client.block_status(0, 8 * MiB)
    assert sum(n for n, _ in extents) == 8 * MiB
    assert extents[0] == (4 * MiB, 0)
    assert all(f & p.STATE_HOLE for _, f in extents[1:])
    client.trim(MiB, MiB)
    client.flush()
    extents = client.block_status(0, 4 * MiB)
    assert extents == [(MiB, 0), (MiB, p.STATE_HOLE | p.STATE_ZERO), (2 * MiB, 0)]
    assert client.block_status(MiB + 4096, 8192) == [(8192, p.STATE_HOLE | p.STATE_ZERO)]


# -- pipelining -------------------------------------------------------------------------------------


def test_500_pipelined_random_writes_land_byte_for_byte(server, client, tmp_path):
    rng = random.Random(500)
    slots = rng.sample(range(SIZE // (8 * KiB)), 500)   # disjoint: order cannot matter
    expected = bytearray(SIZE)
    cookies = []
    for i, slot in enumerate(slots):
        offset = slot * 8 * KiB + rng.randrange(4 * KiB)  # unaligned, still disjoint
        data = rng.randbytes(4 * KiB)
        expected[offset:offset + len(data)] = data
        cookies.append(client.submit_write(data, offset, fua=(i % 50 == 0)))
        assert client.in_flight <= client.max_in_flight
    assert len(set(cookies)) == 500
    assert client.outstanding == 500
    client.wait_all()
    assert client.outstanding == client.in_flight == 0
    client.flush()
    assert server.image(tmp_path) == expected
    assert client.pread(SIZE, 0) == expected


def test_waiting_in_any_order_and_a_small_in_flight_cap(client):
    client.max_in_flight = 4
    cookies = [client.submit_write(bytes([i]) * 512, i * 512) for i in range(40)]
    assert client.in_flight <= 4
    cookies.append(client.submit_zero(0, 512))
    cookies.append(client.submit_trim(512, 512))
    for cookie in reversed(cookies[:-2]):
        client.wait(cookie)
    client.wait(cookies[-1])
    client.wait(cookies[-2])
    assert client.outstanding == 0
    with pytest.raises(ValueError, match="not outstanding"):
        client.wait(cookies[0])
    assert client.pread(1024, 0) == bytes(1024)
    assert client.pread(512, 39 * 512) == bytes([39]) * 512


def test_a_failed_pipelined_request_fails_its_own_cookie_only(client):
    client.strict = False
    good = client.submit_write(b"g" * 4096, 0)
    bad = client.submit_write(b"b" * 4096, SIZE)      # past the end: the server refuses
    also_good = client.submit_write(b"h" * 4096, 4096)
    client.wait(also_good)
    with pytest.raises(NbdError) as info:
        client.wait(bad)
    assert info.value.from_server and info.value.errno_name in ("EINVAL", "ENOSPC")
    client.wait(good)
    bad1 = client.submit_write(b"b", SIZE)
    bad2 = client.submit_zero(SIZE, 1)
    client.submit_write(b"x", 0)
    with pytest.raises(NbdError, match=r"and 1 more requests failed") as info:
        client.wait_all()
    assert f"at offset {SIZE}" in info.value.message and bad1 != bad2
    assert client.outstanding == 0
    assert client.pread(1, 0) == b"x"


# -- errors ---------------------------------------------------------------------------------------------


def test_a_read_past_the_end(client):
    with pytest.raises(NbdError, match="beyond the end of the export") as info:
        client.pread(4096, SIZE - 2048)
    assert info.value.errno_name == "EINVAL" and not info.value.from_server
    client.strict = False
    for call in (lambda: client.pread(1, -1), lambda: client.submit_trim(0, 1 << 32)):
        with pytest.raises(NbdError, match="must fit 64 and 32 bits") as info:
            call()   # what the wire cannot carry is refused even when not strict
        assert not info.value.from_server
    with pytest.raises(NbdError) as info:
        client.pread(4096, SIZE - 2048)
    assert info.value.errno_name == "EINVAL" and info.value.error == p.Err.EINVAL
    assert info.value.from_server and "\n" not in info.value.message
    assert client.pread(4096, SIZE - 4096) == bytes(4096)  # the connection still works


@pytest.mark.parametrize("name", ["qemu", "nbdkit-file"])
def test_write_on_a_read_only_export(name, tmp_path, servers):
    server = start(servers, make_server(name, tmp_path, "-r"))
    with server.connect() as c:
        assert c.read_only
        for call in (lambda: c.pwrite(b"w" * 4096, 0), lambda: c.zero(0, 4096),
                     lambda: c.trim(0, 4096), lambda: c.submit_write(b"w", 0)):
            with pytest.raises(NbdError, match="read-only") as info:
                call()
            assert info.value.errno_name == "EPERM" and not info.value.from_server
        c.strict = False
        with pytest.raises(NbdError) as info:
            c.pwrite(b"w" * 4096, 0)
        assert info.value.from_server
        # nbdkit answers EPERM as proto.md asks; qemu-nbd 7.2 answers EINVAL, with the
        # message "Export is read-only".
        if server.kind == "qemu-nbd" and info.value.errno_name == "EINVAL":
            assert "Export is read-only" in info.value.message
        else:
            assert info.value.errno_name == "EPERM"
        assert c.pread(4096, 0) == bytes(4096)
    assert server.image(tmp_path)[:4096] == bytes(4096)


def test_connecting_to_a_missing_socket_is_unreachable_in_one_line(tmp_path):
    path = tmp_path / "nobody.sock"
    with pytest.raises(UnreachableError) as info:
        NbdClient.connect(f"nbd+unix:///x?socket={path}")
    message = info.value.message
    assert str(path) in message and "No such file or directory" in message
    assert "\n" not in message


def test_connecting_to_a_closed_tcp_port_is_unreachable():
    port = free_port()
    with pytest.raises(UnreachableError, match=f"nbd://127.0.0.1:{port}/.*refused"):
        NbdClient.connect(f"nbd://127.0.0.1:{port}/")


@pytest.mark.parametrize("name", ["qemu", "qemu-tcp", "nbdkit-memory"])
def test_a_server_killed_mid_session_fails_fast(name, tmp_path, servers):
    server = start(servers, make_server(name, tmp_path))
    c = server.connect(timeout=30)
    try:
        for i in range(100):
            c.submit_write(b"k" * 4096, i * 4096)
        c.wait_all()
        for i in range(50):
            c.submit_write(b"k" * 4096, i * 4096)
        server.kill9()
        began = time.monotonic()
        with pytest.raises((UnreachableError, ProtocolError)) as info:
            c.wait_all()
            c.pread(4096, 0)
        assert "\n" not in info.value.message and server.address.uri in info.value.message
        assert time.monotonic() - began < 10
        with pytest.raises((UnreachableError, ProtocolError)):
            c.pread(4096, 0)   # and it stays broken
    finally:
        c.close()


def test_qemu_nbd_named_export_and_an_unknown_one(tmp_path, servers):
    server = start(servers, make_server("qemu", tmp_path, "-x", "vm 1"))
    sock = server.address.unix
    with NbdClient.connect(NbdAddress(unix=sock, export="vm 1")) as c:
        assert c.export == "vm 1" and c.size == SIZE
    with pytest.raises(NbdExportError, match="has no export named 'other'") as info:
        NbdClient.connect(f"nbd+unix:///other?socket={sock}")
    assert "\n" not in info.value.message
    with NbdClient.connect(f"nbd+unix:///vm%201?socket={sock}") as c:
        assert c.size == SIZE


# -- nbdkit's knobs: block sizes, missing features, errors, no structured replies ----------------


def test_block_size_constraints_are_obeyed(tmp_path, servers):
    server = start(servers, make_server(
        "nbdkit-memory", tmp_path, "--filter=blocksize-policy", size=4 * MiB,
        plugin_args=("blocksize-minimum=512", "blocksize-preferred=4096",
                     "blocksize-maximum=65536", "blocksize-error-policy=error")))
    with server.connect() as c:
        assert (c.min_block_size, c.preferred_block_size, c.max_block_size) == \
            (512, 4096, 64 * KiB)
        data = pattern(3, MiB)
        c.pwrite(data, 512)                 # 16 requests of 64 KiB at most
        assert c.pread(MiB, 512) == data
        c.zero(0, 2 * MiB)                  # zero is bound by the maximum too
        assert c.pread(2 * MiB, 0) == bytes(2 * MiB)
        with pytest.raises(NbdError, match="minimum block size of 512") as info:
            c.pread(100, 1)
        assert not info.value.from_server
        with pytest.raises(NbdError, match="maximum block size"):
            c.submit_write(bytes(128 * KiB), 0)
        c.strict = False
        with pytest.raises(NbdError) as info:
            c.pread(100, 1)
        assert info.value.errno_name == "EINVAL" and info.value.from_server


def test_what_the_server_does_not_offer_is_not_sent(tmp_path, servers):
    require("nbdkit")
    sock = str(tmp_path / "nbd.sock")
    argv = ["nbdkit", "-f", "--exit-with-parent", "-U", sock, "--filter=nozero",
            "--filter=fua", "eval", "get_size=echo 1048576",
            "pread=dd if=/dev/zero count=$3 iflag=count_bytes status=none",
            "pwrite=cat >/dev/null", "zeromode=none"]
    server = start(servers, Server("nbdkit-eval", argv, NbdAddress(unix=sock),
                                   str(tmp_path / "eval.log")))
    with server.connect() as c:
        assert not (c.can_flush or c.can_fua or c.can_trim or c.can_zero or c.read_only)
        refusals = [
            (lambda: c.flush(), "ENOTSUP", "flush"),
            (lambda: c.submit_flush(), "ENOTSUP", "flush"),
            (lambda: c.trim(0, 4096), "ENOTSUP", "trim"),
            (lambda: c.zero(0, 4096), "ENOTSUP", "write zeroes"),
            (lambda: c.submit_zero(0, 4096), "ENOTSUP", "write zeroes"),
            (lambda: c.pwrite(b"x", 0, fua=True), "EINVAL", "FUA"),
        ]
        for call, errno_name, words in refusals:
            with pytest.raises(NbdError, match=words) as info:
                call()
            assert info.value.errno_name == errno_name and not info.value.from_server
        c.pwrite(b"x" * 4096, 0)
        c.strict = False
        for call in (lambda: c.trim(0, 4096), lambda: c.flush(), lambda: c.zero(0, 4096)):
            with pytest.raises(NbdError) as info:
                call()
            assert info.value.from_server and info.value.errno_name == "EINVAL"
        assert c.pread(4096, 0) == bytes(4096)


def test_server_errors_carry_the_errno(tmp_path, servers):
    server = start(servers, make_server("nbdkit-memory", tmp_path, "--filter=error", size=MiB,
                                        plugin_args=("error-pread=EIO", "error-pread-rate=1")))
    with server.connect() as c:
        c.pwrite(b"e" * 4096, 0)
        for _ in range(3):
            with pytest.raises(NbdError, match="NBD_CMD_READ of 4096 bytes at offset 0 "
                                               "failed on .*: EIO") as info:
                c.pread(4096, 0)
            assert info.value.error == p.Err.EIO and info.value.from_server
        c.flush()


def test_a_server_without_structured_replies(tmp_path, servers):
    server = start(servers, make_server("nbdkit-memory", tmp_path, "--no-sr", size=MiB))
    with server.connect() as c:
        assert not c.structured and c.contexts == {}
        c.pwrite(b"s" * 5000, 3)
        assert c.pread(5000, 3) == b"s" * 5000
        with pytest.raises(NbdError, match="not negotiated"):
            c.block_status(0, 4096)


@pytest.mark.parametrize("flag, words", [
    ("--oldstyle", "oldstyle"), ("--mask-handshake=0", "fixed newstyle"),
])
def test_servers_without_fixed_newstyle_are_refused(flag, words, tmp_path, servers):
    server = start(servers, make_server("nbdkit-memory", tmp_path, flag, size=MiB))
    with pytest.raises(ProtocolError, match=words):
        server.connect()


def test_without_no_zeroes_the_handshake_still_works(tmp_path, servers):
    server = start(servers, make_server("nbdkit-memory", tmp_path, "--mask-handshake=1",
                                        size=MiB))
    with server.connect() as c:
        assert c._no_zeroes is False
        c.pwrite(b"n", 0)
        assert c.pread(1, 0) == b"n"


# -- TLS --------------------------------------------------------------------------------------------


@pytest.fixture
def certificates(tmp_path) -> dict[str, str]:
    """A CA and a server certificate for localhost and 127.0.0.1, as nbdkit wants them."""
    x509 = pytest.importorskip("cryptography.x509")
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID
    import ipaddress

    now = datetime.datetime.now(datetime.timezone.utc)
    directory = tmp_path / "pki"
    directory.mkdir()

    def cert(subject: str, key, issuer_name, issuer_key, ca: bool):
        builder = (x509.CertificateBuilder()
                   .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
                   .issuer_name(issuer_name).public_key(key.public_key())
                   .serial_number(x509.random_serial_number())
                   .not_valid_before(now - datetime.timedelta(days=1))
                   .not_valid_after(now + datetime.timedelta(days=7))
                   .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
        if not ca:
            builder = builder.add_extension(x509.SubjectAlternativeName([
                x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                critical=False)
        return builder.sign(issuer_key, hashes.SHA256())

    def pem_key(key) -> bytes:
        return key.private_bytes(serialization.Encoding.PEM,
                                 serialization.PrivateFormat.TraditionalOpenSSL,
                                 serialization.NoEncryption())

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "bmig test CA")])
    ca = cert("bmig test CA", ca_key, ca_name, ca_key, True)
    key = ec.generate_private_key(ec.SECP256R1())
    server = cert("localhost", key, ca_name, ca_key, False)
    other_key = ec.generate_private_key(ec.SECP256R1())
    other_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "another CA")])
    other = cert("another CA", other_key, other_name, other_key, True)
    files = {"ca-cert.pem": ca.public_bytes(serialization.Encoding.PEM),
             "server-cert.pem": server.public_bytes(serialization.Encoding.PEM),
             "server-key.pem": pem_key(key)}
    for name, data in files.items():
        (directory / name).write_bytes(data)
    (tmp_path / "other-ca.pem").write_bytes(other.public_bytes(serialization.Encoding.PEM))
    return {"dir": str(directory), "ca": str(directory / "ca-cert.pem"),
            "other_ca": str(tmp_path / "other-ca.pem")}


def test_tls_with_nbdkit(tmp_path, servers, certificates):
    server = start(servers, make_server(
        "nbdkit-memory", tmp_path, "--tls=require", f"--tls-certificates={certificates['dir']}",
        size=MiB))
    sock = server.address.unix
    context = ssl.create_default_context(cafile=certificates["ca"])
    tls = NbdAddress(unix=sock, tls=True)
    with NbdClient.connect(tls, tls_context=context,
                           meta_contexts=[p.META_BASE_ALLOCATION]) as c:
        assert c.structured and p.META_BASE_ALLOCATION in c.contexts
        data = pattern(9, 300 * KiB)
        c.pwrite(data, 10)
        for i in range(20):
            c.submit_write(bytes([i]) * 4096, 512 * KiB + i * 4096)
        c.wait_all()
        assert c.pread(len(data), 10) == data
        assert c.pread(4096, 512 * KiB + 19 * 4096) == bytes([19]) * 4096
    with pytest.raises(NbdExportError, match="requires TLS: use an nbds://"):
        NbdClient.connect(f"nbd+unix:///?socket={sock}")
    wrong = ssl.create_default_context(cafile=certificates["other_ca"])
    with pytest.raises(UnreachableError, match="TLS handshake with nbds\\+unix.*failed"):
        NbdClient.connect(tls, tls_context=wrong)


def test_nbds_to_a_server_without_tls_is_refused(tmp_path, servers):
    server = start(servers, make_server("nbdkit-memory", tmp_path, size=MiB))
    with pytest.raises(NbdExportError, match="refused NBD_OPT_STARTTLS") as info:
        NbdClient.connect(NbdAddress(unix=server.address.unix, tls=True))
    assert "\n" not in info.value.message


# -- a scripted fake server -------------------------------------------------------------------------

_U64 = struct.Struct(">Q")
_U32 = struct.Struct(">I")
FAKE_FLAGS = (p.FLAG_HAS_FLAGS | p.FLAG_SEND_FLUSH | p.FLAG_SEND_FUA | p.FLAG_SEND_TRIM
              | p.FLAG_SEND_WRITE_ZEROES)


def recv_exactly(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise EOFError("client closed the connection")
        data += chunk
    return data


@dataclass
class Request:
    flags: int
    cmd: int
    cookie: int
    offset: int
    length: int
    payload: bytes = b""


class Wire:
    """The transmission phase seen from the server: requests in, replies out."""

    def __init__(self, conn: socket.socket):
        self.conn = conn

    def request(self) -> Request:
        magic, flags, cmd, cookie, offset, length = p.REQUEST.unpack(
            recv_exactly(self.conn, p.REQUEST.size))
        assert magic == p.REQUEST_MAGIC
        payload = recv_exactly(self.conn, length) if cmd == p.Cmd.WRITE else b""
        return Request(flags, cmd, cookie, offset, length, payload)

    def send(self, data: bytes) -> None:
        self.conn.sendall(data)

    def simple(self, cookie: int, error: int = 0, data: bytes = b"") -> None:
        self.send(p.SIMPLE_REPLY.pack(p.SIMPLE_REPLY_MAGIC, error, cookie) + data)

    def chunk(self, cookie: int, kind: int, payload: bytes = b"", done: bool = False,
              length: int | None = None) -> None:
        flags = p.REPLY_FLAG_DONE if done else 0
        self.send(p.STRUCTURED_REPLY.pack(p.STRUCTURED_REPLY_MAGIC, flags, kind, cookie,
                                          len(payload) if length is None else length) + payload)

    def data(self, cookie: int, offset: int, data: bytes, done: bool = False) -> None:
        self.chunk(cookie, p.ReplyType.OFFSET_DATA, _U64.pack(offset) + data, done)

    def hole(self, cookie: int, offset: int, size: int, done: bool = False) -> None:
        self.chunk(cookie, p.ReplyType.OFFSET_HOLE, struct.pack(">QI", offset, size), done)

    def error(self, cookie: int, error: int, message: bytes = b"", offset: int | None = None,
              done: bool = True, kind: int | None = None) -> None:
        body = struct.pack(">IH", error, len(message)) + message
        if offset is not None:
            body += _U64.pack(offset)
            kind = kind or p.ReplyType.ERROR_OFFSET
        self.chunk(cookie, kind or p.ReplyType.ERROR, body, done)

    def none(self, cookie: int) -> None:
        self.chunk(cookie, p.ReplyType.NONE, b"", True)

    def extents(self, cookie: int, context_id: int, extents: list[tuple[int, int]],
                done: bool = False) -> None:
        body = _U32.pack(context_id) + b"".join(struct.pack(">II", n, f) for n, f in extents)
        self.chunk(cookie, p.ReplyType.BLOCK_STATUS, body, done)


@dataclass
class FakeServer:
    """Negotiates as told (fixed newstyle), then runs ``script`` on the connection."""

    path: str
    script: Callable[[Wire], None] | None = None
    size: int = MiB
    flags: int = FAKE_FLAGS
    structured: bool = True
    go: bool = True
    no_zeroes: bool = True
    block_sizes: tuple[int, int, int] | None = None
    contexts: tuple[str, ...] = (p.META_BASE_ALLOCATION,)
    go_error: tuple[int, bytes] | None = None
    on_option: Callable[[socket.socket, int], bool] | None = None   # True: handled
    options: list[int] = field(default_factory=list)
    client_flags: int | None = None
    error: BaseException | None = None

    def __post_init__(self) -> None:
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(self.path)
        self.listener.listen(1)
        self.conn: socket.socket | None = None
        self.thread = threading.Thread(target=self._run, name="fake-nbd", daemon=True)
        self.thread.start()

    @property
    def uri(self) -> str:
        return NbdAddress(unix=self.path).uri

    def _run(self) -> None:
        try:
            conn, _ = self.listener.accept()
            self.conn = conn
            with conn:
                if self._negotiate(conn) and self.script is not None:
                    self.script(Wire(conn))
        except EOFError:
            pass
        except BaseException as exc:  # reported by join()
            self.error = exc

    def _reply(self, conn: socket.socket, opt: int, rep: int, data: bytes = b"") -> None:
        conn.sendall(p.OPTION_REPLY.pack(p.REPLY_MAGIC_OPT, opt, rep, len(data)) + data)

    def _negotiate(self, conn: socket.socket) -> bool:
        flags = p.FLAG_FIXED_NEWSTYLE | (p.FLAG_NO_ZEROES if self.no_zeroes else 0)
        conn.sendall(p.SERVER_GREETING.pack(p.NBDMAGIC, p.IHAVEOPT, flags))
        (self.client_flags,) = p.CLIENT_FLAGS.unpack(recv_exactly(conn, 4))
        while True:
            magic, opt, length = p.OPTION_HEADER.unpack(recv_exactly(conn, 16))
            assert magic == p.IHAVEOPT
            recv_exactly(conn, length)
            self.options.append(opt)
            if self.on_option is not None and self.on_option(conn, opt):
                continue
            if opt == p.Opt.STRUCTURED_REPLY:
                self._reply(conn, opt, p.Rep.ACK if self.structured else p.Rep.ERR_UNSUP)
            elif opt == p.Opt.SET_META_CONTEXT:
                for i, name in enumerate(self.contexts):
                    self._reply(conn, opt, p.Rep.META_CONTEXT, _U32.pack(7 + i) + name.encode())
                self._reply(conn, opt, p.Rep.ACK)
            elif opt == p.Opt.GO and self.go_error is not None:
                self._reply(conn, opt, *self.go_error)
            elif opt == p.Opt.GO and self.go:
                self._reply(conn, opt, p.Rep.INFO,
                            struct.pack(">HQH", p.Info.EXPORT, self.size, self.flags))
                if self.block_sizes is not None:
                    self._reply(conn, opt, p.Rep.INFO,
                                struct.pack(">HIII", p.Info.BLOCK_SIZE, *self.block_sizes))
                self._reply(conn, opt, p.Rep.INFO, struct.pack(">H", p.Info.NAME) + b"canon")
                self._reply(conn, opt, p.Rep.INFO, struct.pack(">H", 99) + b"future info")
                self._reply(conn, opt, p.Rep.ACK)
                return True
            elif opt == p.Opt.EXPORT_NAME:
                padding = b"" if self.client_flags & p.FLAG_C_NO_ZEROES else bytes(124)
                conn.sendall(p.EXPORT_NAME_REPLY.pack(self.size, self.flags) + padding)
                return True
            elif opt == p.Opt.ABORT:
                try:  # the client may close without waiting for this (proto.md allows it)
                    self._reply(conn, opt, p.Rep.ACK)
                except OSError:
                    pass
                return False
            else:
                self._reply(conn, opt, p.Rep.ERR_UNSUP)

    def join(self, timeout: float = 10.0) -> None:
        """Wait for the script to end (the client closed) and re-raise what failed in it."""
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "fake server still running"
        if self.error is not None:
            raise self.error

    def stop(self) -> None:
        for sock in (self.listener, self.conn):
            if sock is not None:
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
        self.thread.join(STOP_TIMEOUT)
        self.listener.close()


@pytest.fixture
def fake(tmp_path) -> Iterator[Callable[..., FakeServer]]:
    made: list[FakeServer] = []

    def make(script: Callable[[Wire], None] | None = None, **kw) -> FakeServer:
        server = FakeServer(str(tmp_path / f"fake{len(made)}.sock"), script, **kw)
        made.append(server)
        return server

    try:
        yield make
    finally:
        for server in made:
            server.stop()


def test_fake_structured_read_out_of_order_with_holes(fake):
    data = pattern(11, 64 * KiB)
    expected = data[:16 * KiB] + bytes(16 * KiB) + data[32 * KiB:]
    seen: list[Request] = []

    def script(w: Wire) -> None:
        r = w.request()
        seen.append(r)
        base = r.offset
        w.data(r.cookie, base + 48 * KiB, data[48 * KiB:])
        w.hole(r.cookie, base + 16 * KiB, 16 * KiB)
        w.data(r.cookie, base, data[:16 * KiB])
        w.data(r.cookie, base + 32 * KiB, data[32 * KiB:48 * KiB], done=True)
        r = w.request()
        w.hole(r.cookie, r.offset, r.length, done=True)
        assert w.request().cmd == p.Cmd.DISC

    server = fake(script, size=4 * MiB)
    with NbdClient.connect(server.uri) as c:
        assert c.pread(64 * KiB, 4096) == expected
        buf = bytearray(b"\xff" * 4 * MiB)
        c.pread_into(buf, 0)           # a hole larger than the zero block used to fill it
        assert buf == bytes(4 * MiB)
    server.join()
    assert (seen[0].cmd, seen[0].offset, seen[0].length) == (p.Cmd.READ, 4096, 64 * KiB)


def test_fake_split_read_with_replies_interleaved_across_cookies(fake):
    data = pattern(12, 16 * KiB)

    def script(w: Wire) -> None:
        reqs = [w.request() for _ in range(4)]
        assert [(r.offset, r.length) for r in reqs] == [(i * 4096, 4096) for i in range(4)]
        for r in reversed(reqs):
            w.data(r.cookie, r.offset + 2048, data[r.offset + 2048:r.offset + 4096])
        for r in reqs:
            w.data(r.cookie, r.offset, data[r.offset:r.offset + 2048])
            w.none(r.cookie)

    server = fake(script, block_sizes=(512, 4096, 4096), size=64 * KiB)
    with NbdClient.connect(server.uri) as c:
        assert (c.min_block_size, c.preferred_block_size, c.max_block_size) == (512, 4096, 4096)
        assert c.pread(16 * KiB, 0) == data
    server.join()


def test_fake_error_chunks_fail_reads_with_the_servers_errno(fake):
    def script(w: Wire) -> None:
        r = w.request()
        w.error(r.cookie, p.Err.EIO, b"disk on\nfire")
        r = w.request()
        w.data(r.cookie, r.offset, bytes(1024))
        w.error(r.cookie, p.Err.EIO, b"bad sector", offset=r.offset + 1500, done=False)
        w.hole(r.cookie, r.offset + 1024, 3072, done=False)
        w.none(r.cookie)
        r = w.request()
        w.error(r.cookie, p.Err.EPERM, b"future", kind=(1 << 15) + 77)
        r = w.request()
        w.error(r.cookie, 1234)
        r = w.request()
        w.data(r.cookie, r.offset, b"ok" * 2048, done=True)
        r = w.request()
        w.simple(r.cookie, p.Err.ENOSPC)            # a simple reply to a write is fine
        w.request()

    server = fake(script)
    with NbdClient.connect(server.uri) as c:
        with pytest.raises(NbdError, match=r"NBD_CMD_READ of 4096 bytes at offset 0 failed "
                                           r"on nbd\+unix.*: EIO: disk on fire$") as info:
            c.pread(4096, 0)
        assert info.value.error == p.Err.EIO and info.value.errno_name == "EIO"
        with pytest.raises(NbdError, match="EIO: at offset 5596: bad sector"):
            c.pread(4096, 4096)
        with pytest.raises(NbdError, match="EPERM: future") as info:
            c.pread(4096, 8192)
        with pytest.raises(NbdError, match=r"EINVAL \(unknown error 1234\)") as info:
            c.pread(4096, 0)
        assert info.value.error == 1234 and info.value.errno_name == "EINVAL"
        assert c.pread(4096, 0) == b"ok" * 2048
        with pytest.raises(NbdError, match="ENOSPC"):
            c.pwrite(b"w" * 10, 0)


def test_fake_write_replies_in_reverse_order_match_their_cookies(fake):
    def script(w: Wire) -> None:
        reqs = [w.request() for _ in range(10)]
        assert [r.payload for r in reqs] == [bytes([i]) * 100 for i in range(10)]
        for r in reversed(reqs):
            if r.offset == 300:
                w.error(r.cookie, p.Err.ENOSPC, b"full")
            elif r.offset % 200:
                w.simple(r.cookie)
            else:
                w.none(r.cookie)
        reqs = [w.request() for _ in range(3)]
        assert [r.cmd for r in reqs] == [p.Cmd.WRITE_ZEROES, p.Cmd.TRIM, p.Cmd.FLUSH]
        assert reqs[0].flags == p.CMD_FLAG_FUA | p.CMD_FLAG_NO_HOLE
        for r in reqs:
            w.simple(r.cookie)

    server = fake(script)
    with NbdClient.connect(server.uri) as c:
        cookies = [c.submit_write(bytes([i]) * 100, i * 100) for i in range(10)]
        for i, cookie in enumerate(cookies):
            if i == 3:
                with pytest.raises(NbdError, match="NBD_CMD_WRITE of 100 bytes at offset 300 "
                                                   ".*ENOSPC: full"):
                    c.wait(cookie)
            else:
                c.wait(cookie)
        cookies = [c.submit_zero(0, 512, fua=True, no_hole=True), c.submit_trim(512, 512),
                   c.submit_flush()]
        c.wait_all()
    server.join()


def _read_reply(build: Callable[[Wire, Request], None]) -> Callable[[Wire], None]:
    def script(w: Wire) -> None:
        build(w, w.request())
        while True:
            w.request()
    return script


@pytest.mark.parametrize("reply, words", [
    (lambda w, r: w.simple(r.cookie + 1000), "no request in flight"),
    (lambda w, r: w.send(b"\x12\x34\x56\x78" + bytes(12)), "bad reply magic"),
    (lambda w, r: w.data(r.cookie, r.offset + 4096, b"x" * 4096, done=True), "outside"),
    (lambda w, r: w.data(r.cookie, r.offset - 1, b"x" * 10, done=True), "outside"),
    (lambda w, r: w.hole(r.cookie, r.offset + 4000, 1024, done=True), "outside"),
    (lambda w, r: w.hole(r.cookie, r.offset, 0, done=True), "size 0"),
    (lambda w, r: w.chunk(r.cookie, p.ReplyType.OFFSET_DATA, length=1 << 30),
     "exceeds the limit"),
    (lambda w, r: w.chunk(r.cookie, p.ReplyType.OFFSET_DATA, _U64.pack(r.offset), True),
     "OFFSET_DATA of 8 bytes"),
    (lambda w, r: w.data(r.cookie, r.offset, b"x" * 2048, done=True), "2048 bytes of data"),
    (lambda w, r: (w.data(r.cookie, r.offset, b"x" * 4096), w.hole(r.cookie, r.offset, 4096),
                   w.none(r.cookie)), "8192 bytes of data"),
    (lambda w, r: w.simple(r.cookie, 0, b"x" * 4096), "simple reply to NBD_CMD_READ"),
    (lambda w, r: w.extents(r.cookie, 7, [(4096, 0)], done=True), "BLOCK_STATUS chunk"),
    (lambda w, r: w.chunk(r.cookie, p.ReplyType.NONE, b"", done=False), "without DONE"),
    (lambda w, r: w.chunk(r.cookie, 77, b"", done=True), "unknown reply chunk type"),
    (lambda w, r: w.error(r.cookie, 0), "malformed error chunk"),
    (lambda w, r: w.chunk(r.cookie, p.ReplyType.ERROR, struct.pack(">IH", 5, 100) + b"x"),
     "malformed error chunk"),
    (lambda w, r: w.error(r.cookie, 5, b"", offset=r.offset + 4096), "outside the request"),
    (lambda w, r: w.chunk(r.cookie, p.ReplyType.ERROR, bytes(20000)), "error chunk of"),
])
def test_fake_protocol_violations_end_the_connection(fake, reply, words):
    server = fake(_read_reply(reply))
    c = NbdClient.connect(server.uri)
    try:
        with pytest.raises(ProtocolError, match=words) as info:
            c.pread(4096, 8192)
        assert "broke the protocol" in info.value.message
        assert "\n" not in info.value.message
        with pytest.raises(ProtocolError, match="the connection is closed"):
            c.pread(4096, 0)
        with pytest.raises(ProtocolError):
            c.submit_write(b"x", 0)
    finally:
        c.close()


def test_fake_structured_chunk_without_structured_replies_is_a_violation(fake):
    server = fake(_read_reply(lambda w, r: w.none(r.cookie)), structured=False)
    with NbdClient.connect(server.uri) as c:
        assert not c.structured
        with pytest.raises(ProtocolError, match="not negotiated"):
            c.pwrite(b"x", 0)


@pytest.mark.parametrize("no_zeroes", [True, False])
def test_fake_go_unsupported_falls_back_to_export_name(fake, no_zeroes):
    def script(w: Wire) -> None:
        r = w.request()
        w.simple(r.cookie, 0, b"abc")
        w.request()

    server = fake(script, go=False, structured=False, no_zeroes=no_zeroes, size=12345,
                  flags=p.FLAG_HAS_FLAGS | p.FLAG_READ_ONLY)
    with NbdClient.connect(server.uri, meta_contexts=[p.META_BASE_ALLOCATION]) as c:
        assert (c.size, c.read_only, c.structured, c.contexts) == (12345, True, False, {})
        assert (c.min_block_size, c.preferred_block_size, c.max_block_size) == \
            (1, 4096, 32 * MiB)
        assert c.pread(3, 0) == b"abc"
    server.join()
    assert server.options == [p.Opt.STRUCTURED_REPLY, p.Opt.GO, p.Opt.EXPORT_NAME]
    assert server.client_flags == p.FLAG_C_FIXED_NEWSTYLE | (p.FLAG_C_NO_ZEROES if no_zeroes
                                                             else 0)


def test_fake_negotiation_order(fake):
    server = fake(_read_reply(lambda w, r: w.none(r.cookie)), size=4096)
    with NbdClient.connect(server.uri, meta_contexts=[p.META_BASE_ALLOCATION]) as c:
        assert c.contexts == {p.META_BASE_ALLOCATION: 7}
        c.pwrite(b"x", 0)
    assert server.options == [p.Opt.STRUCTURED_REPLY, p.Opt.SET_META_CONTEXT, p.Opt.GO]


@pytest.mark.parametrize("go_error, error_type, words", [
    ((p.Rep.ERR_UNKNOWN, b"no such thing"), NbdExportError,
     "has no export named 'vm9' \\(no such thing\\)$"),
    ((p.Rep.ERR_TLS_REQD, b""), NbdExportError, "requires TLS: use an nbds://"),
    ((p.Rep.ERR_POLICY, b"go away\n"), NbdExportError,
     "refused NBD_OPT_GO: NBD_REP_ERR_POLICY \\(go away\\)$"),
    ((p.Rep.SERVER, b""), ProtocolError, "unexpected NBD_REP_SERVER"),
])
def test_fake_refused_export(fake, go_error, error_type, words):
    server = fake(go_error=go_error)
    with pytest.raises(error_type, match=words) as info:
        NbdClient.connect(NbdAddress(unix=server.path, export="vm9"))
    assert "\n" not in info.value.message
    server.join()
    if error_type is NbdExportError:
        assert server.options[-1] == p.Opt.ABORT   # a soft disconnect, as proto.md asks


def test_fake_oversized_option_reply_is_refused_before_reading_it(fake):
    def on_option(conn: socket.socket, opt: int) -> bool:
        if opt == p.Opt.STRUCTURED_REPLY:
            conn.sendall(p.OPTION_REPLY.pack(p.REPLY_MAGIC_OPT, opt, p.Rep.ACK, 1 << 30))
            return True
        return False

    server = fake(on_option=on_option)
    with pytest.raises(ProtocolError, match="exceeds the limit of 65536"):
        NbdClient.connect(server.uri, timeout=30)


def test_fake_option_reply_to_another_option_is_a_violation(fake):
    def on_option(conn: socket.socket, opt: int) -> bool:
        conn.sendall(p.OPTION_REPLY.pack(p.REPLY_MAGIC_OPT, p.Opt.LIST, p.Rep.ACK, 0))
        return True

    with pytest.raises(ProtocolError, match="reply to NBD_OPT_LIST while waiting for"):
        NbdClient.connect(fake(on_option=on_option).uri)


def test_fake_invalid_block_sizes_are_a_violation(fake):
    server = fake(block_sizes=(3, 4096, 65536))
    with pytest.raises(ProtocolError, match="invalid block sizes: minimum 3"):
        NbdClient.connect(server.uri)


def test_fake_silent_server_times_out_naming_it(fake):
    def script(w: Wire) -> None:
        w.request()
        w.request()  # blocks until the client goes

    server = fake(script)
    c = NbdClient.connect(server.uri)
    c.timeout = 0.5
    try:
        began = time.monotonic()
        with pytest.raises(UnreachableError, match="did not answer within 0.5 s") as info:
            c.pread(4096, 0)
        assert server.uri in info.value.message
        assert time.monotonic() - began < 5
    finally:
        c.close()


def test_fake_block_status_merges_clips_and_asks_again(fake):
    def script(w: Wire) -> None:
        r = w.request()
        assert (r.cmd, r.offset, r.length) == (p.Cmd.BLOCK_STATUS, 0, 64 * KiB)
        w.extents(r.cookie, 8, [(64 * KiB, 1)])                    # the other context
        w.extents(r.cookie, 7, [(4 * KiB, 0), (4 * KiB, 0), (8 * KiB, 3)], done=True)
        r = w.request()
        assert (r.offset, r.length) == (16 * KiB, 48 * KiB)
        w.extents(r.cookie, 7, [(16 * KiB, 3), (MiB, 0)], done=True)  # the last one overhangs
        r = w.request()
        w.extents(r.cookie, 9, [(4096, 0)], done=True)
        w.request()

    server = fake(script, contexts=(p.META_BASE_ALLOCATION, "qemu:dirty-bitmap:b"))
    with NbdClient.connect(server.uri, meta_contexts=[p.META_BASE_ALLOCATION,
                                                      "qemu:dirty-bitmap:b"]) as c:
        assert c.contexts == {p.META_BASE_ALLOCATION: 7, "qemu:dirty-bitmap:b": 8}
        assert c.block_status(0, 64 * KiB) == [(8 * KiB, 0), (24 * KiB, 3), (32 * KiB, 0)]
        with pytest.raises(ProtocolError, match="unknown meta context id 9"):
            c.block_status(0, 4096)
