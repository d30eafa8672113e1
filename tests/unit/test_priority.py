"""lower_priority: every thread of the process ships at the nice value asked for, or
lower priority; never higher. In a child process: a nice value cannot be taken back
without privilege, and the test run must not keep it."""

from __future__ import annotations

import subprocess
import sys

PROBE = """
import os, threading
from bmig.sender.priority import lower_priority
started, done = threading.Event(), threading.Event()
def body():
    started.set()
    done.wait(30)
t = threading.Thread(target=body)
t.start()
started.wait(30)
def nice_of(tid):
    return os.getpriority(os.PRIO_PROCESS, tid)
print(lower_priority(7), nice_of(threading.get_native_id()), nice_of(t.native_id))
print(lower_priority(3), nice_of(threading.get_native_id()), nice_of(t.native_id))
late = []
t2 = threading.Thread(target=lambda: late.append(nice_of(threading.get_native_id())))
t2.start(); t2.join(30)
print(late[0])
done.set(); t.join(30)
"""


def test_every_thread_is_lowered_never_raised_and_new_threads_inherit():
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True,
                         timeout=60, check=True).stdout.split("\n")
    assert out[:3] == ["7 7 7", "7 7 7", "7"], out
