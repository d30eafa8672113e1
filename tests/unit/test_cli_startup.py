"""bmigrate imports only what the command it runs needs.

A sync with nothing to ship is mostly the interpreter starting and importing; the group
imports each command's module on first use (bmig.cli.main.LazyGroup), and the dm
intercept's code is imported only for a device that has a dm record. These tests hold
that in place: they fail if the sync path pulls in the other commands, the dm code or
asyncio again.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import click
import pytest

from bmig.cli.main import COMMANDS, cli
from bmig.errors import UnreachableError

# Not needed to sync a device with no dm intercept; each was measured at 5-20 ms.
NOT_FOR_SYNC = ("bmig.cli.cutover", "bmig.cli.replicate", "bmig.cli.promote",
                "bmig.cli.rejoin", "bmig.cli.track", "bmig.sender.dm_cutover",
                "bmig.dm.intercept", "bmig.dm.era", "asyncio", "paramiko",
                # only for tls://, an NBD target, a TOML file, a dm leg
                "ssl", "bmig.nbdclient", "tomllib", "bmig.dm.nbd_leg",
                # only for bmigrate run (its status file, state events), verify, a hole
                "bmig.cli.run", "bmig.sender.catchup", "bmig.sender.runstate",
                "bmig.sender.statusfile", "bmig.cli.statustext", "bmig.devicestate",
                "tempfile", "bmig.sender.verify", "ctypes")

PROBE = """
import json, sys
import click
from bmig.cli.main import cli
cli.get_command(click.Context(cli), "sync")
from bmig.sender import settings
settings.build  # the settings module the command uses to assemble a migration
print(json.dumps(sorted(sys.modules)))
"""


def test_sync_imports_neither_the_other_commands_nor_the_dm_code():
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True,
                         timeout=60, check=True).stdout
    loaded = set(json.loads(out))
    assert "bmig.cli.sync" in loaded
    assert not loaded & set(NOT_FOR_SYNC), sorted(loaded & set(NOT_FOR_SYNC))


def test_every_command_loads_under_its_own_name():
    ctx = click.Context(cli)
    assert cli.list_commands(ctx) == sorted(COMMANDS)
    for name in COMMANDS:
        command = cli.get_command(ctx, name)
        assert command is not None and command.name == name
    assert cli.get_command(ctx, "no-such-command") is None


ENTRY = """
import gc, sys
import bmig.cli.main as group
group.run = lambda command, prog: print(gc.isenabled(), "bmig.cli.sync" in sys.modules,
                                        "bmig.cli.sync" in seen_while_paused)
seen_while_paused = set()
real_load = group.load_named_command
def load(args):
    real_load(args)
    if not gc.isenabled():
        seen_while_paused.update(sys.modules)
group.load_named_command = load
sys.argv = ["bmigrate", "sync", "--help"]
from bmig.cli.bmigrate import main
main()
"""


def test_the_command_loads_while_the_collector_sleeps_and_runs_with_it_awake():
    # The installed bmigrate pauses the garbage collector while it imports (nothing to
    # collect there); a command that ran with it paused (bmigrate run, for months) would
    # never free a reference cycle.
    out = subprocess.run([sys.executable, "-c", ENTRY], capture_output=True, text=True,
                         timeout=60, check=True).stdout.split()
    assert out == ["True", "True", "True"], out


EXIT = """
import atexit, sys
import bmig.cli.main as group
marker = sys.argv[1]
def command(cli, prog):
    atexit.register(lambda: open(marker, "w").write("ran"))
    sys.stdout.write("x" * 1_000_000)      # written through at once
    sys.stdout.write("end")                # left in the buffer
    sys.stderr.write("said")
    sys.exit(7)
group.run = command
sys.argv = ["bmigrate", "status"]
from bmig.cli.bmigrate import main
main()
"""


def test_the_quick_exit_flushes_the_output_runs_the_exit_handlers_and_keeps_the_status(
        tmp_path):
    marker = tmp_path / "atexit"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    done = subprocess.run([sys.executable, "-c", EXIT, str(marker)], capture_output=True,
                          text=True, timeout=60, env=env)
    assert done.returncode == 7, done.stderr
    assert done.stdout == "x" * 1_000_000 + "end"
    assert done.stderr == "said"
    assert marker.read_text() == "ran"


LEAVE_WITH_A_THREAD = """
import threading
from bmig.cli.bmigrate import leave
go = threading.Event()
worker = threading.Thread(target=go.wait, args=(30,))
worker.start()
try:
    leave(0)
except SystemExit:
    print("the usual exit")
go.set()
worker.join(30)
"""


def test_the_quick_exit_is_not_taken_while_a_thread_still_runs():
    # os._exit would kill a thread that has work to finish; Python's exit waits for it.
    done = subprocess.run([sys.executable, "-c", LEAVE_WITH_A_THREAD], capture_output=True,
                          text=True, timeout=60)
    assert done.stdout == "the usual exit\n", (done.returncode, done.stderr)



CONNECT = """
import socket, sys
from bmig.wire.transports import connect_tcp
listener = socket.create_server(("127.0.0.1", 0))
connect_tcp("127.0.0.1", listener.getsockname()[1], timeout=10).close()
print("encodings.idna" in sys.modules)
"""


def test_a_tcp_target_named_in_ascii_is_reached_without_the_idna_codec():
    # A millisecond of every sync's start.
    out = subprocess.run([sys.executable, "-c", CONNECT], capture_output=True, text=True,
                         timeout=60, check=True).stdout.split()
    assert out == ["False"], out


def test_a_name_that_is_not_ascii_still_goes_through_idna(monkeypatch):
    # No name service can be relied on here: what getaddrinfo would be given is seen.
    from bmig.wire import transports
    given = []

    def create_connection(address, timeout):
        given.append(address[0])
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(transports.socket, "create_connection", create_connection)
    for name in ("b\u00fccher.example", "backup.example"):
        with pytest.raises(UnreachableError, match=f"cannot resolve {name}: Name"):
            transports.connect_tcp(name, 10810, timeout=1)
    assert given == ["b\u00fccher.example", b"backup.example"]


def test_a_name_idna_cannot_take_is_a_one_line_error():
    # An empty label: the idna codec refuses it before any name service is asked.
    from bmig.wire import transports
    with pytest.raises(UnreachableError, match="cannot resolve b\u00fccher..example: "):
        transports.connect_tcp("b\u00fccher..example", 10810, timeout=1)


LEAVE_WITH_A_DAEMON_THREAD = """
import threading
from bmig.cli.bmigrate import leave
threading.Thread(target=threading.Event().wait, daemon=True).start()
try:
    leave(0)
except SystemExit:
    print("the usual exit")
"""


def test_the_quick_exit_is_taken_while_only_daemon_threads_run():
    # Python's exit does not wait for them either (bmig.signalrelay's thread is one).
    done = subprocess.run([sys.executable, "-c", LEAVE_WITH_A_DAEMON_THREAD],
                          capture_output=True, text=True, timeout=60)
    assert (done.returncode, done.stdout) == (0, ""), done.stderr
