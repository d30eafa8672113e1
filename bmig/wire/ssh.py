"""SSH as a Stream: the remote ``breceive --stdio`` speaks the protocol over its stdin/stdout.

Two ways in, one behaviour, like borg's ``ssh host borg serve``:

- ``open_paramiko``: paramiko in this process (no ssh binary needed, host keys checked here).
- ``open_openssh``: the system ``ssh`` as a child process, for speed (its ciphers run in C,
  in another process). Started in its own process group, so the terminal's Ctrl-C reaches
  bmigrate only and the first Ctrl-C can still finish over the live link.

Both return only once the session is authenticated, so a refused host key or login is an
UnreachableError at open time. Host keys: known_hosts (``[host]:port`` for a port other
than 22); an unknown key is refused unless ``accept_new_host_key``, a changed key always.
The remote command's stderr is logged line by line to the ``bmig.remote`` logger
(``remote: ...``) and its tail kept: when the command ends at once (the first
``recv_into`` returns 0), ``failure_hint(stream)`` turns tail and exit status into one line.
"""

from __future__ import annotations

import collections
import errno
import fcntl
import logging
import math
import os
import socket
import subprocess
import threading
import time
from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

import paramiko

from bmig.errors import AuthError, ConfigError, UnreachableError
from bmig.limits import SSH_MAX_PACKET_SIZE as MAX_PACKET_SIZE
from bmig.limits import SSH_WINDOW_SIZE as WINDOW_SIZE
from bmig.wire.transports import Buffer, FdStream, tune

log = logging.getLogger(__name__)
remote_log = logging.getLogger("bmig.remote")
PARAMIKO_LOG = "bmig.ssh.paramiko"   # paramiko's transport logs here (SSHClient.set_log_channel)


