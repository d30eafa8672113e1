"""A signal never waits for the main thread: bmigrate sync/run and bmig-dm act on
SIGTERM, SIGINT and SIGHUP in bmig.signalrelay's thread.

Python runs a signal's handler in the main thread between two bytecodes, which may be
inside ``Event.wait`` on the very stop event the handler sets; Event's lock is not
reentrant, so a handler that set it there waited for ever (``bmigrate run`` under
``--interval`` waits on its stop event in pieces all day: a SIGTERM now and then never
stopped it). Each case runs in a child, its main thread holding the stop event's lock
as Event.wait does while the signal arrives; the child is killed if it hangs.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

WAIT = 20          # seconds: a child that hangs has met the deadlock

SIGNALLED_INSIDE_THE_EVENTS_LOCK = """
import signal, sys, threading
from bmig.cli.sync import Signals

class Migration:
    stop = threading.Event()
    reporter = None

signals = Signals(Migration(), None)
signals.install()
with Migration.stop._cond:                   # where Event.wait holds it
    signal.raise_signal(getattr(signal, sys.argv[1]))
    handled = True                           # the handler has run by now
print("stopped", Migration.stop.wait(10), "interrupted", signals.interrupted, flush=True)
"""


@pytest.mark.parametrize("name, interrupted", [("SIGTERM", False), ("SIGINT", True)])
def test_a_signal_while_the_main_thread_holds_the_stop_events_lock_stops_it(name,
                                                                            interrupted):
    done = subprocess.run([sys.executable, "-c", SIGNALLED_INSIDE_THE_EVENTS_LOCK, name],
                          capture_output=True, text=True, timeout=WAIT)
    assert done.stdout.split() == ["stopped", "True", "interrupted", str(interrupted)], \
        (done.returncode, done.stderr)


SECOND_CTRL_C = """
import signal, threading
from bmig.cli.sync import Signals

class Migration:
    stop = threading.Event()
    reporter = None

Signals(Migration(), None).install()
signal.raise_signal(signal.SIGINT)           # the first: stop after what is in flight
Migration.stop.wait(10)
try:
    signal.raise_signal(signal.SIGINT)       # the second: at once, in the main thread
    for _ in range(1000):
        pass
except KeyboardInterrupt:
    print("at once", flush=True)
"""


def test_the_second_ctrl_c_stops_at_once():
    done = subprocess.run([sys.executable, "-c", SECOND_CTRL_C], capture_output=True,
                          text=True, timeout=WAIT)
    assert done.stdout == "at once\n", (done.returncode, done.stderr)
    assert "Ctrl-C again to stop at once" in done.stderr


RELAYED = """
import os, signal, threading
from bmig import signalrelay

ran = []
both = threading.Event()

def action(signum):
    def act():
        ran.append((signum, threading.current_thread().name))
        if len(ran) == 2:
            both.set()
    return act

signalrelay.relay({signal.SIGUSR1: action(signal.SIGUSR1),
                   signal.SIGUSR2: action(signal.SIGUSR2)})
os.kill(os.getpid(), signal.SIGUSR1)
os.kill(os.getpid(), signal.SIGUSR2)
print(both.wait(10), sorted(ran) == [(signal.SIGUSR1, "signals"), (signal.SIGUSR2, "signals")])
"""


def test_each_signal_runs_its_action_in_the_relay_thread():
    done = subprocess.run([sys.executable, "-c", RELAYED], capture_output=True, text=True,
                          timeout=WAIT)
    assert done.stdout.split() == ["True", "True"], (done.returncode, done.stderr)


AFTER_A_FAILED_ACTION = """
import os, signal, threading
from bmig import signalrelay

stopped = threading.Event()

def broken():
    raise OSError("standard error is closed, say")

signalrelay.relay({signal.SIGHUP: broken, signal.SIGTERM: stopped.set})
os.kill(os.getpid(), signal.SIGHUP)
os.kill(os.getpid(), signal.SIGTERM)
print(stopped.wait(10))
"""


def test_an_action_that_fails_does_not_end_the_relay():
    # A SIGTERM after it must still stop the command.
    done = subprocess.run([sys.executable, "-c", AFTER_A_FAILED_ACTION], capture_output=True,
                          text=True, timeout=WAIT)
    assert done.stdout.split() == ["True"], (done.returncode, done.stderr)
    assert "standard error is closed, say" in done.stderr
