"""bmig.wire.ssh against a real sshd: both implementations (paramiko in process, the
system ssh as a child) move bytes exactly, forward the remote stderr, check host keys
and explain a remote command that ends at once.

``throughput()`` measures a stream; ``python -m tests.integration.test_ssh_transport
[MiB]`` prints the comparison of paramiko, the ssh child and plain ``dd | ssh``.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import shlex
import signal
import socket
import stat
import statistics
import subprocess
import sys
import threading
import time
from typing import Callable, Iterator

import paramiko
import pytest

from bmig.errors import AuthError, ConfigError, UnreachableError
from bmig.wire.ssh import SshTarget, failure_hint, open_openssh, open_paramiko
from bmig.wire.ssh.ciphers import aes_in_hardware
from bmig.wire.ssh.inprocess import paramiko_ciphers
from bmig.wire.ssh.openssh import openssh_argv
from bmig.wire.transports import FdStream, Stream
from tests.daemon import wait_until
from tests import sshd as sshd_fixture
from tests.sshd import Sshd, known_hosts_name, make_key, write_known_hosts

sshd = sshd_fixture.sshd      # the fixture: a real sshd per test

Opener = Callable[[SshTarget, str], Stream]
OPENERS: dict[str, Opener] = {"paramiko": open_paramiko, "openssh": open_openssh}
PYTHON = shlex.quote(sys.executable)
MiB = 1 << 20


@pytest.fixture(params=sorted(OPENERS))
def opener(request) -> Opener:
    return OPENERS[request.param]


@pytest.fixture
def streams() -> Iterator[Callable[[Opener, SshTarget, str], Stream]]:
    """Opens streams and closes every one at teardown, even when a test fails."""
    opened: list[Stream] = []

    def open_stream(opener: Opener, target: SshTarget, command: str) -> Stream:
        stream = opener(target, command)
        opened.append(stream)
        return stream

    yield open_stream
    for stream in reversed(opened):
        stream.close()


def recv_exactly(stream: Stream, size: int) -> bytes:
    buf = bytearray(size)
    view = memoryview(buf)
    got = 0
    while got < size:
        n = stream.recv_into(view[got:])
        assert n, f"end of stream after {got} of {size} bytes"
        got += n
    return bytes(buf)


def recv_to_end(stream: Stream) -> bytes:
    chunks = []
    buf = bytearray(64 * 1024)
    while n := stream.recv_into(memoryview(buf)):
        chunks.append(bytes(buf[:n]))
    return b"".join(chunks)


def send_in_thread(stream: Stream, parts: list) -> Callable[[], None]:
    """Send ``parts`` (in a few send calls) while the caller reads; returns join()."""
    errors: list[BaseException] = []

    def run() -> None:
        try:
            for i in range(0, len(parts), 3):
                stream.send(parts[i:i + 3])
        except BaseException as exc:   # noqa: BLE001 - re-raised by join()
            errors.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()

    def join() -> None:
        thread.join(timeout=60)
        assert not thread.is_alive(), "sender thread hangs"
        if errors:
            raise errors[0]
    return join


def mixed_parts(data: bytes) -> list:
    """``data`` cut into parts of uneven sizes and every buffer type send() takes."""
    parts, offset, size = [], 0, 1
    kinds = (bytes, bytearray, memoryview)
    while offset < len(data):
        piece = data[offset:offset + size]
        parts.append(kinds[len(parts) % 3](piece))
        offset += len(piece)
        size = size * 7 % 300_001 + 1
    return parts


def other_host_key(tmp_path) -> str:
    return make_key(str(tmp_path / "impostor")).public_line


# -- bytes ----------------------------------------------------------------------------------

def test_one_mib_round_trip_is_byte_exact(sshd: Sshd, opener: Opener, streams):
    data = os.urandom(MiB)
    stream = streams(opener, sshd.target(), "cat")
    join = send_in_thread(stream, mixed_parts(data))
    echoed = recv_exactly(stream, len(data))
    join()
    assert echoed == data
    stream.close()
    assert stream.exit_status() == 0


def test_send_with_nothing_in_it_sends_nothing(sshd: Sshd, opener: Opener, streams):
    stream = streams(opener, sshd.target(), "head -c 3")
    stream.send([b"", bytearray(), memoryview(b"")])
    stream.send([b"a", b"", memoryview(b"bc")])
    assert recv_to_end(stream) == b"abc"


def test_close_twice_and_after_the_remote_end_says_nothing(sshd: Sshd, opener: Opener):
    stream = opener(sshd.target(), "true")
    assert recv_to_end(stream) == b""
    stream.close()
    stream.close()
    assert stream.exit_status() == 0


# -- remote stderr ----------------------------------------------------------------------

def test_remote_stderr_reaches_the_log(sshd: Sshd, opener: Opener, caplog):
    caplog.set_level(logging.INFO, logger="bmig.remote")
    script = "import sys; sys.stderr.write('receiver: ready\\nlast words, no newline')"
    stream = opener(sshd.target(), f"{PYTHON} -c {shlex.quote(script)}")
    try:
        assert recv_to_end(stream) == b""
    finally:
        stream.close()        # waits for the stderr thread: every line is logged now
    remote = [r for r in caplog.records if r.name == "bmig.remote"]
    assert [r.getMessage() for r in remote] == ["remote: receiver: ready",
                                                "remote: last words, no newline"]
    assert all(r.levelno == logging.INFO for r in remote)


# -- host keys --------------------------------------------------------------------------

@pytest.mark.parametrize("accept_new", [False, True], ids=["strict", "accept-new"])
def test_changed_host_key_is_refused(sshd: Sshd, opener: Opener, tmp_path, accept_new):
    known_hosts = write_known_hosts(str(tmp_path / "known_hosts"), sshd.host, sshd.port,
                                    other_host_key(tmp_path))
    before = open(known_hosts).read()
    with pytest.raises(AuthError, match="HAS CHANGED") as caught:
        opener(sshd.target(known_hosts=known_hosts, accept_new_host_key=accept_new), "true")
    assert "\n" not in caught.value.message
    assert f"[{sshd.host}]:{sshd.port}" in caught.value.message
    assert open(known_hosts).read() == before


def test_unknown_host_key_is_refused(sshd: Sshd, opener: Opener, tmp_path):
    known_hosts = str(tmp_path / "known_hosts")
    with pytest.raises(AuthError, match="is not known") as caught:
        opener(sshd.target(known_hosts=known_hosts), "true")
    assert "--accept-new-host-key" in caught.value.message
    assert not os.path.exists(known_hosts)


def test_the_key_listed_for_the_bare_host_counts_on_another_port(
        sshd: Sshd, opener: Opener, tmp_path, streams):
    """known_hosts names a port other than 22 as [host]:port; like OpenSSH, the very same
    key listed for the bare host name is trusted too."""
    known_hosts = write_known_hosts(str(tmp_path / "known_hosts"), sshd.host, 22,
                                    sshd.host_key.public_line)
    stream = streams(opener, sshd.target(known_hosts=known_hosts), "echo trusted")
    assert recv_to_end(stream) == b"trusted\n"


def test_another_key_listed_for_the_bare_host_is_not_trusted(
        sshd: Sshd, opener: Opener, tmp_path):
    known_hosts = write_known_hosts(str(tmp_path / "known_hosts"), sshd.host, 22,
                                    other_host_key(tmp_path))
    with pytest.raises(AuthError, match="is not known"):
        opener(sshd.target(known_hosts=known_hosts), "true")


@pytest.mark.parametrize("then", sorted(OPENERS))
def test_new_host_key_is_accepted_saved_and_trusted_after(
        sshd: Sshd, opener: Opener, tmp_path, caplog, streams, then):
    known_hosts = str(tmp_path / "known_hosts")
    stream = streams(opener, sshd.target(known_hosts=known_hosts, accept_new_host_key=True),
                     "cat")
    stream.send([b"ping"])
    assert recv_exactly(stream, 4) == b"ping"
    saved = paramiko.HostKeys(known_hosts).lookup(known_hosts_name(sshd.host, sshd.port))
    assert saved is not None and saved["ssh-ed25519"].fingerprint == sshd.host_key_fingerprint
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(sshd.host_key_fingerprint in w and "accepted" in w for w in warnings), warnings
    # what one implementation saved, the other (or itself) trusts without accept-new
    again = streams(OPENERS[then], sshd.target(known_hosts=known_hosts), "echo trusted")
    assert recv_to_end(again) == b"trusted\n"


# -- logging in ---------------------------------------------------------------------------

def test_key_the_server_does_not_know_is_refused(sshd: Sshd, opener: Opener, tmp_path):
    stranger = make_key(str(tmp_path / "stranger")).private
    with pytest.raises(AuthError, match="refused to log in") as caught:
        opener(sshd.target(identity=stranger), "true")
    assert stranger in caught.value.message


def test_missing_identity_file_is_a_config_error(sshd: Sshd, opener: Opener, tmp_path):
    missing = str(tmp_path / "no-such-key")
    with pytest.raises(ConfigError, match="does not exist"):
        opener(sshd.target(identity=missing), "true")


def test_nobody_listening_is_unreachable(opener: Opener, tmp_path):
    with socket.socket() as bound_not_listening:   # holds the port: nobody else can listen
        bound_not_listening.bind(("127.0.0.1", 0))
        port = bound_not_listening.getsockname()[1]
        target = SshTarget("127.0.0.1", port, known_hosts=str(tmp_path / "kh"),
                           connect_timeout=10)
        with pytest.raises(UnreachableError, match=f"cannot connect to 127.0.0.1:{port}"):
            opener(target, "true")


# -- ciphers ----------------------------------------------------------------------------

@pytest.fixture
def ctr_only_sshd(tmp_path) -> Iterator[Sshd]:
    """An sshd that speaks aes128-ctr and no other cipher."""
    with sshd_fixture.running_sshd(str(tmp_path / "sshd-ctr"), ["Ciphers aes128-ctr"]) as server:
        yield server


def test_only_the_cipher_asked_for_is_offered(ctr_only_sshd: Sshd, opener: Opener, streams,
                                              caplog):
    """Asked for aes128-gcm, the client must not fall back to the server's aes128-ctr."""
    with pytest.raises(UnreachableError, match="share no algorithm .*cipher"):
        opener(ctr_only_sshd.target(cipher="aes128-gcm@openssh.com"), "true")
    noise = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert noise == [], "the one-line error is all the user should see"
    stream = streams(opener, ctr_only_sshd.target(cipher="aes128-ctr"), "cat")
    stream.send([b"x" * 100_000])
    assert recv_exactly(stream, 100_000) == b"x" * 100_000


