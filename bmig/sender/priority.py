"""The CPU priority a sync or the catch-up service ships at.

A sync competes for the CPU with the application it copies (and with bmig-nbd and breqd,
which serve that application's writes). Shipped at a nice value of 10 by default, it
takes every idle cycle and gives way when the application needs the CPU, as DRBD's resync
controller gives way to application I/O; the kernel's scheduler does the backing off, at
no cost when the machine is idle. A cutover is not lowered: it is downtime-bound.
"""

from __future__ import annotations

import os

DEFAULT_NICE = 10


def lower_priority(nice: int) -> int:
    """Raise every thread's nice value to at least ``nice`` (never lower it: a unit's
    Nice= of 15 stays 15); threads started later inherit it. The nice value in force."""
    current = os.getpriority(os.PRIO_PROCESS, 0)
    if nice <= current:
        return current
    # On Linux a nice value belongs to a thread: PRIO_PROCESS with a thread id.
    for tid in os.listdir("/proc/self/task"):
        try:
            os.setpriority(os.PRIO_PROCESS, int(tid), nice)
        except ProcessLookupError:      # a thread that ended meanwhile
            pass
    return nice