class _DemoteErrors(logging.Filter):
    """paramiko's transport thread logs each failure at error level, traceback line by
    line; the caller gets the same failure as an exception and reports it in one line.
    Kept, as debug lines."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno > logging.DEBUG:
            record.levelno, record.levelname = logging.DEBUG, "DEBUG"
        return logging.getLogger(PARAMIKO_LOG).isEnabledFor(logging.DEBUG)


logging.getLogger(PARAMIKO_LOG).addFilter(_DemoteErrors())

STDERR_TAIL_LINES = 20
STDERR_READ_SIZE = 64 << 10
PIPE_SIZE = 1 << 20           # pipes to and from ssh (Linux default 64 KiB; max for users 1 MiB)
CLOSE_TIMEOUT = 10.0          # for the remote end to finish once its input is closed
EXIT_STATUS_WAIT = 5.0        # the exit status follows end of stream by a few messages

# ssh runs LocalCommand once logged in, before the remote command can say anything: the
# line it prints parts ssh's own stderr from the remote command's.
LOGGED_IN_MARK = "bmig: ssh logged in"
LOGGED_IN_COMMAND = f"/bin/sh -c 'echo {LOGGED_IN_MARK} >&2'"


@dataclass(frozen=True)
class SshTarget:
    host: str
    port: int = 22
    user: str | None = None
    command: str = "breceive --stdio"   # the caller appends arguments with shlex.quote
    known_hosts: str | None = None      # default ~/.ssh/known_hosts
    accept_new_host_key: bool = False   # only then is an unknown host key accepted (and saved)
    identity: str | None = None         # private key file; default: agent and ~/.ssh/id_*
    cipher: str | None = None           # e.g. "aes128-gcm@openssh.com", "aes128-ctr"
    connect_timeout: float = 30.0

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def login(self) -> str:
        return f"{self.user}@{self.address}" if self.user else self.address

    @property
    def known_hosts_file(self) -> str:
        return os.path.expanduser(self.known_hosts or "~/.ssh/known_hosts")

    @property
    def known_hosts_name(self) -> str:
        """The name known_hosts lists this host under."""
        return self.host if self.port == 22 else f"[{self.host}]:{self.port}"


# -- messages shared by both implementations -------------------------------------------

def unknown_host_key_message(target: SshTarget) -> str:
    return (f"host key of {target.address} is not known (not in {target.known_hosts_file}); "
            f"check it, then connect once with --accept-new-host-key")


def changed_host_key_message(target: SshTarget, fingerprint: str | None) -> str:
    sent = f" (it sent {fingerprint})" if fingerprint else ""
    return (f"HOST KEY OF {target.address} HAS CHANGED{sent}: {target.known_hosts_file} has "
            f"another key for {target.known_hosts_name}; someone may be intercepting the "
            f"connection, or the host was reinstalled: check it, then remove the old key with "
            f"ssh-keygen -f {target.known_hosts_file} -R '{target.known_hosts_name}'")


def login_refused_message(target: SshTarget, detail: str) -> str:
    key = f"the key {target.identity}" if target.identity else "the agent's and ~/.ssh keys"
    return (f"{target.login} refused to log in with {key} ({detail}); add the public key to "
            f"the user's authorized_keys there, or set the identity file")


def identity_error(target: SshTarget, exc: BaseException) -> ConfigError:
    text = str(exc) or exc.__class__.__name__
    if isinstance(exc, paramiko.PasswordRequiredException) or "password" in text.lower():
        return ConfigError(f"the identity file {target.identity} is encrypted; load it into "
                           f"ssh-agent and leave the identity unset")
    return ConfigError(f"cannot use the identity file {target.identity}: {text}")


def check_identity(target: SshTarget) -> None:
    if target.identity is not None and not os.path.isfile(target.identity):
        raise ConfigError(f"the identity file {target.identity} does not exist; "
                          f"give the path of an SSH private key")


# -- remote stderr ------------------------------------------------------------------------

class RemoteLog:
    """Turns the remote command's stderr into ``remote: ...`` log lines, keeping a tail."""

    def __init__(self, logger: logging.Logger = remote_log):
        self.logger = logger
        self.tail: collections.deque[str] = collections.deque(maxlen=STDERR_TAIL_LINES)
        self._partial = b""

    def feed(self, data: bytes) -> None:
        *lines, self._partial = (self._partial + data).split(b"\n")
        for line in lines:
            self.line(line)

    def finish(self) -> None:
        if self._partial:
            self.line(self._partial)
            self._partial = b""

    def line(self, raw: bytes) -> None:
        text = raw.decode(errors="replace").rstrip("\r")
        self.tail.append(text)
        self.logger.info("remote: %s", text)


def start_daemon(target: Callable[[], None], name: str) -> threading.Thread:
    thread = threading.Thread(target=target, name=name, daemon=True)
    thread.start()
    return thread


def last_line(lines: Iterable[str]) -> str | None:
    for line in reversed(list(lines)):
        if line.strip():
            return line.strip()
    return None


def failure_hint(stream: object) -> str | None:
    """One line on why the remote command ended: its exit status and last stderr line.

    For when the stream ended early (the first ``recv_into`` returned 0); None if the
    stream cannot tell (not an SSH stream, or the command still runs and said nothing).
    """
    if not isinstance(stream, (ParamikoStream, OpensshStream)):
        return None
    status = stream.exit_status()
    if status is not None:
        stream.wait_stderr(EXIT_STATUS_WAIT)   # its last lines may still be on their way
    said = last_line(stream.stderr_tail())
    if isinstance(stream, OpensshStream) and status == 255:
        return (f"ssh to {stream.target.login} exited with status 255 (an ssh error, or the "
                f"remote command's own status): {said or 'no message'}; check the connection, "
                f"then the remote: lines in the log")
    if status is None and said is None:
        return None
    what = f"remote command {stream.command!r} " + (
        "is still running" if status is None else f"exited with status {status}")
    if said:
        what += f": {said}"
    return f"{what}; {status_advice(status)}"


def status_advice(status: int | None) -> str:
    if status == 127:
        return "install bmig on the remote host or set the remote command"
    if status == 126:
        return "the remote command cannot be run: check its path and permissions there"
    return "see the remote: lines in the log for the receiver's own words"


