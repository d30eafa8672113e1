"""What /proc says about a process: enough to tell a process from a later one that
was given the same pid."""

from __future__ import annotations


def start_time(pid: int) -> int:
    """The process's start time (clock ticks after boot), or 0 if there is no such process."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read().strip()
    except OSError:
        return 0
    fields = stat[stat.rfind(")") + 2:].split()
    return int(fields[19]) if len(fields) > 19 else 0
