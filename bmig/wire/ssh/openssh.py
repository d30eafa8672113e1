"""SSH through the system ``ssh`` as a child process, for speed (its ciphers run in C, in
another process). Started in its own process group, so the terminal's Ctrl-C reaches
bmigrate only and the first Ctrl-C can still finish over the live link.
``open_openssh`` returns a Stream over its pipes (``OpensshStream``) once ssh has logged
in; what ssh printed before that becomes one error (``ssh_failure``).
"""

from __future__ import annotations

import collections
import logging
import math
import os
import socket
import subprocess
import threading
import time
from dataclasses import replace

from bmig.errors import AuthError, ConfigError, UnreachableError
from bmig.wire.ssh.ciphers import aes_in_hardware, configured_ciphers, gcm_first
from bmig.wire.ssh.hints import (changed_host_key_message, check_identity,
                                 login_refused_message, unknown_host_key_message)
from bmig.wire.ssh.hostkeys import known_host_fingerprint, warn_accepted_key
from bmig.wire.ssh.remotelog import (STDERR_READ_SIZE, STDERR_TAIL_LINES, RemoteLog,
                                     last_line, start_daemon)
from bmig.wire.ssh.target import CLOSE_TIMEOUT, EXIT_STATUS_WAIT, SshTarget
from bmig.wire.transports import FdStream, enlarge_pipe

log = logging.getLogger("bmig.wire.ssh")       # one name for the whole package
PIPE_SIZE = 1 << 20           # pipes from ssh (Linux default 64 KiB; max for users 1 MiB)
# The data into ssh goes through a Unix stream socket, not a pipe: a writer blocked on a
# full pipe wakes as soon as ssh's read (32 KiB) frees a page, so every 32 KiB cost this
# process and ssh a context switch each; a socket's writer wakes only once the reader
# has taken three quarters of the send buffer (unix_writable). Measured on a 1 GiB sync:
# 4x fewer voluntary switches in the writer, ssh's CPU per GiB 1.10 -> 0.96 s (ssh fed
# from a file: 0.9 s).
SOCKET_SEND_BUFFER = 1 << 20  # asked for; the kernel caps it at net.core.wmem_max
CONFIG_TIMEOUT = 10.0         # for ``ssh -G`` (reads the config, connects nowhere)

# ssh runs LocalCommand once logged in, before the remote command can say anything: the
# line it prints parts ssh's own stderr from the remote command's.
LOGGED_IN_MARK = "bmig: ssh logged in"
LOGGED_IN_COMMAND = f"/bin/sh -c 'echo {LOGGED_IN_MARK} >&2'"


def ssh_option_path(path: str) -> str:
    """A path as an ssh -o value: ``%`` is a token there, and spaces split values."""
    path = path.replace("%", "%%")
    return f'"{path}"' if any(c.isspace() for c in path) else path


def openssh_argv(target: SshTarget, command: str, ssh: str = "ssh") -> list[str]:
    argv = [ssh, "-o", "BatchMode=yes",
            "-o", f"ConnectTimeout={max(1, math.ceil(target.connect_timeout))}",
            "-p", str(target.port)]
    if target.user:
        argv += ["-l", target.user]
    if target.identity:
        argv += ["-i", target.identity, "-o", "IdentitiesOnly=yes"]
    checking = "accept-new" if target.accept_new_host_key else "yes"
    argv += ["-o", f"UserKnownHostsFile={ssh_option_path(target.known_hosts_file)}",
             "-o", f"StrictHostKeyChecking={checking}"]
    if target.cipher:
        argv += ["-c", target.cipher]
    # LocalCommand marks the login (LogLevel=INFO: no ssh chatter after it); no shared
    # ControlMaster connection, which would not run it and whose window is shared.
    argv += ["-o", "LogLevel=INFO", "-o", "PermitLocalCommand=yes",
             "-o", f"LocalCommand={LOGGED_IN_COMMAND}", "-o", "ControlPath=none",
             "-e", "none", "-T", "--", target.host, command]
    return argv