# -- paramiko -----------------------------------------------------------------------------

def paramiko_ciphers() -> tuple[str, ...]:
    """The ciphers paramiko can use (no chacha20-poly1305@openssh.com)."""
    return tuple(paramiko.Transport._preferred_ciphers)


def disabled_ciphers(cipher: str | None) -> dict[str, list[str]]:
    """paramiko's ``disabled_algorithms`` that leave only ``cipher``, as ``ssh -c`` does."""
    if cipher is None:
        return {}
    known = paramiko_ciphers()
    if cipher not in known:
        raise ConfigError(f"paramiko has no cipher {cipher!r}; use one of {', '.join(known)}, "
                          f"or the openssh transport")
    return {"ciphers": [c for c in known if c != cipher]}


def tuned_transport(sock: socket.socket, **kwargs: object) -> paramiko.Transport:
    """paramiko's Transport with TCP tuning and a window large enough for bulk data."""
    tune(sock)
    return paramiko.Transport(sock, default_window_size=WINDOW_SIZE,
                              default_max_packet_size=MAX_PACKET_SIZE, **kwargs)


class KnownHostsPolicy(paramiko.MissingHostKeyPolicy):
    """Called by paramiko for a host known_hosts does not list (a changed key never gets
    here: SSHClient raises BadHostKeyException). Refuses, or accepts and appends it.

    Like OpenSSH, a host on a port other than 22 is also known if known_hosts has this
    very key under the bare host name (another key there does not count either way)."""

    def __init__(self, target: SshTarget):
        self.target = target

    def missing_host_key(self, client: paramiko.SSHClient, hostname: str,
                         key: paramiko.PKey) -> None:
        if hostname != self.target.host and \
                client.get_host_keys().check(self.target.host, key):
            return
        if not self.target.accept_new_host_key:
            raise AuthError(unknown_host_key_message(self.target))
        append_known_host(self.target.known_hosts_file, hostname, key)
        warn_accepted_key(self.target, f"{key.get_name()} {key.fingerprint}")


def warn_accepted_key(target: SshTarget, key: str) -> None:
    log.warning("accepted the new host key %s of %s and saved it to %s", key,
                target.address, target.known_hosts_file)


def append_known_host(path: str, hostname: str, key: paramiko.PKey) -> None:
    """Append one line, as ssh does: never rewrite the user's file."""
    directory = os.path.dirname(path)
    if directory:
        os.makedirs(directory, mode=0o700, exist_ok=True)
    line = f"{hostname} {key.get_name()} {key.get_base64()}\n"
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o600)
    except OSError as exc:
        raise ConfigError(f"cannot save the host key to {path}: {exc.strerror}") from None
    with os.fdopen(fd, "r+b") as f:
        size = f.seek(0, os.SEEK_END)
        if size:
            f.seek(size - 1)
            if f.read(1) != b"\n":
                line = "\n" + line
        f.write(line.encode())


def paramiko_client(target: SshTarget) -> paramiko.SSHClient:
    client = paramiko.SSHClient()
    client.set_log_channel(PARAMIKO_LOG)
    path = target.known_hosts_file
    if os.path.exists(path):
        try:
            client.load_host_keys(path)
        except OSError as exc:
            raise ConfigError(f"cannot read {path}: {exc.strerror}") from None
    client.set_missing_host_key_policy(KnownHostsPolicy(target))
    return client


def load_identity(target: SshTarget) -> paramiko.PKey | None:
    check_identity(target)
    if target.identity is None:
        return None
    try:
        return paramiko.PKey.from_path(target.identity)
    except (OSError, ValueError, TypeError, paramiko.SSHException) as exc:
        raise identity_error(target, exc) from None


