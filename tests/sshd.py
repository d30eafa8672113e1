"""A real OpenSSH server for tests: throw-away keys, an ephemeral port, stopped after.

``running_sshd(directory)`` is a context manager usable outside pytest too (the
throughput measurement in tests/integration/test_ssh_transport.py uses it); the
``sshd`` fixture wraps it for one test. Everything lives in one directory: host key,
client key pair, authorized_keys, known_hosts (``[127.0.0.1]:PORT ssh-ed25519 ...``),
sshd_config, pid file and sshd's log. sshd listens on 127.0.0.1 only and accepts
public keys only; it logs in the current user (root in CI, with
``PermitRootLogin prohibit-password``).
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, replace
from typing import Any, Iterator, Sequence

import pytest

from bmig.wire.ssh import SshTarget

SSHD = "/usr/sbin/sshd"
# sshd is started as a child subreaper (prctl PR_SET_CHILD_SUBREAPER = 36, kept across
# exec): a remote command that outlives its connection (sshd does not kill those) is
# re-parented to sshd, which reaps it, and stop() finds it among sshd's descendants,
# rather than as an orphan, then a zombie, of init.
SUBREAPER_EXEC = ("import ctypes, os, sys; ctypes.CDLL(None).prctl(36, 1, 0, 0, 0); "
                  "os.execv(sys.argv[1], sys.argv[1:])")
HOST = "127.0.0.1"
START_TIMEOUT = 20.0
STOP_TIMEOUT = 10.0
BIND_ATTEMPTS = 5


@dataclass(frozen=True)
class KeyPair:
    private: str
    public_line: str      # "ssh-ed25519 AAAA..." without the comment
    fingerprint: str      # "SHA256:..." as ssh-keygen -l prints it


def make_key(path: str, comment: str = "bmig-test") -> KeyPair:
    """A new ed25519 key pair made by ssh-keygen, without a passphrase."""
    for old in (path, path + ".pub"):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(old)
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", path],
                   check=True, capture_output=True, timeout=30)
    with open(path + ".pub") as f:
        key_type, blob = f.read().split()[:2]
    listed = subprocess.run(["ssh-keygen", "-l", "-f", path + ".pub"], check=True,
                            capture_output=True, text=True, timeout=30)
    return KeyPair(path, f"{key_type} {blob}", listed.stdout.split()[1])


def known_hosts_name(host: str, port: int) -> str:
    return host if port == 22 else f"[{host}]:{port}"


def write_known_hosts(path: str, host: str, port: int, public_line: str) -> str:
    with open(path, "w") as f:
        f.write(f"{known_hosts_name(host, port)} {public_line}\n")
    return path


def free_port() -> int:
    """A TCP port nobody listens on right now (sshd may still lose it to a race: retried)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


@dataclass
class Sshd:
    """A running sshd and what a client needs to log in to it."""

    directory: str
    host: str
    port: int
    user: str
    identity: str
    known_hosts: str
    host_key: KeyPair
    client_key: KeyPair
    proc: subprocess.Popen
    log_path: str

    @property
    def host_key_fingerprint(self) -> str:
        return self.host_key.fingerprint

    def target(self, **overrides: Any) -> SshTarget:
        """An SshTarget that logs in to this server; keyword arguments override fields."""
        target = SshTarget(host=self.host, port=self.port, user=self.user,
                           known_hosts=self.known_hosts, identity=self.identity,
                           connect_timeout=10.0)
        return replace(target, **overrides)

    def path(self, name: str) -> str:
        return os.path.join(self.directory, name)

    def log(self) -> str:
        try:
            with open(self.log_path, errors="replace") as f:
                return f.read()
        except FileNotFoundError:
            return ""

    def stop(self) -> None:
        """Connections a test left open first, while the listener is there to reap
        them (orphans would linger as zombies), then the listener."""
        if self.proc.poll() is None:
            stop_descendants(self.proc.pid)
        stop_process(self.proc)


def signal_all(pids: list[int], signum: int) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signum)


def stop_descendants(pid: int) -> None:
    """SIGTERM every process below ``pid``, wait until they are gone, SIGKILL if not."""
    signal_all(descendants(pid), signal.SIGTERM)
    deadline = time.monotonic() + STOP_TIMEOUT
    while (left := descendants(pid)) and time.monotonic() < deadline:
        time.sleep(0.01)           # polling with a deadline, not synchronisation
    signal_all(left, signal.SIGKILL)


