"""What the user reads when SSH goes wrong: one line that says what and what to do.

The messages both transports give for an unknown or changed host key, a refused login
and an unusable identity file, and ``failure_hint``: why a remote command that ended at
once ended (its exit status and last stderr line). Wording only: nothing here connects
or decides whether to connect.
"""

from __future__ import annotations

import os
from typing import Protocol, runtime_checkable

from bmig.errors import ConfigError
from bmig.wire.ssh.remotelog import last_line
from bmig.wire.ssh.target import EXIT_STATUS_WAIT, SshTarget


@runtime_checkable
class RemoteCommand(Protocol):
    """A stream to a command run over SSH (either transport)."""

    target: SshTarget
    command: str
    own_status: int | None       # the exit status the transport itself fails with, if any

    def exit_status(self, timeout: float = EXIT_STATUS_WAIT) -> int | None: ...
    def wait_stderr(self, timeout: float) -> bool: ...
    def stderr_tail(self) -> list[str]: ...


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
    import paramiko      # here, not at the top: the ssh child's path never loads it
    text = str(exc) or exc.__class__.__name__
    if isinstance(exc, paramiko.PasswordRequiredException) or "password" in text.lower():
        return ConfigError(f"the identity file {target.identity} is encrypted; load it into "
                           f"ssh-agent and leave the identity unset")
    return ConfigError(f"cannot use the identity file {target.identity}: {text}")


def check_identity(target: SshTarget) -> None:
    if target.identity is not None and not os.path.isfile(target.identity):
        raise ConfigError(f"the identity file {target.identity} does not exist; "
                          f"give the path of an SSH private key")


def failure_hint(stream: object) -> str | None:
    """One line on why the remote command ended: its exit status and last stderr line.

    For when the stream ended early (the first ``recv_into`` returned 0); None if the
    stream cannot tell (not an SSH stream, or the command still runs and said nothing).
    """
    if not isinstance(stream, RemoteCommand):
        return None
    status = stream.exit_status()
    if status is not None:
        stream.wait_stderr(EXIT_STATUS_WAIT)   # its last lines may still be on their way
    said = last_line(stream.stderr_tail())
    if stream.own_status is not None and status == stream.own_status:
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