@pytest.mark.parametrize("cipher", ["aes128-ctr", "aes128-gcm@openssh.com"])
def test_paramiko_uses_the_cipher_asked_for(sshd: Sshd, streams, cipher):
    stream = streams(open_paramiko, sshd.target(cipher=cipher), "cat")
    stream.send([b"x" * 100_000])
    assert recv_exactly(stream, 100_000) == b"x" * 100_000
    assert (stream.transport.local_cipher, stream.transport.remote_cipher) == (cipher, cipher)


needs_aes = pytest.mark.skipif(not aes_in_hardware(), reason="no AES instructions here")


@needs_aes
def test_paramiko_prefers_aes_gcm_when_no_cipher_is_asked_for(sshd: Sshd, streams):
    """paramiko's own first choice is aes128-ctr with a MAC computed in Python."""
    stream = streams(open_paramiko, sshd.target(), "cat")
    stream.send([b"x" * 100_000])
    assert recv_exactly(stream, 100_000) == b"x" * 100_000
    assert stream.transport.local_cipher == "aes128-gcm@openssh.com"


@needs_aes
def test_ssh_offers_its_own_ciphers_with_aes_gcm_first_when_none_is_asked_for(
        sshd: Sshd, streams):
    """ssh's own first choice is chacha20-poly1305; its list comes from ``ssh -G``, so
    the user's ssh_config keeps deciding what is offered."""
    stream = streams(open_openssh, sshd.target(), "cat")
    argv = stream.proc.args
    offered = argv[argv.index("-c") + 1].split(",")
    ssh_g = subprocess.run(["ssh", "-G", "-p", str(sshd.port), "127.0.0.1"],
                           capture_output=True, text=True, timeout=30, check=True).stdout
    own = next(line.split()[1] for line in ssh_g.splitlines() if line.startswith("ciphers "))
    assert offered[0] == "aes128-gcm@openssh.com"
    assert sorted(offered) == sorted(own.split(","))
    stream.send([b"x" * 100_000])
    assert recv_exactly(stream, 100_000) == b"x" * 100_000