def stop_process(proc: subprocess.Popen) -> None:
    """SIGTERM, wait, SIGKILL if it will not go."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=STOP_TIMEOUT)


def descendants(pid: int) -> list[int]:
    """Every live process below ``pid`` (from /proc), children first."""
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        parents[int(entry)] = int(stat.rsplit(")", 1)[1].split()[1])
    found: list[int] = []
    frontier = [pid]
    while frontier:
        parent = frontier.pop()
        children = [child for child, ppid in parents.items() if ppid == parent]
        found.extend(children)
        frontier.extend(children)
    return found


def login_user() -> str:
    return "root" if os.getuid() == 0 else pwd.getpwuid(os.getuid()).pw_name


def sshd_config(directory: str, port: int, host_key: str, extra: tuple[str, ...]) -> str:
    lines = [
        f"Port {port}",
        f"ListenAddress {HOST}",
        f"HostKey {host_key}",
        f"PidFile {os.path.join(directory, 'sshd.pid')}",
        f"AuthorizedKeysFile {os.path.join(directory, 'authorized_keys')}",
        "PermitRootLogin prohibit-password",
        "StrictModes no",
        "UsePAM no",
        "PubkeyAuthentication yes",
        "PasswordAuthentication no",
        "KbdInteractiveAuthentication no",
        "X11Forwarding no",
        "PrintMotd no",
        "LogLevel VERBOSE",          # not DEBUG: with -e, session children send it to clients
        *extra,
    ]
    path = os.path.join(directory, "sshd_config")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return path


def checked_config(directory: str, port: int, host_key: str, extra: tuple[str, ...]) -> str:
    """The config, with ``PerSourcePenalties no`` where sshd knows it (OpenSSH >= 9.8):
    the tests refuse many connections on purpose and must not be throttled for it."""
    for penalties in (("PerSourcePenalties no",), ()):
        path = sshd_config(directory, port, host_key, extra + penalties)
        test = subprocess.run([SSHD, "-t", "-f", path], capture_output=True, text=True,
                              timeout=30)
        if test.returncode == 0:
            return path
    raise AssertionError(f"sshd rejects its test configuration: {test.stderr.strip()}")


def wait_for_banner(proc: subprocess.Popen, port: int, deadline: float) -> bool:
    """True once sshd answers with its SSH banner; False if it exited first."""
    delay = 0.005
    while proc.poll() is None:
        try:
            with socket.create_connection((HOST, port), timeout=1.0) as sock:
                if sock.recv(4).startswith(b"SSH-"):
                    return True
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise AssertionError(f"sshd did not accept connections on port {port} "
                                 f"within {START_TIMEOUT}s")
        time.sleep(delay)          # polling with a deadline, not synchronisation
        delay = min(delay * 2, 0.1)
    return False


def start_sshd(directory: str, host_key: str, log_path: str,
               extra: tuple[str, ...]) -> tuple[subprocess.Popen, int]:
    """sshd on a free port; a new port if another process took the first one meanwhile."""
    for _ in range(BIND_ATTEMPTS):
        port = free_port()
        config = checked_config(directory, port, host_key, extra)
        with open(log_path, "ab") as log:
            proc = subprocess.Popen([sys.executable, "-c", SUBREAPER_EXEC,
                                     SSHD, "-D", "-e", "-f", config],
                                    stdin=subprocess.DEVNULL, stdout=log, stderr=log)
        if wait_for_banner(proc, port, time.monotonic() + START_TIMEOUT):
            return proc, port
        with open(log_path, errors="replace") as f:
            log_text = f.read()
        if "Address already in use" not in log_text:
            raise AssertionError(f"sshd exited with status {proc.returncode}:\n{log_text}")
    raise AssertionError(f"sshd found no free port in {BIND_ATTEMPTS} attempts")


@contextlib.contextmanager
def running_sshd(directory: str, extra_config: Sequence[str] = ()) -> Iterator[Sshd]:
    """A real sshd serving the current user from ``directory``; stopped on exit.
    ``extra_config``: more sshd_config lines, such as ``Ciphers aes128-ctr``."""
    if not os.path.exists(SSHD):
        pytest.skip(f"{SSHD} is not installed (Debian package openssh-server)")
    if shutil.which("ssh-keygen") is None:
        pytest.skip("ssh-keygen is not installed (Debian package openssh-client)")
    os.makedirs(directory, exist_ok=True)
    with contextlib.suppress(PermissionError):
        os.makedirs("/run/sshd", mode=0o755, exist_ok=True)   # privilege separation dir
    host_key = make_key(os.path.join(directory, "ssh_host_ed25519_key"), "bmig-test-host")
    client_key = make_key(os.path.join(directory, "id_ed25519"), "bmig-test-client")
    with open(os.path.join(directory, "authorized_keys"), "w") as f:
        f.write(client_key.public_line + "\n")
    log_path = os.path.join(directory, "sshd.log")
    proc, port = start_sshd(directory, host_key.private, log_path, tuple(extra_config))
    known_hosts = write_known_hosts(os.path.join(directory, "known_hosts"), HOST, port,
                                    host_key.public_line)
    server = Sshd(directory, HOST, port, login_user(), client_key.private, known_hosts,
                  host_key, client_key, proc, log_path)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def sshd(tmp_path) -> Iterator[Sshd]:
    """A real sshd on 127.0.0.1 for one test, with keys and known_hosts in tmp_path."""
    with running_sshd(str(tmp_path / "sshd")) as server:
        yield server
