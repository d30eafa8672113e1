"""SSH in this process with paramiko: no ssh binary needed, host keys checked here
(bmig.wire.ssh.hostkeys). ``open_paramiko`` logs in, runs the command and returns a
Stream over its stdin and stdout (``ParamikoStream``) once the session is authenticated.
"""

from __future__ import annotations

import errno
import functools
import logging
import os
import socket
import time
from typing import Sequence

import paramiko

from bmig.errors import AuthError, ConfigError, UnreachableError
from bmig.wire.ssh.ciphers import aes_in_hardware, gcm_first
from bmig.wire.ssh.hints import (changed_host_key_message, check_identity, identity_error,
                                 login_refused_message, unknown_host_key_message)
from bmig.wire.ssh.hostkeys import append_known_host, warn_accepted_key
from bmig.wire.ssh.remotelog import STDERR_READ_SIZE, RemoteLog, start_daemon
from bmig.limits import SSH_MAX_PACKET_SIZE as MAX_PACKET_SIZE
from bmig.limits import SSH_WINDOW_SIZE as WINDOW_SIZE
from bmig.wire.ssh.target import CLOSE_TIMEOUT, EXIT_STATUS_WAIT, SshTarget
from bmig.wire.transports import Buffer, tune

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


def paramiko_ciphers() -> tuple[str, ...]:
    """The ciphers paramiko can use (no chacha20-poly1305@openssh.com)."""
    # A class attribute of paramiko's: the only list it offers without a live transport.
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


def tuned_transport(sock: socket.socket, prefer_gcm: bool = False,
                    **kwargs: object) -> paramiko.Transport:
    """paramiko's Transport with TCP tuning and a window large enough for bulk data;
    with ``prefer_gcm``, its ciphers in its own set with AES-GCM first
    (bmig.wire.ssh.ciphers says why)."""
    tune(sock)
    transport = paramiko.Transport(sock, default_window_size=WINDOW_SIZE,
                                   default_max_packet_size=MAX_PACKET_SIZE, **kwargs)
    if prefer_gcm:
        options = transport.get_security_options()
        options.ciphers = tuple(gcm_first(options.ciphers))
    return transport


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
                       transport_factory=functools.partial(
                           tuned_transport,
                           prefer_gcm=target.cipher is None and aes_in_hardware()))
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

    own_status = None          # every exit status is the remote command's

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