def test_with_no_cipher_asked_for_a_server_without_aes_gcm_is_still_reached(
        ctr_only_sshd: Sshd, opener: Opener, streams):
    stream = streams(opener, ctr_only_sshd.target(), "cat")
    stream.send([b"x" * 100_000])
    assert recv_exactly(stream, 100_000) == b"x" * 100_000


def test_paramiko_refuses_a_cipher_it_does_not_have(sshd: Sshd):
    assert "chacha20-poly1305@openssh.com" not in paramiko_ciphers()
    with pytest.raises(ConfigError, match="aes128-gcm@openssh.com"):
        open_paramiko(sshd.target(cipher="chacha20-poly1305@openssh.com"), "true")


def test_ssh_refuses_a_cipher_it_does_not_know(sshd: Sshd):
    with pytest.raises(ConfigError, match="ssh -Q cipher"):
        open_openssh(sshd.target(cipher="rot13-cbc"), "true")


# -- a remote command that ends at once ---------------------------------------------------

def test_missing_remote_command_has_a_clear_hint(sshd: Sshd, opener: Opener, streams):
    stream = streams(opener, sshd.target(), "bmig-no-such-receiver --stdio")
    assert stream.recv_into(memoryview(bytearray(4096))) == 0
    assert stream.exit_status() == 127
    hint = failure_hint(stream)
    assert hint is not None and "\n" not in hint
    assert hint.startswith("remote command 'bmig-no-such-receiver --stdio' exited with status "
                           "127: ")
    assert "bmig-no-such-receiver: command not found" in hint
    assert hint.endswith("; install bmig on the remote host or set the remote command")


