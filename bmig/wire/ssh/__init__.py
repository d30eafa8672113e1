"""SSH as a Stream: the remote ``breceive --stdio`` speaks the protocol over its stdin/stdout.

Two ways in, one behaviour, like borg's ``ssh host borg serve``:

- ``open_paramiko`` (inprocess.py): paramiko in this process (no ssh binary needed, host
  keys checked here).
- ``open_openssh`` (openssh.py): the system ``ssh`` as a child process, for speed (its
  ciphers run in C, in another process), in its own process group.

Both return only once the session is authenticated, so a refused host key or login is an
error at open time. The rest, one job per module:

    target.py     SshTarget: where and how to log in; the time limits
    hostkeys.py   the host-key policy (known_hosts; an unknown key only with
                  accept_new_host_key, a changed key never)
    remotelog.py  the remote command's stderr, logged as ``remote: ...``, its tail kept
    hints.py      the one-line messages, and ``failure_hint(stream)``: why a remote
                  command that ended at once ended

paramiko is slow to import (0.13 s of CPU): ``open_paramiko`` loads it when first asked
for, so the system ssh's path never does, and bmig.wire.connect imports this package only
for ssh:// targets.
"""

from typing import Any

from bmig.wire.ssh.hints import failure_hint
from bmig.wire.ssh.openssh import open_openssh
from bmig.wire.ssh.target import SshTarget

__all__ = ["SshTarget", "failure_hint", "open_openssh", "open_paramiko"]


def __getattr__(name: str) -> Any:
    if name == "open_paramiko":
        from bmig.wire.ssh.inprocess import open_paramiko
        return open_paramiko
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