class OpensshStderr:
    """Reads ssh's stderr: ssh's own lines until it has logged in, the remote command's
    after (to ``bmig.remote``; ssh's rare words after login, such as a lost connection,
    land there too). ``settled`` is set at login or when ssh exits."""

    def __init__(self, fd: int):
        self.fd = fd
        self.remote = RemoteLog()
        self.ssh_lines: collections.deque[str] = collections.deque(maxlen=STDERR_TAIL_LINES * 2)
        self.authenticated = False
        self.settled = threading.Event()
        self._partial = b""
        self.thread = start_daemon(self._run, f"ssh-stderr fd {fd}")

    def _run(self) -> None:
        try:
            while data := os.read(self.fd, STDERR_READ_SIZE):
                *lines, self._partial = (self._partial + data).split(b"\n")
                for line in lines:
                    self._line(line)
            if self._partial:
                self._line(self._partial)
        except OSError:
            pass
        finally:
            os.close(self.fd)
            self.settled.set()

    def _line(self, raw: bytes) -> None:
        if self.authenticated:
            self.remote.line(raw)
            return
        text = raw.decode(errors="replace").rstrip("\r")
        if text == LOGGED_IN_MARK:
            self.authenticated = True
            self.settled.set()
            return
        self.ssh_lines.append(text)
        log.debug("ssh: %s", text)

    def said(self, *fragments: str) -> str | None:
        """The first line ssh printed that contains one of ``fragments``."""
        for line in self.ssh_lines:
            if any(fragment in line for fragment in fragments):
                return line.strip()
        return None


def ssh_failure(target: SshTarget, stderr: OpensshStderr, status: int | None) -> Exception:
    """The error for an ssh that exited before logging in, from what it printed."""
    if stderr.said("REMOTE HOST IDENTIFICATION HAS CHANGED", "has changed and you have"):
        sent = stderr.said("SHA256:")
        return AuthError(changed_host_key_message(target, sent.rstrip(".") if sent
                                                         else None))
    if stderr.said("host key is known for", "Host key verification failed"):
        return AuthError(unknown_host_key_message(target))
    if line := stderr.said("Permission denied"):
        return AuthError(login_refused_message(target, line.split(": ", 1)[-1]))
    if line := stderr.said("Unknown cipher", "Bad SSH2 cipher"):
        return ConfigError(f"ssh: {line}; ssh -Q cipher lists the ciphers it has")
    if line := stderr.said("Unable to negotiate"):
        return UnreachableError(f"{target.address} and ssh share no algorithm ({line}); "
                                f"choose a cipher the server offers")
    if line := stderr.said("Could not resolve hostname"):
        return UnreachableError(f"cannot resolve {target.host}: {line.split(': ')[-1]}")
    if line := stderr.said("connect to host", "Connection timed out", "Connection refused"):
        return UnreachableError(f"cannot connect to {target.address}: "
                                f"{line.split(': ')[-1]}; is sshd running there, on that port?")
    detail = last_line(stderr.ssh_lines) or "no message"
    return UnreachableError(f"ssh to {target.login} failed (status {status}): {detail}")


def make_pipe() -> tuple[int, int]:
    """A pipe with room for bulk data, if the kernel allows it."""
    read_fd, write_fd = os.pipe()
    enlarge_pipe(write_fd, PIPE_SIZE)
    return read_fd, write_fd


def make_socket_pipe() -> tuple[int, int]:
    """A one-way Unix stream socket pair, used as a pipe: (read fd, write fd). Each end
    is shut down for the other direction, so neither can be used the wrong way."""
    writer, reader = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with writer, reader:
        writer.shutdown(socket.SHUT_RD)
        reader.shutdown(socket.SHUT_WR)
        try:
            writer.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SOCKET_SEND_BUFFER)
        except OSError:
            pass
        return reader.detach(), writer.detach()


def spawn_ssh(argv: list[str]) -> tuple[subprocess.Popen, int, int, int]:
    """ssh with fresh pipes owned by us (not by Popen, whose file objects would close the
    fds a second time); in its own process group, out of reach of the terminal's Ctrl-C.
    Its stdin is a socket pair (``make_socket_pipe``), its stdout and stderr pipes."""
    to_ssh_r, to_ssh_w = make_socket_pipe()
    from_ssh_r, from_ssh_w = make_pipe()
    err_r, err_w = os.pipe()
    try:
        proc = subprocess.Popen(argv, stdin=to_ssh_r, stdout=from_ssh_w, stderr=err_w,
                                process_group=0)
    except OSError as exc:
        for fd in (to_ssh_r, to_ssh_w, from_ssh_r, from_ssh_w, err_r, err_w):
            os.close(fd)
        raise ConfigError(f"cannot run {argv[0]}: {exc.strerror}; install openssh-client "
                          f"or use the paramiko transport") from None
    for fd in (to_ssh_r, from_ssh_w, err_w):
        os.close(fd)
    return proc, from_ssh_r, to_ssh_w, err_r