def test_hint_quotes_the_last_line_the_receiver_said(sshd: Sshd, opener: Opener, streams):
    command = "echo 'starting' >&2; echo 'breceive: /dev/vdb is busy' >&2; exit 3"
    stream = streams(opener, sshd.target(), command)
    assert recv_to_end(stream) == b""
    assert failure_hint(stream) == (f"remote command {command!r} exited with status 3: "
                                    f"breceive: /dev/vdb is busy; see the remote: lines in "
                                    f"the log for the receiver's own words")


def test_status_255_may_be_ssh_itself(sshd: Sshd, streams):
    stream = streams(open_openssh, sshd.target(), "echo 'Connection reset' >&2; exit 255")
    assert recv_to_end(stream) == b""
    hint = failure_hint(stream)
    assert hint is not None and hint.startswith(
        f"ssh to {sshd.user}@{sshd.host}:{sshd.port} exited with status 255 (an ssh error, ")
    assert ": Connection reset; " in hint


def test_no_hint_for_a_stream_that_cannot_tell():
    read_fd, write_fd = os.pipe()
    pipe = FdStream(read_fd, write_fd, "a pipe")
    try:
        assert failure_hint(pipe) is None
    finally:
        pipe.close()


# -- the ssh child ------------------------------------------------------------------------