def connect_paramiko(client: paramiko.SSHClient, target: SshTarget,
                     key: paramiko.PKey | None) -> None:
    """SSHClient.connect, with its exceptions turned into one-line toolkit errors."""
    try:
        client.connect(target.host, target.port, username=target.user, pkey=key,
                       allow_agent=key is None, look_for_keys=key is None,
                       timeout=target.connect_timeout, banner_timeout=target.connect_timeout,
                       auth_timeout=target.connect_timeout,
                       channel_timeout=target.connect_timeout,
                       disabled_algorithms=disabled_ciphers(target.cipher),
                       transport_factory=tuned_transport)
    except paramiko.BadHostKeyException as exc:
        raise AuthError(changed_host_key_message(target, exc.key.fingerprint)) from None
    except paramiko.PasswordRequiredException as exc:
        raise identity_error(target, exc) from None
    except paramiko.AuthenticationException as exc:
        raise AuthError(login_refused_message(target, str(exc) or "no key accepted")
                               ) from None
    except socket.gaierror as exc:
        raise UnreachableError(f"cannot resolve {target.host}: {exc.strerror}") from None
    except (socket.timeout, TimeoutError):
        raise UnreachableError(f"no SSH server answered at {target.address} within "
                               f"{target.connect_timeout:g}s; check the host and port") from None
    except paramiko.ssh_exception.IncompatiblePeer as exc:
        raise UnreachableError(f"{target.address} and paramiko share no algorithm ({exc}); "
                               f"choose a cipher the server offers, or the openssh "
                               f"transport") from None
    except (paramiko.SSHException, EOFError) as exc:
        raise UnreachableError(f"SSH with {target.address} failed: {exc}") from None
    except OSError as exc:
        raise UnreachableError(f"cannot connect to {target.address}: {os_error_text(exc)}; "
                               f"is sshd running there, on that port?") from None


def os_error_text(exc: OSError) -> str:
    """Connection refused, rather than paramiko's summary of every address it tried."""
    if isinstance(exc, paramiko.ssh_exception.NoValidConnectionsError) and exc.errors:
        exc = next(iter(exc.errors.values()))
    return exc.strerror or str(exc)


def exec_channel(client: paramiko.SSHClient, target: SshTarget,
                 command: str) -> paramiko.Channel:
    transport = client.get_transport()
    assert transport is not None
    try:
        channel = transport.open_session(window_size=WINDOW_SIZE,
                                         max_packet_size=MAX_PACKET_SIZE,
                                         timeout=target.connect_timeout)
        channel.exec_command(command)
    except (paramiko.SSHException, OSError, EOFError) as exc:
        raise UnreachableError(f"{target.login} would not run {command!r}: {exc}") from None
    channel.settimeout(None)
    return channel


def open_paramiko(target: SshTarget, command: str) -> "ParamikoStream":
    """Log in with paramiko and run ``command``; a Stream over its stdin and stdout."""
    key = load_identity(target)
    client = paramiko_client(target)
    try:
        connect_paramiko(client, target, key)
        channel = exec_channel(client, target, command)
    except BaseException:
        client.close()
        raise
    return ParamikoStream(client, channel, target, command)