def open_openssh(target: SshTarget, command: str, ssh: str = "ssh") -> "OpensshStream":
    """Run ``ssh HOST command``; a Stream over its pipes once ssh has logged in."""
    check_identity(target)
    known_before = known_host_fingerprint(target) if target.accept_new_host_key else None
    if target.accept_new_host_key:        # ssh saves the key, but makes no directory
        os.makedirs(os.path.dirname(target.known_hosts_file) or ".", mode=0o700,
                    exist_ok=True)
    order = default_cipher_order(target, ssh)
    argv = openssh_argv(replace(target, cipher=order) if order else target, command, ssh)
    proc, read_fd, write_fd, err_fd = spawn_ssh(argv)
    stream = OpensshStream(proc, read_fd, write_fd, OpensshStderr(err_fd), target, command)
    try:
        stream.wait_logged_in(deadline=time.monotonic() + login_timeout(target))
    except BaseException:
        if proc.poll() is None:
            proc.kill()
        stream.close()
        raise
    if target.accept_new_host_key and known_before is None:
        if (saved := known_host_fingerprint(target)) is not None:
            warn_accepted_key(target, saved)
    return stream


def default_cipher_order(target: SshTarget, ssh: str = "ssh") -> str | None:
    """For ``-c`` when the user chose no cipher: the ciphers ssh would offer this host
    (``ssh -G``: its config applied), AES-GCM first, where the CPU has AES instructions
    (bmig.wire.ssh.ciphers says why); None to leave ssh's own order."""
    if target.cipher is not None or not aes_in_hardware():
        return None
    argv = [ssh, "-G", "-p", str(target.port)]
    if target.user:
        argv += ["-l", target.user]
    try:
        done = subprocess.run([*argv, "--", target.host], stdin=subprocess.DEVNULL,
                              capture_output=True, text=True, timeout=CONFIG_TIMEOUT)
    except (OSError, subprocess.SubprocessError):
        return None
    ciphers = configured_ciphers(done.stdout) if done.returncode == 0 else None
    if not ciphers or gcm_first(ciphers) == ciphers:
        return None
    return ",".join(gcm_first(ciphers))


def login_timeout(target: SshTarget) -> float:
    """ConnectTimeout covers TCP and the banner; this also leaves time to log in."""
    return 2 * target.connect_timeout + 5


class OpensshStream(FdStream):
    """The pipes of ``ssh HOST COMMAND``; close() ends ssh too."""

    own_status = 255           # ssh's own errors (or the remote command's 255)

    def __init__(self, proc: subprocess.Popen, read_fd: int, write_fd: int,
                 stderr: OpensshStderr, target: SshTarget, command: str):
        super().__init__(read_fd, write_fd, f"ssh {target.login} {command!r} (openssh)")
        self.proc = proc
        self.stderr = stderr
        self.target = target
        self.command = command
        self.close_timeout = CLOSE_TIMEOUT
        self._closed = False

    def wait_logged_in(self, deadline: float) -> None:
        """Return once ssh has logged in; raise what stopped it otherwise."""
        if not self.stderr.settled.wait(max(0.0, deadline - time.monotonic())):
            raise UnreachableError(f"ssh to {self.target.login} did not log in within "
                                   f"{login_timeout(self.target):g}s: "
                                   f"{last_line(self.stderr.ssh_lines) or 'no message'}")
        if not self.stderr.authenticated:
            raise ssh_failure(self.target, self.stderr, self.exit_status())

    def stderr_tail(self) -> list[str]:
        return list(self.stderr.remote.tail)

    def wait_stderr(self, timeout: float) -> bool:
        """True once ssh's stderr has ended (ssh exited) and every line of it is logged."""
        self.stderr.thread.join(timeout)
        return not self.stderr.thread.is_alive()

    def exit_status(self, timeout: float = EXIT_STATUS_WAIT) -> int | None:
        """ssh's exit status: the remote command's, or 255 for ssh's own errors."""
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def close(self) -> None:
        """Close the pipes (the remote command sees end of input), wait for ssh to end,
        kill it if it does not within ``close_timeout``."""
        if self._closed:
            return
        self._closed = True
        super().close()
        try:
            self.proc.wait(self.close_timeout)
        except subprocess.TimeoutExpired:
            log.warning("%s did not end within %gs of closing; killing ssh", self.description,
                        self.close_timeout)
            self.proc.kill()
            self.proc.wait()
        self.stderr.thread.join(timeout=CLOSE_TIMEOUT)