def test_openssh_argv_carries_every_setting():
    target = SshTarget("db1.example", 2222, user="bmig", known_hosts="/k/known hosts",
                       accept_new_host_key=True, identity="/k/id", cipher="aes128-ctr",
                       connect_timeout=7.5)
    assert openssh_argv(target, "breceive --stdio vm1") == [
        "ssh", "-o", "BatchMode=yes", "-o", "ConnectTimeout=8", "-p", "2222", "-l", "bmig",
        "-i", "/k/id", "-o", "IdentitiesOnly=yes",
        "-o", 'UserKnownHostsFile="/k/known hosts"', "-o", "StrictHostKeyChecking=accept-new",
        "-c", "aes128-ctr", "-o", "LogLevel=INFO", "-o", "PermitLocalCommand=yes",
        "-o", "LocalCommand=/bin/sh -c 'echo bmig: ssh logged in >&2'", "-o", "ControlPath=none",
        "-e", "none", "-T", "--", "db1.example", "breceive --stdio vm1"]
    strict = openssh_argv(SshTarget("h"), "c")
    assert "StrictHostKeyChecking=yes" in strict and "-l" not in strict and "-c" not in strict


def test_ssh_child_is_out_of_reach_of_the_terminals_ctrl_c(sshd: Sshd, streams):
    """Its own process group: the Ctrl-C the terminal sends to ours does not reach it."""
    stream = streams(open_openssh, sshd.target(), "cat")
    assert os.getpgid(stream.proc.pid) == stream.proc.pid != os.getpgrp()


def test_ssh_reads_its_input_from_a_socket_pair(sshd: Sshd, streams):
    """Not a pipe: a writer blocked on a full pipe wakes for every 32 KiB ssh reads; a
    socket's writer waits until most of its send buffer is taken (bmig.wire.ssh.openssh)."""
    stream = streams(open_openssh, sshd.target(), "cat")
    assert os.readlink(f"/proc/{stream.proc.pid}/fd/0").startswith("socket:")
    assert stat.S_ISSOCK(os.fstat(stream.write_fd).st_mode)
    assert os.read(stream.write_fd, 1) == b""     # one way only: shut for reading


def test_one_large_buffer_into_ssh_arrives_whole(sshd: Sshd, streams):
    """8 MiB in one send, many times the socket's buffer: the rest of every partial
    write follows, and ``head -c`` sees the last byte."""
    data = os.urandom(8 * MiB)
    stream = streams(open_openssh, sshd.target(),
                     f"head -c {len(data)} | {PYTHON} -c "
                     f"'import hashlib, sys; print(hashlib.sha256(sys.stdin.buffer.read())"
                     f".hexdigest())'")
    stream.send([memoryview(data)])
    assert recv_to_end(stream).decode().strip() == hashlib.sha256(data).hexdigest()
    assert stream.exit_status() == 0


def test_sending_to_an_ssh_that_has_exited_is_an_error(sshd: Sshd, streams):
    stream = streams(open_openssh, sshd.target(), "true")
    assert recv_to_end(stream) == b""
    assert stream.exit_status() == 0
    with pytest.raises(BrokenPipeError):
        stream.send([b"x" * MiB])


def release_fifo_reader(path: str) -> None:
    """Let a remote ``head -c1 FIFO`` (blocked opening it) read one byte and exit."""
    def open_writer() -> int | None:
        try:
            return os.open(path, os.O_WRONLY | os.O_NONBLOCK)
        except OSError as exc:
            if exc.errno == errno.ENXIO:    # no reader yet
                return None
            raise
    fd = wait_until(open_writer, timeout=20, what=f"a reader on {path}")
    os.write(fd, b"x")
    os.close(fd)


def test_close_does_not_wait_forever_for_a_remote_that_will_not_end(
        sshd: Sshd, opener: Opener, tmp_path):
    fifo = str(tmp_path / "hold")
    os.mkfifo(fifo)
    stream = opener(sshd.target(), f"cat > /dev/null; exec head -c1 {shlex.quote(fifo)}")
    stream.close_timeout = 0.5
    started = time.monotonic()
    try:
        stream.close()
        took = time.monotonic() - started
    finally:
        release_fifo_reader(fifo)
    assert 0.5 <= took < 10
    if opener is open_openssh:
        assert stream.proc.returncode == -signal.SIGKILL
    else:
        assert not stream.transport.is_active()