class ParamikoStream:
    """The remote command's stdin and stdout over a paramiko channel."""

    def __init__(self, client: paramiko.SSHClient, channel: paramiko.Channel,
                 target: SshTarget, command: str):
        self.client = client
        self.channel = channel
        self.transport: paramiko.Transport = channel.get_transport()
        self.target = target
        self.command = command
        self.description = f"ssh {target.login} {command!r} (paramiko)"
        self._recv_into = getattr(channel, "recv_into", None)   # paramiko has none (yet)
        self._pending = memoryview(b"")
        self._remote_log = RemoteLog()
        self.close_timeout = CLOSE_TIMEOUT
        self._closed = False
        self._stderr_thread = start_daemon(self._forward_stderr, f"ssh-stderr {target.address}")

    def recv_into(self, buf: memoryview) -> int:
        """Takes all paramiko holds at once, then serves it from a view: paramiko keeps
        its buffer in an array.array, where a partial read moves the whole rest."""
        if self._recv_into is not None:
            return self._recv_into(buf)
        if not self._pending:
            self._pending = memoryview(self.channel.recv(WINDOW_SIZE))
        size = min(len(buf), len(self._pending))
        buf[:size] = self._pending[:size]
        self._pending = self._pending[size:]
        return size

    def send(self, parts: Sequence[Buffer]) -> None:
        """Channel.send takes a memoryview and packs at most a packet per call; slicing a
        view is free (sendall slices bytes, which copies the rest each time)."""
        for part in parts:
            view = memoryview(part).cast("B")
            while view:
                sent = self.channel.send(view)
                if sent == 0:
                    raise BrokenPipeError(errno.EPIPE, f"{self.description}: channel closed")
                view = view[sent:]

    def _forward_stderr(self) -> None:
        try:
            while data := self.channel.recv_stderr(STDERR_READ_SIZE):
                self._remote_log.feed(data)
        except (OSError, EOFError, paramiko.SSHException):
            pass
        finally:
            self._remote_log.finish()

    def stderr_tail(self) -> list[str]:
        return list(self._remote_log.tail)

    def wait_stderr(self, timeout: float) -> bool:
        """True once the remote stderr has ended (sshd ends it before stdout's EOF) and
        every line of it is logged."""
        self._stderr_thread.join(timeout)
        return not self._stderr_thread.is_alive()

    def exit_status(self, timeout: float = EXIT_STATUS_WAIT) -> int | None:
        """The remote command's exit status; None if it is not known within ``timeout``."""
        if not self.channel.status_event.wait(timeout):
            return None
        status = self.channel.exit_status
        return None if status < 0 else status

    def close(self) -> None:
        """End of input for the remote command, a wait (``close_timeout``) for it to
        exit and for its last stderr lines, then close channel and client. Like closing
        ssh's pipes: the receiver's closing words reach the log."""
        if self._closed:
            return
        self._closed = True
        deadline = time.monotonic() + self.close_timeout
        try:
            self.channel.shutdown_write()
            self.channel.status_event.wait(self.close_timeout)
        except (OSError, EOFError, paramiko.SSHException):
            pass
        self._stderr_thread.join(timeout=max(0.0, deadline - time.monotonic()))
        for step in (self.channel.close, self.client.close):
            try:
                step()
            except Exception:   # noqa: BLE001 - closing a dead link reports nothing
                pass
        self._stderr_thread.join(timeout=CLOSE_TIMEOUT)


# -- OpenSSH ------------------------------------------------------------------------------

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
    try:
        fcntl.fcntl(write_fd, fcntl.F_SETPIPE_SZ, PIPE_SIZE)
    except OSError:
        pass
    return read_fd, write_fd


def spawn_ssh(argv: list[str]) -> tuple[subprocess.Popen, int, int, int]:
    """ssh with fresh pipes owned by us (not by Popen, whose file objects would close the
    fds a second time); in its own process group, out of reach of the terminal's Ctrl-C."""
    to_ssh_r, to_ssh_w = make_pipe()
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
    known_before = known_host_fingerprint(target)
    if target.accept_new_host_key:        # ssh saves the key, but makes no directory
        os.makedirs(os.path.dirname(target.known_hosts_file) or ".", mode=0o700,
                    exist_ok=True)
    proc, read_fd, write_fd, err_fd = spawn_ssh(openssh_argv(target, command, ssh))
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


def login_timeout(target: SshTarget) -> float:
    """ConnectTimeout covers TCP and the banner; this also leaves time to log in."""
    return 2 * target.connect_timeout + 5


def known_host_fingerprint(target: SshTarget) -> str | None:
    """Type and fingerprint of the keys known_hosts has for the target (hashed names
    too), if any."""
    try:
        keys = paramiko.HostKeys(target.known_hosts_file).lookup(target.known_hosts_name)
    except (OSError, paramiko.SSHException):
        return None
    if not keys:
        return None
    return ", ".join(f"{name} {keys[name].fingerprint}" for name in keys.keys())


class OpensshStream(FdStream):
    """The pipes of ``ssh HOST COMMAND``; close() ends ssh too."""

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