# -- throughput -----------------------------------------------------------------------------

def throughput(stream_factory: Callable[[str], Stream], nbytes: int,
               block: int = 1 * MiB) -> float:
    """MB/s (10**6 bytes per second) sending ``nbytes`` through a fresh stream.

    The remote command is ``head -c N > /dev/null && echo done``: the Stream API has no
    half-close to tell ``cat > /dev/null`` the data is over, and "done" proves every
    byte arrived. The clock runs from the first send to "done" (no login).
    """
    stream = stream_factory(f"head -c {nbytes} > /dev/null && echo done")
    try:
        payload = memoryview(os.urandom(block))
        started = time.perf_counter()
        for offset in range(0, nbytes, block):
            stream.send([payload[:min(block, nbytes - offset)]])
        assert recv_exactly(stream, 5) == b"done\n"
        return nbytes / (time.perf_counter() - started) / 1e6
    finally:
        stream.close()


def test_throughput_measures_both(sshd: Sshd, opener: Opener):
    assert throughput(lambda command: opener(sshd.target(), command), 4 * MiB) > 0


def dd_into_ssh(target: SshTarget, nbytes: int, remote: str = "cat > /dev/null") -> float:
    """MB/s of ``dd if=/dev/zero bs=1M | ssh -c CIPHER HOST 'cat > /dev/null'``, minus
    the time the same ssh takes to log in and run ``true``."""
    def timed(argv: list[str], count: int) -> float:
        started = time.perf_counter()
        dd = subprocess.Popen(["dd", "if=/dev/zero", "bs=1M", f"count={count}", "status=none"],
                              stdout=subprocess.PIPE)
        assert dd.stdout is not None
        subprocess.run(argv, stdin=dd.stdout, check=True, capture_output=True, timeout=600)
        dd.stdout.close()
        dd.wait(timeout=60)
        return time.perf_counter() - started
    login = timed(openssh_argv(target, "true"), 0)
    return nbytes / (timed(openssh_argv(target, remote), nbytes // MiB) - login) / 1e6


def report(sshd_: Sshd, nbytes: int, rounds: int) -> None:
    """Medians over ``rounds``, each round running every line once (so the load of a busy
    machine falls on all of them alike)."""
    rows: dict[str, list[float]] = {}
    for _ in range(rounds):
        for cipher in ("aes128-gcm@openssh.com", "aes128-ctr", "chacha20-poly1305@openssh.com"):
            target = sshd_.target(cipher=cipher)
            rows.setdefault(f"dd | ssh -c {cipher}", []).append(dd_into_ssh(target, nbytes))
            rows.setdefault(f"open_openssh {cipher}", []).append(
                throughput(lambda command: open_openssh(target, command), nbytes))
            if cipher in paramiko_ciphers():
                rows.setdefault(f"open_paramiko {cipher}", []).append(
                    throughput(lambda command: open_paramiko(target, command), nbytes))
    for name, values in rows.items():
        print(f"{name:45} median {statistics.median(values):6.0f} MB/s "
              f"(min {min(values):.0f}, max {max(values):.0f})")


def main() -> None:
    import tempfile
    from tests.sshd import running_sshd
    mib = int(sys.argv[1]) if len(sys.argv) > 1 else 512
    rounds = int(sys.argv[2]) if len(sys.argv) > 2 else 3
    with tempfile.TemporaryDirectory(prefix="bmig-ssh-bench-") as directory:
        with running_sshd(directory) as server:
            print(f"sending {mib} MiB to the local sshd, {rounds} rounds, "
                  f"{os.cpu_count()} CPUs")
            report(server, mib * MiB, rounds)


if __name__ == "__main__":
    main()
